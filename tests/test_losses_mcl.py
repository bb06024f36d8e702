"""Tests for mcl_jax.losses.mcl against an independent NumPy float64 reference (docs/methods.md).

The reference below is written straight from the documented formulas with explicit Python loops over
anchors, peers and pairs; it never calls the library. Soft terms take separate "student" and
"target" embeddings so that finite differences of the reference w.r.t. the student side give the
gradient the documented stop-gradient placement demands.

Float64 runs use ``jax.enable_x64(True)`` (the JAX 0.10 spelling of the old
``jax.experimental.enable_x64`` context manager).
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import losses

# ------------------------------------------------------------------------------------------------
# NumPy float64 reference (explicit loops).
# ------------------------------------------------------------------------------------------------


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(row):
  shifted = row - np.max(row)
  return shifted - np.log(np.sum(np.exp(shifted)))


def ref_supcon(logits, pos, denom, w=None):
  """(P1); anchors without a positive are skipped (r = 0, not counted)."""
  total, num_valid = 0.0, 0
  for a in range(logits.shape[0]):
    positives = [c for c in range(logits.shape[1]) if pos[a, c]]
    if not positives:
      continue
    columns = [c for c in range(logits.shape[1]) if denom[a, c]]
    top = max(logits[a, c] for c in columns)
    log_denom = top + np.log(sum(np.exp(logits[a, c] - top) for c in columns))
    r = sum(logits[a, c] - log_denom for c in positives) / len(positives)
    total += (1.0 if w is None else w[a]) * r
    num_valid += 1
  return -total / num_valid if num_valid else 0.0


def ref_kl(student, target, T, w=None):
  """(P2): T^2 / B * sum_a w_a KL(softmax(target_a/T) || softmax(student_a/T))."""
  total = 0.0
  for a in range(student.shape[0]):
    log_pt = np_log_softmax(target[a] / T)
    log_ps = np_log_softmax(student[a] / T)
    total += (1.0 if w is None else w[a]) * np.sum(np.exp(log_pt) * (log_pt - log_ps))
  return T * T * total / student.shape[0]


def ref_masks(y, include_self_positive=False):
  b = len(y)
  pos = np.zeros((b, b), bool)
  denom = np.zeros((b, b), bool)
  for a in range(b):
    for c in range(b):
      if include_self_positive:
        pos[a, c] = y[a] == y[c]
        denom[a, c] = True
      else:
        pos[a, c] = y[a] == y[c] and a != c
        denom[a, c] = a != c
  return pos, denom


def ref_ce(logits, y):
  total = 0.0
  for k in range(logits.shape[0]):
    total += -np.mean([np_log_softmax(logits[k, b])[y[b]] for b in range(len(y))])
  return total


def ordered_pairs(num_peers):
  return [(k, l) for k in range(num_peers) for l in range(num_peers) if k != l]


def ref_vcl(z, y, tau):
  pos, denom = ref_masks(y)
  return sum(ref_supcon(z[k] @ z[k].T / tau, pos, denom) for k in range(z.shape[0]))


def ref_icl(z, y, tau, include_self_positive=False):
  pos, denom = ref_masks(y, include_self_positive)
  return sum(ref_supcon(z[k] @ z[l].T / tau, pos, denom) for k, l in ordered_pairs(z.shape[0]))


def ref_soft_vcl(zs, zt, tau, T):
  return sum(
      ref_kl(zs[k] @ zs[k].T / tau, zt[l] @ zt[l].T / tau, T) for k, l in ordered_pairs(zs.shape[0])
  )


def ref_soft_icl(zs, zt, tau, T):
  return sum(
      ref_kl(zs[k] @ zs[l].T / tau, zt[l] @ zt[k].T / tau, T) for k, l in ordered_pairs(zs.shape[0])
  )


def ref_kd(ls, lt, T):
  ensemble = np.mean(lt, axis=0)
  return sum(ref_kl(ls[k], ensemble, T) for k in range(ls.shape[0]))


WEIGHTS = dict(alpha=0.1, beta=0.2, gamma=1.0, lam=0.7)


def ref_mcl_total(zs, zt, ls, lt, y, tau, T, logit_kd=True):
  total = (
      ref_ce(ls, y)
      + WEIGHTS['alpha'] * ref_vcl(zs, y, tau)
      + WEIGHTS['beta'] * ref_icl(zs, y, tau)
      + WEIGHTS['gamma'] * ref_soft_vcl(zs, zt, tau, T)
      + WEIGHTS['lam'] * ref_soft_icl(zs, zt, tau, T)
  )
  return total + (ref_kd(ls, lt, T) if logit_kd else 0.0)


def ref_memory_logits(memory, idx, z, k, l, tau):
  """I(k <- l)[b, j] = memory[k, idx[b, j]] . z[l, b] / tau."""
  out = np.zeros(idx.shape)
  for b in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      out[b, j] = memory[k, idx[b, j]] @ z[l, b] / tau
  return out


def ref_memory_losses(zs, zt, memory, idx, num_pos, tau, T):
  num_peers, num_cols = zs.shape[0], idx.shape[1]
  icl_pos = np.tile(np.arange(num_cols) < 1 + num_pos, (idx.shape[0], 1))
  vcl_pos = np.tile(np.arange(num_cols - 1) < num_pos, (idx.shape[0], 1))
  out = dict(vcl=0.0, soft_vcl=0.0, icl=0.0, soft_icl=0.0)
  for k in range(num_peers):
    own = ref_memory_logits(memory, idx, zs, k, k, tau)[:, 1:]
    out['vcl'] += ref_supcon(own, vcl_pos, np.ones_like(vcl_pos))
  for k, l in ordered_pairs(num_peers):
    out['icl'] += ref_supcon(
        ref_memory_logits(memory, idx, zs, k, l, tau), icl_pos, np.ones_like(icl_pos)
    )
    out['soft_vcl'] += ref_kl(
        ref_memory_logits(memory, idx, zs, k, k, tau)[:, 1:],
        ref_memory_logits(memory, idx, zt, l, l, tau)[:, 1:],
        T,
    )
    out['soft_icl'] += ref_kl(
        ref_memory_logits(memory, idx, zs, k, l, tau),
        ref_memory_logits(memory, idx, zt, l, k, tau),
        T,
    )
  return out


def ref_memory_update(memory, emb, own_idx, m):
  old = memory.copy()
  new = memory.copy()
  for b, n in enumerate(own_idx):  # in batch order: the last duplicate wins
    for k in range(memory.shape[0]):
      v = m * old[k, n] + (1 - m) * emb[k, b]
      new[k, n] = v / np.linalg.norm(v)
  return new


def ref_pair_terms(ea_s, eb_s, ea_t, eb_t, y, w, tau, T):
  """Spec 3.1 for one combination; *_s = student side, *_t = (stop-gradient) target side."""
  pos, denom = ref_masks(y)
  vcl = ref_supcon(ea_s @ ea_s.T / tau, pos, denom, w) + ref_supcon(
      eb_s @ eb_s.T / tau, pos, denom, w
  )
  soft_vcl = ref_kl(ea_s @ ea_s.T / tau, eb_t @ eb_t.T / tau, T, w) + ref_kl(
      eb_s @ eb_s.T / tau, ea_t @ ea_t.T / tau, T, w
  )
  icl = ref_supcon(ea_s @ eb_s.T / tau, pos, denom, w) + ref_supcon(
      eb_s @ ea_s.T / tau, pos, denom, w
  )
  soft_icl = ref_kl(ea_s @ eb_s.T / tau, eb_t @ ea_t.T / tau, T, w) + ref_kl(
      eb_s @ ea_s.T / tau, ea_t @ eb_t.T / tau, T, w
  )
  return np.array([vcl, soft_vcl, icl, soft_icl])


def ref_layer(es, et, y, w5, tau, T):
  """Sum over i, j != i (m-th other peer), s, t of the pair terms; w5 is [K, K-1, S, S, B]."""
  num_peers, num_stages = es.shape[:2]
  total = np.zeros(4)
  for i in range(num_peers):
    for m, j in enumerate([j for j in range(num_peers) if j != i]):
      for s in range(num_stages):
        for t in range(num_stages):
          total += ref_pair_terms(es[i, s], es[j, t], et[i, s], et[j, t], y, w5[i, m, s, t], tau, T)
  return total


def ref_layer_match_weights(p):
  num_peers, num_stages, batch = p.shape[:3]
  rows = []
  for i in range(num_peers):
    for j in range(num_peers):
      if j == i:
        continue
      for s in range(num_stages):
        for t in range(num_stages):
          row = []
          for b in range(batch):
            u, v = p[i, s, b], p[j, t, b]
            cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
            row.append(1.0 / (1.0 + np.exp(-cos)))
          rows.append(row)
  return np.array(rows)


def fd_grad(f, x, h=1e-6):
  """Central finite differences of a scalar NumPy function."""
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    g[i] = (f(xp) - f(xm)) / (2 * h)
  return g


# ------------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------------


def make_labels(batch, rng):
  """Labels with classes of size 3, 2 and 1 (singletons have no in-batch positive)."""
  pattern = [0, 0, 0, 1, 1] + list(range(2, batch - 3))
  return rng.permutation(np.array(pattern[:batch]))


def make_inputs(num_peers, batch, dim, seed=0, num_classes=5):
  rng = np.random.default_rng(seed)
  raw = rng.normal(size=(num_peers, batch, dim))
  logits = 2.0 * rng.normal(size=(num_peers, batch, num_classes))
  return raw, logits, make_labels(batch, rng)


CASES = [(2, 8, 5, 0.1), (3, 6, 4, 0.07), (4, 7, 3, 0.5)]  # (K, B, D, tau)
T = 3.0


def jit_call(fn, *args):
  """Runs ``fn`` under one jit: op-by-op dispatch compiles every primitive and is far slower."""
  return jax.jit(fn)(*args)


def assert_close(actual, expected, rtol=1e-9, atol=1e-9):
  chex.assert_trees_all_close(jax.tree.map(np.asarray, actual), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# Primitives.
# ------------------------------------------------------------------------------------------------


def test_l2_normalize_matches_numpy_and_zero_vector_is_safe():
  with jax.enable_x64(True):
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    actual = jit_call(lambda x: (losses.l2_normalize(x), losses.l2_normalize(x, axis=0)), x)
    assert_close(actual, (np_normalize(x), x / np.linalg.norm(x, axis=0, keepdims=True)))
  zero = jnp.zeros((2, 4))
  assert_close(losses.l2_normalize(zero), np.zeros((2, 4)), atol=0)
  grad = jit_call(jax.grad(lambda v: jnp.sum(losses.l2_normalize(v))), zero)
  assert np.all(np.isfinite(grad))
  assert losses.l2_normalize(zero.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_supcon_from_logits_matches_reference_with_weights_and_empty_rows():
  rng = np.random.default_rng(1)
  logits = 3.0 * rng.normal(size=(7, 9))
  pos = rng.random((7, 9)) < 0.3
  pos[2] = False  # no positives
  pos[5] = False
  denom = pos | (rng.random((7, 9)) < 0.6)
  w = rng.uniform(0.2, 1.0, size=7)
  with jax.enable_x64(True):
    keep = pos.any(axis=1)
    actual = jit_call(
        lambda logits, w: dict(
            unweighted=losses.supcon_from_logits(logits, pos, denom),
            weighted=losses.supcon_from_logits(logits, pos, denom, w),
            # Excluded from the mean: same as the loss on the valid rows alone (columns unchanged).
            valid_rows_only=losses.supcon_from_logits(
                logits[keep], pos[keep], denom[keep], w[keep]
            ),
            no_positive=losses.supcon_from_logits(logits, np.zeros_like(pos), denom),
        ),
        logits,
        w,
    )
    weighted = ref_supcon(logits, pos, denom, w)
    assert_close(
        actual,
        dict(
            unweighted=ref_supcon(logits, pos, denom),
            weighted=weighted,
            valid_rows_only=weighted,
            no_positive=0.0,
        ),
    )
    assert float(actual['no_positive']) == 0.0


def test_soft_kl_matches_reference_and_stops_target_gradient():
  rng = np.random.default_rng(2)
  student, target = rng.normal(size=(2, 5, 6)) * 4
  w = rng.uniform(size=5)
  with jax.enable_x64(True):
    actual = jit_call(
        lambda s, t, w: (losses.soft_kl(s, t, 1.0), losses.soft_kl(s, t, 3.0, w)),
        student,
        target,
        w,
    )
    assert_close(actual, (ref_kl(student, target, 1.0), ref_kl(student, target, 3.0, w)))
    grad_s, grad_t = jit_call(
        jax.grad(lambda s, t: losses.soft_kl(s, t, 3.0, w), argnums=(0, 1)), student, target
    )
    assert_close(grad_t, np.zeros_like(target), atol=0)
    assert_close(
        grad_s, fd_grad(lambda s: ref_kl(s, target, 3.0, w), student), rtol=1e-6, atol=1e-8
    )


def test_ce_loss_matches_reference():
  raw, logits, y = make_inputs(3, 6, 4)
  with jax.enable_x64(True):
    assert_close(jit_call(lambda l: losses.ce_loss(l, y), logits), ref_ce(logits, y))


# ------------------------------------------------------------------------------------------------
# MCL terms: values.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('num_peers,batch,dim,tau', CASES)
def test_mcl_terms_match_reference(num_peers, batch, dim, tau):
  raw, logits, y = make_inputs(num_peers, batch, dim, seed=num_peers)
  z = np_normalize(raw)

  def lib(z, logits):
    return dict(
        vcl=losses.vcl_loss(z, y, tau),
        icl=losses.icl_loss(z, y, tau),
        icl_self=losses.icl_loss(z, y, tau, include_self_positive=True),
        soft_vcl=losses.soft_vcl_loss(z, tau, T),
        soft_icl=losses.soft_icl_loss(z, tau, T),
        kd=losses.logit_kd_loss(logits, T),
        mcl=[
            losses.mcl_loss(z, logits, y, tau=tau, T=T, logit_kd=logit_kd, **WEIGHTS)
            for logit_kd in (True, False)
        ],
    )

  with jax.enable_x64(True):
    actual = jit_call(lib, z, logits)
    mcl_results = actual.pop('mcl')
    expected = dict(
        vcl=ref_vcl(z, y, tau),
        icl=ref_icl(z, y, tau),
        icl_self=ref_icl(z, y, tau, include_self_positive=True),
        soft_vcl=ref_soft_vcl(z, z, tau, T),
        soft_icl=ref_soft_icl(z, z, tau, T),
        kd=ref_kd(logits, logits, T),
    )
    assert_close(actual, expected)

    for logit_kd, (total, terms) in zip((True, False), mcl_results):
      assert_close(total, ref_mcl_total(z, z, logits, logits, y, tau, T, logit_kd))
      assert set(terms) == {'ce', 'vcl', 'icl', 'soft_vcl', 'soft_icl', 'kd'}
      expected_terms = {k: expected[k] for k in ('vcl', 'icl', 'soft_vcl', 'soft_icl')}
      expected_terms.update(ce=ref_ce(logits, y), kd=expected['kd'] if logit_kd else 0.0)
      assert_close(terms, expected_terms)


def test_vectorised_terms_equal_loop_over_ordered_pairs():
  raw, logits, y = make_inputs(4, 8, 6, seed=3)
  tau = 0.07
  pos = (y[:, None] == y[None, :]) & ~np.eye(8, dtype=bool)
  denom = ~np.eye(8, dtype=bool)

  def loop(z):
    intra = [z[k] @ z[k].T / tau for k in range(4)]
    cross = {(k, l): z[k] @ z[l].T / tau for k, l in ordered_pairs(4)}
    return dict(
        vcl=sum(losses.supcon_from_logits(intra[k], pos, denom) for k in range(4)),
        icl=sum(losses.supcon_from_logits(cross[p], pos, denom) for p in cross),
        soft_vcl=sum(losses.soft_kl(intra[k], intra[l], T) for k, l in cross),
        soft_icl=sum(losses.soft_kl(cross[(k, l)], cross[(l, k)], T) for k, l in cross),
    )

  def vectorised(z):
    return dict(
        vcl=losses.vcl_loss(z, y, tau),
        icl=losses.icl_loss(z, y, tau),
        soft_vcl=losses.soft_vcl_loss(z, tau, T),
        soft_icl=losses.soft_icl_loss(z, tau, T),
    )

  def terms_and_grad_of_sum(terms_fn):
    """(terms, d sum(terms) / dz): the gradients pin the same stop-gradient sides."""

    def total(z):
      terms = terms_fn(z)
      return sum(terms.values()), terms

    (_, terms), grad = jit_call(jax.value_and_grad(total, has_aux=True), z)
    return terms, grad

  z = losses.l2_normalize(jnp.asarray(raw, jnp.float32))
  assert_close(terms_and_grad_of_sum(vectorised), terms_and_grad_of_sum(loop), rtol=1e-4, atol=1e-5)


def test_include_self_positive_gives_cross_peer_positive():
  # All labels distinct: without the self positive no anchor is valid, with it every anchor is.
  raw, _, _ = make_inputs(2, 6, 4, seed=4)
  z = np_normalize(raw)
  y = np.arange(6)
  with jax.enable_x64(True):
    without_self, with_self = jit_call(
        lambda z: (
            losses.icl_loss(z, y, 0.1),
            losses.icl_loss(z, y, 0.1, include_self_positive=True),
        ),
        z,
    )
    assert float(without_self) == 0.0
    assert_close(with_self, ref_icl(z, y, 0.1, include_self_positive=True))
    assert float(with_self) > 0.0


# ------------------------------------------------------------------------------------------------
# MCL terms: gradients vs finite differences (pins the stop-gradient sides).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('num_peers,batch,dim,tau', [(2, 6, 4, 0.1), (3, 5, 3, 0.07)])
def test_mcl_gradients_match_finite_differences(num_peers, batch, dim, tau):
  raw0, logits0, y = make_inputs(num_peers, batch, dim, seed=10 + num_peers, num_classes=4)
  z0 = np_normalize(raw0)

  def lib_terms(raw, logits):
    z = losses.l2_normalize(raw)
    total, _ = losses.mcl_loss(z, logits, y, tau=tau, T=T, logit_kd=True, **WEIGHTS)
    return dict(
        vcl=losses.vcl_loss(z, y, tau),
        icl=losses.icl_loss(z, y, tau),
        icl_self=losses.icl_loss(z, y, tau, include_self_positive=True),
        soft_vcl=losses.soft_vcl_loss(z, tau, T),
        soft_icl=losses.soft_icl_loss(z, tau, T),
        kd=losses.logit_kd_loss(logits, T),
        mcl=total,
    )

  # Functions of the student side only; the target side is frozen at (z0, logits0).
  emb_refs = dict(
      vcl=lambda zs: ref_vcl(zs, y, tau),
      icl=lambda zs: ref_icl(zs, y, tau),
      icl_self=lambda zs: ref_icl(zs, y, tau, True),
      soft_vcl=lambda zs: ref_soft_vcl(zs, z0, tau, T),
      soft_icl=lambda zs: ref_soft_icl(zs, z0, tau, T),
      mcl=lambda zs: ref_mcl_total(zs, z0, logits0, logits0, y, tau, T),
  )
  logit_refs = dict(
      kd=lambda ls: ref_kd(ls, logits0, T),
      mcl=lambda ls: ref_mcl_total(z0, z0, ls, logits0, y, tau, T),
  )
  with jax.enable_x64(True):
    grads = jax.jit(jax.jacrev(lib_terms, argnums=(0, 1)))(raw0, logits0)
    for name, grad in grads.items():
      emb_ref = emb_refs.get(name)
      expected_emb = (
          fd_grad(lambda raw: emb_ref(np_normalize(raw)), raw0) if emb_ref else np.zeros_like(raw0)
      )
      expected_logits = fd_grad(logit_refs[name], logits0) if name in logit_refs else 0 * logits0
      assert_close(grad, (expected_emb, expected_logits), rtol=1e-5, atol=1e-7)
      assert np.abs(grad[0]).max() > 0 or emb_ref is None


# ------------------------------------------------------------------------------------------------
# Robustness: anchors without positives, bf16, tau = 0.07, jit.
# ------------------------------------------------------------------------------------------------


def test_batch_without_positives_gives_zero_and_finite_grads():
  raw, logits, _ = make_inputs(3, 6, 4, seed=5)
  y = np.arange(6)  # no two samples share a label

  def hard_terms(raw):
    z = losses.l2_normalize(raw)
    return losses.vcl_loss(z, y, 0.07) + losses.icl_loss(z, y, 0.07)

  def total(raw):
    z = losses.l2_normalize(raw)
    return losses.mcl_loss(z, logits, y, tau=0.07, T=T, logit_kd=True, **WEIGHTS)[0]

  raw_bf16 = jnp.asarray(raw, jnp.bfloat16)
  value, grad = jit_call(jax.value_and_grad(hard_terms), raw_bf16)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad, np.float32) == 0.0)
  total_grad = jit_call(jax.grad(total), raw_bf16)
  assert np.all(np.isfinite(np.asarray(total_grad, np.float32)))
  assert np.abs(np.asarray(total_grad, np.float32)).max() > 0


def test_bf16_small_tau_finite_values_and_grads():
  rng = np.random.default_rng(6)
  # Nearly identical embeddings push every logit to ~1/tau; singletons lack positives.
  raw = 1.0 + 1e-2 * rng.normal(size=(4, 16, 8))
  y = make_labels(16, rng)
  logits = 50.0 * rng.normal(size=(4, 16, 16))

  def total(raw, logits):
    z = losses.l2_normalize(raw)
    value, terms = losses.mcl_loss(z, logits, y, tau=0.07, T=T, logit_kd=True, **WEIGHTS)
    return value, terms

  raw_bf16, logits_bf16 = jnp.asarray(raw, jnp.bfloat16), jnp.asarray(logits, jnp.bfloat16)
  (value, terms), grads = jit_call(
      jax.value_and_grad(total, argnums=(0, 1), has_aux=True), raw_bf16, logits_bf16
  )
  assert value.dtype == jnp.float32
  for leaf in jax.tree.leaves((value, terms, grads)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  # Same terms as float32 on the bf16-rounded inputs (the loss math runs in float32).
  _, terms32 = jit_call(total, raw_bf16.astype(jnp.float32), logits_bf16.astype(jnp.float32))
  chex.assert_trees_all_close(terms, terms32, rtol=2e-2, atol=2e-2)


def test_supcon_bf16_huge_logits_does_not_overflow():
  rng = np.random.default_rng(7)
  logits = jnp.asarray(300.0 * rng.normal(size=(6, 6)), jnp.bfloat16)  # exp() overflows f32
  pos = np.eye(6, k=1, dtype=bool) | np.eye(6, k=-1, dtype=bool)
  denom = ~np.eye(6, dtype=bool)
  value, grad = jit_call(
      jax.value_and_grad(lambda l: losses.supcon_from_logits(l, pos, denom)), logits
  )
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
  expected = ref_supcon(np.asarray(logits, np.float64), pos, denom)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  kl = jit_call(lambda l: losses.soft_kl(l, l[::-1], T), logits)
  np.testing.assert_allclose(
      float(kl),
      ref_kl(np.asarray(logits, np.float64), np.asarray(logits[::-1], np.float64), T),
      rtol=1e-4,
  )


def test_jit_equals_no_jit():
  # Eager mode compiles every op per shape: K = 4 peers and K*S = 2*2 L-MCL nodes share shapes.
  raw, logits, y = make_inputs(4, 8, 5, seed=8)
  z = losses.l2_normalize(jnp.asarray(raw, jnp.float32))
  logits = jnp.asarray(logits, jnp.float32)
  memory = losses.l2_normalize(
      jnp.asarray(np.random.default_rng(0).normal(size=(4, 20, 5)), jnp.float32)
  )
  idx = jnp.asarray(np.random.default_rng(1).integers(0, 20, size=(8, 6)))
  emb4 = z.reshape(2, 2, 8, 5)  # [K, S, B, D]
  w = losses.layer_match_weights(emb4)

  def everything(z, logits, memory, idx, emb4, w):
    return dict(
        mcl=losses.mcl_loss(z, logits, y, tau=0.1, T=T, logit_kd=True, **WEIGHTS),
        icl_self=losses.icl_loss(z, y, 0.1, include_self_positive=True),
        memory=losses.memory_vcl_icl_losses(z, memory, idx, 2, 0.07, T),
        update=losses.memory_update(memory, z, idx[:, 0], 0.5),
        layer=losses.layer_mcl_loss(emb4, y, w, 0.1, T),
        match=losses.layer_match_weights(emb4),
    )

  args = (z, logits, memory, idx, emb4, w)
  chex.assert_trees_all_close(jax.jit(everything)(*args), everything(*args), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Memory-bank variant.
# ------------------------------------------------------------------------------------------------


def make_memory_inputs(num_peers, batch, dim, size, num_pos, num_neg, seed):
  rng = np.random.default_rng(seed)
  raw = rng.normal(size=(num_peers, batch, dim))
  s = 1.0 / np.sqrt(dim / 3)
  memory = rng.uniform(-s, s, size=(num_peers, size, dim))  # unnormalised, as at init
  idx = rng.integers(0, size, size=(batch, 1 + num_pos + num_neg))
  idx[0, 1] = idx[0, 0]  # p_1 == n is possible
  return raw, memory, idx


@pytest.mark.parametrize('num_peers,num_pos,tau', [(2, 1, 0.07), (3, 2, 0.2)])
def test_memory_losses_match_reference(num_peers, num_pos, tau):
  raw, memory, idx = make_memory_inputs(num_peers, 5, 4, 30, num_pos, 6, seed=num_peers)
  z = np_normalize(raw)
  with jax.enable_x64(True):

    def lib(z, memory):
      return losses.memory_vcl_icl_losses(z, memory, idx, num_pos, tau, T)

    assert_close(jit_call(lib, z, memory), ref_memory_losses(z, z, memory, idx, num_pos, tau, T))
    bf16 = jit_call(lib, jnp.asarray(z, jnp.bfloat16), jnp.asarray(memory, jnp.bfloat16))
    for leaf in bf16.values():
      assert leaf.dtype == jnp.float32 and np.isfinite(float(leaf))


def test_memory_losses_gradients_and_memory_gets_none():
  num_pos, tau = 1, 0.1
  raw0, memory, idx = make_memory_inputs(2, 4, 3, 12, num_pos, 5, seed=9)
  z0 = np_normalize(raw0)
  with jax.enable_x64(True):

    def lib(raw, mem):
      return losses.memory_vcl_icl_losses(losses.l2_normalize(raw), mem, idx, num_pos, tau, T)

    grads = jit_call(jax.jacrev(lib, argnums=(0, 1)), raw0, memory)
    for name, (grad_emb, grad_mem) in grads.items():
      expected = fd_grad(
          lambda raw: ref_memory_losses(np_normalize(raw), z0, memory, idx, num_pos, tau, T)[name],
          raw0,
      )
      assert_close(grad_emb, expected, rtol=1e-5, atol=1e-7)
      assert np.abs(expected).max() > 1e-3
      assert_close(grad_mem, np.zeros_like(memory), atol=0)


def test_memory_update_exact_with_duplicates():
  rng = np.random.default_rng(11)
  memory = rng.uniform(-1, 1, size=(2, 10, 4))
  emb = np_normalize(rng.normal(size=(2, 6, 4)))
  own_idx = np.array([3, 7, 3, 0, 9, 3], np.int32)  # slot 3 three times: the last (b = 5) wins

  def update(memory, emb):
    return losses.memory_update(memory, emb, own_idx, 0.5)

  with jax.enable_x64(True):
    updated = np.asarray(jit_call(update, memory, emb))
  expected = ref_memory_update(memory, emb, own_idx, 0.5)
  untouched = [n for n in range(10) if n not in own_idx]
  np.testing.assert_array_equal(updated[:, untouched], memory[:, untouched])
  np.testing.assert_allclose(updated, expected, rtol=1e-14, atol=1e-15)
  # The winning write for slot 3 is computed from the OLD entry and sample 5.
  v = 0.5 * memory[:, 3] + 0.5 * emb[:, 5]
  np.testing.assert_allclose(
      updated[:, 3], v / np.linalg.norm(v, axis=-1, keepdims=True), rtol=1e-14
  )
  out_bf16 = jit_call(update, jnp.asarray(memory, jnp.bfloat16), jnp.asarray(emb, jnp.float32))
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_bf16, np.float64), expected, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# L-MCL.
# ------------------------------------------------------------------------------------------------


def make_layer_inputs(num_peers, num_stages, batch, dim, seed):
  rng = np.random.default_rng(seed)
  e = np_normalize(rng.normal(size=(num_peers, num_stages, batch, dim)))
  w5 = rng.uniform(0.27, 0.73, size=(num_peers, num_peers - 1, num_stages, num_stages, batch))
  return e, w5, make_labels(batch, rng)


def test_layer_match_weights_ordering():
  p = np.random.default_rng(12).normal(size=(3, 2, 4, 5))
  with jax.enable_x64(True):
    w = jit_call(losses.layer_match_weights, p)
  assert w.shape == (3 * 2 * 2 * 2, 4)
  assert_close(w, ref_layer_match_weights(p))


def test_pair_mcl_terms_match_reference():
  e, w5, y = make_layer_inputs(2, 1, 7, 4, seed=13)
  with jax.enable_x64(True):
    actual = jit_call(
        lambda a, b, w: losses.pair_mcl_terms(a, b, y, w, 0.07, T), e[0, 0], e[1, 0], w5[0, 0, 0, 0]
    )
    assert_close(
        actual,
        tuple(ref_pair_terms(e[0, 0], e[1, 0], e[0, 0], e[1, 0], y, w5[0, 0, 0, 0], 0.07, T)),
    )


@pytest.mark.parametrize('num_peers,num_stages', [(2, 3), (3, 2)])
def test_layer_mcl_loss_matches_reference_and_pair_loop(num_peers, num_stages):
  e, w5, y = make_layer_inputs(num_peers, num_stages, 6, 4, seed=14)
  tau = 0.1
  flat = w5.reshape(-1, 6)
  with jax.enable_x64(True):
    expected = tuple(ref_layer(e, e, y, w5, tau, T))

    def layer(e, w):
      return losses.layer_mcl_loss(e, y, w, tau, T)

    assert_close(jit_call(layer, e, w5), expected)
    assert_close(jit_call(layer, e, flat), expected)

    # All weights 1: the plain sum of pair_mcl_terms over the (i, s, j, t) enumeration.
    def pair_loop(e):
      terms = [
          losses.pair_mcl_terms(e[i, s], e[j, t], y, jnp.ones(6), tau, T)
          for i, j in ordered_pairs(num_peers)
          for s, t in itertools.product(range(num_stages), repeat=2)
      ]
      return tuple(sum(term[n] for term in terms) for n in range(4))

    assert_close(jit_call(layer, e, np.ones_like(flat)), jit_call(pair_loop, e))


def test_layer_mcl_gradients_emb_fd_and_weights():
  e_raw = np.random.default_rng(15).normal(size=(2, 2, 4, 3))
  _, w5, y = make_layer_inputs(2, 2, 4, 3, seed=15)
  tau = 0.2
  e0 = np_normalize(e_raw)
  with jax.enable_x64(True):

    def lib(raw, w):
      return jnp.stack(losses.layer_mcl_loss(losses.l2_normalize(raw), y, w, tau, T))

    jac_emb, jac_w = jit_call(jax.jacrev(lib, argnums=(0, 1)), e_raw, w5)
    for term in range(4):
      expected = fd_grad(lambda raw: ref_layer(np_normalize(raw), e0, y, w5, tau, T)[term], e_raw)
      assert_close(jac_emb[term], expected, rtol=1e-5, atol=1e-7)
      expected_w = fd_grad(lambda w: ref_layer(e0, e0, y, w, tau, T)[term], w5)
      assert_close(jac_w[term], expected_w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('num_peers', [2, 3])
def test_layer_mcl_single_stage_relates_to_mcl(num_peers):
  # S = 1, unit weights: every ordered pair (i, j) adds A_i and A_j once each, so VCL is counted
  # 2(K-1) times; the cross / soft terms enumerate each ordered pair twice (from (i,j) and (j,i)).
  e, _, y = make_layer_inputs(num_peers, 1, 7, 5, seed=16)
  tau = 0.07
  ones = np.ones((num_peers * (num_peers - 1), 7))
  with jax.enable_x64(True):

    def both(e, w):
      z = e[:, 0]
      mcl = (
          2 * (num_peers - 1) * losses.vcl_loss(z, y, tau),
          2 * losses.soft_vcl_loss(z, tau, T),
          2 * losses.icl_loss(z, y, tau),
          2 * losses.soft_icl_loss(z, tau, T),
      )
      return losses.layer_mcl_loss(e, y, w, tau, T), mcl

    layer, mcl = jit_call(both, e, ones)
    assert_close(layer, mcl)
    assert float(layer[0]) > 0 and float(layer[3]) > 0


# The L-MCL authors' CIFAR loss (losses/cifar_sup_layer_mcl_meta_loss.py: SupMCL, Sup_MCL_Loss_Meta,
# KLDiv; models/meta_network.py: LossWeightNetwork) transcribed line by line into NumPy, with its
# own masks and reductions (a mean over ALL anchors, weights as a [B, 1] column), independent of
# the references above (results/lmcl_investigation.md).
def authors_kl(y_s, y_t, w, T):
  log_p_s = np.stack([np_log_softmax(r) for r in y_s / T])
  log_p_t = np.stack([np_log_softmax(r) for r in y_t / T])
  return T**2 * np.sum(w * np.exp(log_p_t) * (log_p_t - log_p_s)) / y_t.shape[0]


def authors_sup_mcl(ea, eb, labels, w, tau, T):
  eye = np.eye(len(labels))
  intra_mask = (labels[None, :] == labels[:, None]).astype(float) - eye
  diag_mask = 1.0 - eye

  def contrast(logit):
    log_prob = logit - np.log(np.sum(np.exp(logit) * diag_mask, axis=1, keepdims=True))
    return -np.mean(np.sum(intra_mask * log_prob * w, axis=1) / np.sum(intra_mask, axis=1))

  ij, ji = ea @ eb.T / tau, eb @ ea.T / tau
  soft_icl = authors_kl(ij, ji, w, T) + authors_kl(ji, ij, w, T)
  icl = contrast(ij) + contrast(ji)
  aa, bb = ea @ ea.T / tau, eb @ eb.T / tau
  soft_vcl = authors_kl(aa, bb, w, T) + authors_kl(bb, aa, w, T)
  vcl = contrast(aa) + contrast(bb)
  return np.array([vcl, soft_vcl, icl, soft_icl])


def authors_loss_weights(proj):
  """LossWeightNetwork.forward after its projections: a list of [B] weights."""
  unit = proj / np.linalg.norm(proj, axis=-1, keepdims=True)
  num_peers, num_stages = proj.shape[:2]
  weights = []
  for i in range(num_peers):
    for j in range(num_peers):
      if i == j:
        continue
      for k in range(num_stages):
        for z in range(num_stages):
          weights.append(1 / (1 + np.exp(-np.sum(unit[i, k] * unit[j, z], axis=-1))))
  return weights


def authors_layer_loss(emb, labels, weights, tau, T):
  """Sup_MCL_Loss_Meta.forward after the embedding heads: plain sums over the combinations."""
  num_peers, num_stages = emb.shape[:2]
  total, count = np.zeros(4), 0
  for i in range(num_peers):
    for j in range(num_peers):
      if i == j:
        continue
      for k in range(num_stages):
        for z in range(num_stages):
          weight = weights[count][:, None]
          total += authors_sup_mcl(emb[i, k], emb[j, z], labels, weight, tau, T)
          count += 1
  return total


@pytest.mark.parametrize('num_peers,num_stages', [(2, 3), (3, 2)])
def test_layer_mcl_equals_the_authors_sums(num_peers, num_stages):
  """layer_match_weights + layer_mcl_loss give the authors' numbers (class-balanced labels: every
  anchor has a positive, as with their sampler), and the totals are SUMS with the multiplicities
  the authors' loop gives: each (peer, stage) VCL counted 2(K-1)S times, each cross-peer (node,
  node) ICL twice; K = 2, S = 3: 36 SupCon terms in VCL and in ICL where MCL has 2."""
  rng = np.random.default_rng(21)
  batch, dim, tau = 8, 5, 0.1
  labels = rng.permutation(np.arange(batch) // 2)
  emb = np_normalize(rng.normal(size=(num_peers, num_stages, batch, dim)))
  proj = rng.normal(size=(num_peers, num_stages, batch, 6))
  weights = authors_loss_weights(proj)
  expected = authors_layer_loss(emb, labels, weights, tau, T)
  with jax.enable_x64(True):

    def library(emb, proj, unit_weights):
      w = losses.layer_match_weights(proj)
      return losses.layer_mcl_loss(emb, labels, w, tau, T), losses.layer_mcl_loss(
          emb, labels, unit_weights, tau, T
      )

    ones = np.ones((num_peers * (num_peers - 1) * num_stages**2, batch))
    got, unit = jit_call(library, emb, proj, ones)
    assert_close(got, tuple(expected))
    assert_close(unit, tuple(authors_layer_loss(emb, labels, list(ones), tau, T)))
  pos, denom = ref_masks(labels)
  nodes = [(k, s) for k in range(num_peers) for s in range(num_stages)]
  vcl_nodes = sum(ref_supcon(emb[u] @ emb[u].T / tau, pos, denom) for u in nodes)
  icl_pairs = sum(
      ref_supcon(emb[u] @ emb[v].T / tau, pos, denom) for u in nodes for v in nodes if u[0] != v[0]
  )
  np.testing.assert_allclose(float(unit[0]), 2 * (num_peers - 1) * num_stages * vcl_nodes)
  np.testing.assert_allclose(float(unit[2]), 2 * icl_pairs)


# ------------------------------------------------------------------------------------------------
# L-MCL with memory banks (ImageNet, docs/methods.md#l-mcl-memory-bank).
# ------------------------------------------------------------------------------------------------


def ref_memory_layer(es, et, memory, idx, num_pos, w5, tau, T):
  """Explicit loop over (i, s, j != i, t); *_s student side, *_t stop-gradient targets."""
  num_peers, num_stages = es.shape[:2]
  num_cols = idx.shape[1]
  icl_pos = np.tile(np.arange(num_cols) < 1 + num_pos, (idx.shape[0], 1))
  vcl_pos = np.tile(np.arange(num_cols - 1) < num_pos, (idx.shape[0], 1))

  def v(e, s, k):  # V(M_k, e[k, s]): peer k's stage-s embedding against its own memory
    return ref_memory_logits(memory, idx, e[:, s], k, k, tau)[:, 1:]

  def cross(e, s, k, m):  # I(M_m, e[k, s])
    return ref_memory_logits(memory, idx, e[:, s], m, k, tau)

  total = np.zeros(4)
  for i in range(num_peers):
    for m, j in enumerate([j for j in range(num_peers) if j != i]):
      for s in range(num_stages):
        for t in range(num_stages):
          w = w5[i, m, s, t]
          vcl = ref_supcon(v(es, s, i), vcl_pos, np.ones_like(vcl_pos), w) + ref_supcon(
              v(es, t, j), vcl_pos, np.ones_like(vcl_pos), w
          )
          soft_vcl = ref_kl(v(es, s, i), v(et, t, j), T, w) + ref_kl(v(es, t, j), v(et, s, i), T, w)
          icl = ref_supcon(cross(es, s, i, j), icl_pos, np.ones_like(icl_pos), w) + ref_supcon(
              cross(es, t, j, i), icl_pos, np.ones_like(icl_pos), w
          )
          soft_icl = ref_kl(cross(es, s, i, j), cross(et, t, j, i), T, w) + ref_kl(
              cross(es, t, j, i), cross(et, s, i, j), T, w
          )
          total += np.array([vcl, soft_vcl, icl, soft_icl])
  return total


@pytest.mark.parametrize('num_peers,num_stages,num_pos', [(2, 3, 1), (3, 2, 2)])
def test_memory_layer_mcl_loss_matches_reference(num_peers, num_stages, num_pos):
  e, w5, _ = make_layer_inputs(num_peers, num_stages, 5, 4, seed=17)
  _, memory, idx = make_memory_inputs(num_peers, 5, 4, 20, num_pos, 6, seed=17)
  tau = 0.1
  with jax.enable_x64(True):
    actual = jit_call(
        lambda e, w: losses.memory_layer_mcl_loss(e, memory, idx, num_pos, w, tau, T),
        e,
        w5.reshape(-1, 5),
    )
    assert_close(actual, tuple(ref_memory_layer(e, e, memory, idx, num_pos, w5, tau, T)))


def test_memory_layer_mcl_gradients_match_finite_differences():
  num_pos, tau = 1, 0.2
  e_raw = np.random.default_rng(18).normal(size=(2, 2, 3, 3))
  _, w5, _ = make_layer_inputs(2, 2, 3, 3, seed=18)
  _, memory, idx = make_memory_inputs(2, 3, 3, 10, num_pos, 4, seed=18)
  e0 = np_normalize(e_raw)
  with jax.enable_x64(True):

    def lib(raw, w, mem):
      return jnp.stack(
          losses.memory_layer_mcl_loss(losses.l2_normalize(raw), mem, idx, num_pos, w, tau, T)
      )

    jac_emb, jac_w, jac_mem = jit_call(jax.jacrev(lib, argnums=(0, 1, 2)), e_raw, w5, memory)
    assert_close(jac_mem, np.zeros((4,) + memory.shape), atol=0)  # the memory is a constant
    for term in range(4):
      expected = fd_grad(
          lambda raw: ref_memory_layer(np_normalize(raw), e0, memory, idx, num_pos, w5, tau, T)[
              term
          ],
          e_raw,
      )
      assert np.abs(expected).max() > 1e-3
      assert_close(jac_emb[term], expected, rtol=1e-5, atol=1e-7)
      expected_w = fd_grad(
          lambda w: ref_memory_layer(e0, e0, memory, idx, num_pos, w, tau, T)[term], w5
      )
      assert_close(jac_w[term], expected_w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('num_peers', [2, 3])
def test_memory_layer_single_stage_relates_to_memory_mcl(num_peers):
  # S = 1, unit weights: as for the in-batch version, VCL counted 2(K-1) times, the rest twice.
  e, _, _ = make_layer_inputs(num_peers, 1, 5, 4, seed=19)
  _, memory, idx = make_memory_inputs(num_peers, 5, 4, 16, 1, 5, seed=19)
  ones = np.ones((num_peers * (num_peers - 1), 5))
  with jax.enable_x64(True):
    layer = jit_call(
        lambda e, w: losses.memory_layer_mcl_loss(e, memory, idx, 1, w, 0.07, T), e, ones
    )
    mcl = jit_call(lambda z: losses.memory_vcl_icl_losses(z, memory, idx, 1, 0.07, T), e[:, 0])
    mcl = {k: np.asarray(v) for k, v in mcl.items()}
    assert_close(
        layer,
        (
            2 * (num_peers - 1) * mcl['vcl'],
            2 * mcl['soft_vcl'],
            2 * mcl['icl'],
            2 * mcl['soft_icl'],
        ),
    )
