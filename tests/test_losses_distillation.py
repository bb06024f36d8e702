"""MCL-OKD, CKD and CRCD losses against independent float64 NumPy implementations, their gradients
against central finite differences, and the NCE memory update (docs/methods.md, NCE to CRCD)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _contrast_idx(rng, idx, labels, num_neg):
  """Column 0 the own index, then other-class negatives (as the samplers do)."""
  rows = []
  for i in idx:
    pool = np.flatnonzero(labels != labels[i])
    rows.append(np.concatenate([[i], rng.choice(pool, num_neg, replace=False)]))
  return np.asarray(rows, np.int32)


def _np_nce(P, n_data, eps=1e-7):
  m = P.shape[1] - 1
  noise = m / n_data
  pos = np.log(P[:, 0] / (P[:, 0] + noise + eps))
  neg = np.log(noise / (P[:, 1:] + noise + eps)).sum(1)
  return -np.mean(pos + neg)


def _np_kl_T(student, target, T):
  def log_softmax(x):
    x = x / T
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  ls, lt = log_softmax(student), log_softmax(target)
  return T**2 * np.sum(np.exp(lt) * (lt - ls)) / student.shape[0]


def _check_grad(f, x, reference=None, seed=0, h=1e-6, rtol=1e-6):
  """Directional derivative at x along a random direction: jax.grad of f vs central differences
  of `reference` (default f). Stop-gradient quantities (a batch Z, an online teacher) are held at
  their value at x in `reference`, which is what the gradient means."""
  reference = reference or f
  x = np.asarray(x)
  v = np.random.default_rng(seed).normal(size=x.shape)
  analytic = float(jnp.vdot(jax.grad(f)(jnp.asarray(x)), v))
  numeric = (float(reference(x + h * v)) - float(reference(x - h * v))) / (2 * h)
  np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=1e-9)


@pytest.fixture
def problem():
  """A small memory-bank problem: N=40 examples of 4 classes, B=5, K=6 negatives, F=8."""
  rng = np.random.default_rng(0)
  n, b, k, f, c = 40, 5, 6, 8, 4
  labels = np.arange(n) % c
  idx = rng.choice(n, b, replace=False).astype(np.int32)
  cidx = _contrast_idx(rng, idx, labels, k)
  cidx[0, 1] = idx[2] if labels[idx[2]] != labels[idx[0]] else cidx[0, 1]  # a negative = an anchor
  mem = _unit(rng.normal(size=(3, n, f)))
  emb = _unit(rng.normal(size=(3, b, f)))
  return dict(
      rng=rng,
      n=n,
      labels=labels,
      idx=idx,
      cidx=cidx,
      mem=mem,
      emb=emb,
      logits=rng.normal(size=(3, b, 10)) * 3,
  )


# ---------------------------------------------------------------------------------------------- #
# NCE building block
# ---------------------------------------------------------------------------------------------- #
def test_nce_scores_and_loss_match_numpy(problem):
  p = problem
  q, V = p['emb'][0], p['mem'][0]
  keys = V[p['cidx']]
  E = np.exp(np.einsum('bkf,bf->bk', keys, q) / 0.1)
  with jax.enable_x64(True):
    P, Z = losses.nce_scores(q, keys, 0.1, None, p['n'])
    np.testing.assert_allclose(Z, E.mean() * p['n'], rtol=1e-12)
    np.testing.assert_allclose(P, E / (E.mean() * p['n']), rtol=1e-12)
    np.testing.assert_allclose(losses.nce_loss(P, p['n']), _np_nce(E / Z, p['n']), rtol=1e-12)
    # A given Z is used as is; a non-positive one means "from this batch".
    P7, Z7 = losses.nce_scores(q, keys, 0.1, jnp.float64(7.0), p['n'])
    assert float(Z7) == 7.0
    np.testing.assert_allclose(P7, E / 7.0, rtol=1e-12)
    np.testing.assert_allclose(
        losses.nce_scores(q, keys, 0.1, jnp.float64(0.0), p['n'])[1], Z, rtol=1e-12
    )
    _check_grad(
        lambda x: losses.nce_loss(losses.nce_scores(x, keys, 0.1, None, p['n'])[0], p['n']),
        q,
        lambda x: _np_nce(np.exp(np.einsum('bkf,bf->bk', keys, x) / 0.1) / float(Z), p['n']),
    )


def test_nce_memory_update_is_exact(problem):
  p = problem
  V, idx, feats = p['mem'][0], p['idx'], p['emb'][1]
  with jax.enable_x64(True):
    new = np.asarray(losses.nce_memory_update(V, idx, feats, 0.5))
  expected = V.copy()
  expected[idx] = _unit(0.5 * V[idx] + 0.5 * feats)
  untouched = np.setdiff1d(np.arange(p['n']), idx)
  np.testing.assert_array_equal(new[untouched], V[untouched])
  np.testing.assert_allclose(new[idx], expected[idx], rtol=1e-14, atol=1e-15)
  # No gradient flows into the memory update.
  grad = jax.grad(lambda f: jnp.sum(losses.nce_memory_update(V, idx, f, 0.5)))(feats)
  np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------------------------------------- #
# MCL-OKD
# ---------------------------------------------------------------------------------------------- #
def _np_mcl_okd(emb, mem, cidx, T, Z=None):
  """Sum of NCE over ordered pairs; Z[i, j] given or from the batch. Returns (loss, Z)."""
  M, n = mem.shape[:2]
  total, Z_used = 0.0, np.zeros((M, M))
  for i in range(M):
    for j in range(M):
      if i == j:
        continue
      E = np.exp(np.einsum('bkf,bf->bk', mem[i][cidx], emb[j]) / T)
      Z_used[i, j] = E.mean() * n if Z is None else Z[i, j]
      total += _np_nce(E / Z_used[i, j], n)
  return total, Z_used


def test_mcl_okd_contrastive_loss_matches_numpy_and_fd(problem):
  p = problem
  with jax.enable_x64(True):
    got = losses.mcl_okd_contrastive_loss(p['emb'], p['mem'], p['cidx'], 0.1)
    expected, Z = _np_mcl_okd(p['emb'], p['mem'], p['cidx'], 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    _check_grad(
        lambda e: losses.mcl_okd_contrastive_loss(e, p['mem'], p['cidx'], 0.1),
        p['emb'],
        lambda e: _np_mcl_okd(e, p['mem'], p['cidx'], 0.1, Z)[0],
    )
    # The memories receive no gradient.
    g = jax.grad(lambda m: losses.mcl_okd_contrastive_loss(p['emb'], m, p['cidx'], 0.1))(p['mem'])
    np.testing.assert_array_equal(g, 0.0)


def test_dot_loss_distils_only_the_last_view_from_the_ensemble(problem):
  logits = problem['logits']
  with jax.enable_x64(True):
    got = losses.dot_loss(logits, 3.0)
    np.testing.assert_allclose(got, _np_kl_T(logits[-1], logits.mean(0), 3.0), rtol=1e-12)
    grad = jax.grad(lambda z: losses.dot_loss(z, 3.0))(jnp.asarray(logits))
    np.testing.assert_array_equal(grad[:-1], 0.0)  # the online teacher is stop-gradient
    _check_grad(
        lambda z: losses.dot_loss(z, 3.0), logits, lambda z: _np_kl_T(z[-1], logits.mean(0), 3.0)
    )


# ---------------------------------------------------------------------------------------------- #
# CKD
# ---------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize('tau', [1.0, 2.0])
def test_ckd_loss_matches_numpy_and_fd(problem, tau):
  zs, zt = problem['logits'][0], problem['logits'][1]
  S = _unit(zt) @ _unit(zs).T / tau
  expected = np.mean(np.log(np.exp(S).sum(1)) - np.diag(S))
  with jax.enable_x64(True):
    np.testing.assert_allclose(losses.ckd_loss(zs, zt, tau), expected, rtol=1e-12)
    _check_grad(lambda z: losses.ckd_loss(z, zt, tau), zs)
    g_teacher = jax.grad(lambda t: losses.ckd_loss(zs, t, tau))(jnp.asarray(zt))
    np.testing.assert_array_equal(g_teacher, 0.0)


# ---------------------------------------------------------------------------------------------- #
# CRCD
# ---------------------------------------------------------------------------------------------- #
def _np_crcd_side(query, mem, idx, cidx, T, n, Z=None):
  """Literal [B, B, K+1, F] relations, as the reference code computes them."""
  anchors = mem[idx]
  q = _unit(query[:, None, :] - anchors[None] + 1e-6)  # [B, A, F]
  k = _unit(mem[cidx][:, None, :, :] - anchors[None, :, None, :] + 1e-6)  # [B, A, K+1, F]
  E = np.exp(np.einsum('bakf,baf->bak', k, q) / T).reshape(-1, cidx.shape[1])
  Z = E.mean() * n if Z is None else Z
  return _np_nce(E / Z, n), Z


def _np_crcd(e_s, e_t, mem_s, mem_t, idx, cidx, T, n, Z=(None, None)):
  l1, z1 = _np_crcd_side(e_s, mem_t, idx, cidx, T, n, Z[0])
  l2, z2 = _np_crcd_side(e_t, mem_s, idx, cidx, T, n, Z[1])
  return l1 + l2, np.array([z1, z2])


def test_crcd_relation_loss_matches_literal_numpy(problem):
  p = problem
  args = (p['emb'][0], p['emb'][1], p['mem'][0], p['mem'][1], p['idx'], p['cidx'])
  expected, expected_z = _np_crcd(*args, 0.05, p['n'])
  with jax.enable_x64(True):
    got, z = losses.crcd_relation_loss(*args, temperature=0.05)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_allclose(z, expected_z, rtol=1e-10)
    # A frozen Z (later steps) is used as given.
    got_frozen, z_frozen = losses.crcd_relation_loss(*args, temperature=0.05, Z=2 * expected_z)
    np.testing.assert_array_equal(z_frozen, 2 * expected_z)
    np.testing.assert_allclose(
        got_frozen, _np_crcd(*args, 0.05, p['n'], 2 * expected_z)[0], rtol=1e-10
    )
  # float32 (the training dtype): the key == anchor rows stay exact despite the 1e-6 shift.
  got32, _ = losses.crcd_relation_loss(
      *(np.float32(a) if a.dtype == np.float64 else a for a in args), temperature=0.05
  )
  assert np.isfinite(float(got32))
  np.testing.assert_allclose(got32, expected, rtol=2e-4)


def test_crcd_relation_loss_gradient_matches_fd(problem):
  p = problem
  mems = (p['mem'][0], p['mem'][1], p['idx'], p['cidx'])
  _, Z = _np_crcd(p['emb'][0], p['emb'][1], *mems, 0.05, p['n'])
  with jax.enable_x64(True):

    def loss(e_s, e_t):
      return losses.crcd_relation_loss(e_s, e_t, *mems, 0.05)[0]

    def reference(e_s, e_t):
      return _np_crcd(e_s, e_t, *mems, 0.05, p['n'], Z)[0]

    _check_grad(lambda e: loss(e, p['emb'][1]), p['emb'][0], lambda e: reference(e, p['emb'][1]))
    _check_grad(
        lambda e: loss(p['emb'][0], e), p['emb'][1], lambda e: reference(p['emb'][0], e), seed=1
    )
  grads = jax.grad(
      lambda e: losses.crcd_relation_loss(
          e,
          np.float32(p['emb'][1]),
          np.float32(p['mem'][0]),
          np.float32(p['mem'][1]),
          p['idx'],
          p['cidx'],
      )[0]
  )(np.float32(p['emb'][0]))
  assert np.all(np.isfinite(grads))


def test_linear_ce_feature_grad_is_the_ce_gradient_and_differentiable(problem):
  rng = problem['rng']
  b, d, c = 5, 6, 4
  feat, W, bias = rng.normal(size=(b, d)), rng.normal(size=(c, d)), rng.normal(size=c)
  labels = rng.integers(0, c, b)

  def ce(f, W_, b_):
    logp = jax.nn.log_softmax(f @ W_.T + b_)
    return -jnp.mean(logp[jnp.arange(b), labels])

  logits = feat @ W.T + bias
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  expected = (probs - np.eye(c)[labels]) @ W / b
  with jax.enable_x64(True):
    got = losses.linear_ce_feature_grad(feat, W, bias, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got, jax.grad(ce)(feat, W, bias), rtol=1e-12)
    # Double backprop: the gradient element is itself differentiable in W and the feature.
    R = rng.normal(size=(b, d))
    _check_grad(lambda w: jnp.sum(losses.linear_ce_feature_grad(feat, w, bias, labels) * R), W)
    _check_grad(lambda f: jnp.sum(losses.linear_ce_feature_grad(f, W, bias, labels) * R), feat)
