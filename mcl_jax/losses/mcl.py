"""MCL and L-MCL losses: pure, jit-able functions of arrays.

Formulas, names and reductions are those of ``docs/methods.md`` (its MCL and L-MCL sections):

* contrastive terms are SUMS over peers / ordered peer pairs and MEANS over anchors;
* soft (distribution-transfer) terms are batch-mean KL(target || student) times ``T**2``, with the
  target side under ``stop_gradient``;
* an anchor without a positive contributes ``r = 0`` and is left out of the anchor mean; a term
  with no valid anchor is 0 (``docs/methods.md#anchors-without-positives``).

Shapes: ``K`` peers, ``S`` stages per peer, ``B`` batch, ``D`` embedding width, ``C`` classes,
``N`` memory-bank size. Embeddings are expected to be L2-normalised already (see
:func:`l2_normalize`). All arithmetic runs in at least float32 (bf16 inputs are upcast) and masked
log-sum-exps fill masked entries with ``-inf`` before reducing, so small temperatures
(``tau = 0.07``) cannot overflow and anchors without positives give NaN-free values AND gradients.

Pairwise peer terms are vectorised: one ``[K, K, B, B]`` similarity tensor
``X[k, l] = z_k z_l^T / tau`` holds every ordered pair, ``X[k, k]`` is peer k's intra-peer matrix,
the soft-ICL target of ``(k, l)`` is ``X[l, k]`` (peer axes swapped) and ``k == l`` is masked out.
"""

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _upcast(x) -> Array:
  """Returns ``x`` in at least float32 (bf16/f16 -> f32; f32 and f64 unchanged)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> Array:
  """``x / max(||x||_2, eps)`` along ``axis``, returned in ``x``'s dtype.

  Computed in at least float32; the clamp keeps value and gradient finite for a zero vector.
  """
  x = jnp.asarray(x)
  x32 = _upcast(x)
  squared_norm = jnp.sum(x32 * x32, axis=axis, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Primitives (P1) and (P2), row-wise, with arbitrary leading axes.
# ------------------------------------------------------------------------------------------------


def _supcon_rows(logits, pos_mask, denom_mask) -> tuple[Array, Array]:
  """Per-anchor mean log-probability of the positives.

  Args:
    logits: ``[..., B, N]`` similarity logits (rows = anchors).
    pos_mask, denom_mask: bool, broadcastable to ``logits``.

  Returns:
    ``(r, valid)``, both ``[..., B]``: ``r[a] = sum_c pos*logp / sum_c pos`` for valid anchors
    (>= 1 positive and a non-empty denominator), exactly 0 elsewhere.
  """
  logits = _upcast(logits)
  pos_mask = jnp.broadcast_to(pos_mask, logits.shape)
  denom_mask = jnp.broadcast_to(denom_mask, logits.shape)
  has_denom = jnp.any(denom_mask, axis=-1)
  # A row with an empty denominator would give logsumexp = -inf and a NaN gradient; it is invalid
  # anyway, so give it a finite dummy denominator (all columns).
  denom_mask = denom_mask | ~has_denom[..., None]
  log_denom = jax.nn.logsumexp(jnp.where(denom_mask, logits, -jnp.inf), axis=-1, keepdims=True)
  log_prob = logits - log_denom
  num_pos = jnp.sum(pos_mask, axis=-1).astype(logits.dtype)
  valid = (num_pos > 0) & has_denom
  pos_log_prob = jnp.sum(jnp.where(pos_mask, log_prob, 0.0), axis=-1)
  # where() on the divisor, not only on the result, keeps the gradient of invalid rows at 0.
  r = jnp.where(valid, pos_log_prob / jnp.where(valid, num_pos, 1.0), 0.0)
  return r, valid


def _supcon_reduce(r, valid, weights=None) -> Array:
  """``-sum_a w_a r_a / #valid`` over the last (anchor) axis; 0 when no anchor is valid."""
  if weights is not None:
    r = r * weights
  num_valid = jnp.sum(valid, axis=-1).astype(r.dtype)
  return -jnp.sum(r, axis=-1) / jnp.maximum(num_valid, 1.0)


def _soft_kl_rows(student_logits, target_logits, temperature) -> Array:
  """Per-row ``KL(softmax(sg(target)/T) || softmax(student/T))``: ``[..., B, N] -> [..., B]``."""
  student = _upcast(student_logits) / temperature
  target = jax.lax.stop_gradient(_upcast(target_logits)) / temperature
  log_ps = jax.nn.log_softmax(student, axis=-1)
  log_pt = jax.nn.log_softmax(target, axis=-1)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def _soft_kl_reduce(rows, temperature, weights=None) -> Array:
  """``T**2`` times the batch mean of (weighted) KL rows over the last axis (divides by B)."""
  if weights is not None:
    rows = rows * weights
  return temperature**2 * jnp.sum(rows, axis=-1) / rows.shape[-1]


def _intra_transfer_rows(intra, temperature) -> Array:
  """Soft-VCL KL rows for every (student p, target q): ``[P, B, N] -> [P, P, B]``."""
  return _soft_kl_rows(intra[:, None], intra[None, :], temperature)


def _cross_transfer_rows(cross, temperature) -> Array:
  """Soft-ICL KL rows of ``cross[p, q]`` against ``sg(cross[q, p])``: ``[P,P,B,N] -> [P,P,B]``."""
  return _soft_kl_rows(cross, jnp.swapaxes(cross, 0, 1), temperature)


def supcon_from_logits(logits, pos_mask, denom_mask, weights=None) -> Array:
  """Masked supervised-contrastive loss (P1).

  ``logp[a,c] = L[a,c] - log sum_c' Dm[a,c'] exp(L[a,c'])``,
  ``r[a] = w[a] * sum_c Pm[a,c] logp[a,c] / sum_c Pm[a,c]``, loss ``= -mean_a r[a]`` where the
  mean runs over anchors with >= 1 positive (others have r = 0; no valid anchor -> 0). The weight
  multiplies the numerator only. ``pos_mask`` is expected to be a subset of ``denom_mask``.

  Args:
    logits: ``[B, N]`` similarity logits (already divided by the temperature).
    pos_mask: ``[B, N]`` bool, positives of each anchor.
    denom_mask: ``[B, N]`` bool, columns in each anchor's denominator.
    weights: optional ``[B]`` per-anchor weights (default 1).

  Returns:
    Scalar loss (float32, or float64 for float64 inputs).
  """
  r, valid = _supcon_rows(logits, pos_mask, denom_mask)
  return _supcon_reduce(r, valid, weights)


def soft_kl(student_logits, target_logits, temperature, weights=None) -> Array:
  """Soft KL with temperature (P2): ``T^2/B * sum_a w_a KL(pt_a || ps_a)``.

  ``pt = softmax(sg(target)/T)``, ``ps = softmax(student/T)``; the target is stop-gradient inside;
  no column is masked.

  Args:
    student_logits, target_logits: ``[B, N]``.
    temperature: ``T``.
    weights: optional ``[B]`` per-row weights (the sum is still divided by B).

  Returns:
    Scalar.
  """
  rows = _soft_kl_rows(student_logits, target_logits, temperature)
  return _soft_kl_reduce(rows, temperature, weights)


# ------------------------------------------------------------------------------------------------
# MCL, in-batch negatives (section 2).
# ------------------------------------------------------------------------------------------------


def _in_batch_masks(labels, include_self_positive: bool = False) -> tuple[Array, Array]:
  """``(pos_mask, denom_mask)``, both ``[B, B]`` bool.

  Default: positives = same label without the anchor index, denominator = all but the anchor
  index. ``include_self_positive``: positives = same label including the diagonal, denominator =
  everything (docs/methods.md#mcl-choices).
  """
  labels = jnp.asarray(labels)
  same_label = labels[:, None] == labels[None, :]
  if include_self_positive:
    return same_label, jnp.ones_like(same_label)
  not_self = ~jnp.eye(labels.shape[0], dtype=bool)
  return same_label & not_self, not_self


def _intra_similarities(emb, tau) -> Array:
  """``A[k] = z_k z_k^T / tau``: ``[K, B, D] -> [K, B, B]`` (any leading axis, e.g. K*S nodes)."""
  z = _upcast(emb)
  return jnp.einsum('kbd,kcd->kbc', z, z) / tau


def _peer_similarities(emb, tau) -> Array:
  """``X[k, l] = z_k z_l^T / tau`` (anchor from k, contrast from l): ``[K,B,D] -> [K,K,B,B]``."""
  z = _upcast(emb)
  return jnp.einsum('kbd,lcd->klbc', z, z) / tau


def _sum_ordered_pairs(pair_terms) -> Array:
  """Sums a ``[K, K]`` table of pair terms over ``k != l``."""
  num_peers = pair_terms.shape[0]
  return jnp.sum(jnp.where(jnp.eye(num_peers, dtype=bool), 0.0, pair_terms))


def ce_loss(logits, labels) -> Array:
  """Cross-entropy summed over peers, mean over the batch.

  Args:
    logits: ``[K, B, C]``.
    labels: ``[B]`` int.

  Returns:
    Scalar ``sum_k mean_b CE(logits[k, b], labels[b])``.
  """
  log_probs = jax.nn.log_softmax(_upcast(logits), axis=-1)
  labels = jnp.broadcast_to(jnp.asarray(labels)[None, :, None], log_probs.shape[:-1] + (1,))
  label_log_probs = jnp.take_along_axis(log_probs, labels, axis=-1)[..., 0]  # [K, B]
  return -jnp.sum(jnp.mean(label_log_probs, axis=-1))


def vcl_loss(emb, labels, tau) -> Array:
  """Vanilla (intra-peer) contrastive loss: ``sum_k SupCon(z_k z_k^T / tau)``.

  VCL of docs/methods.md#mcl-in-batch-terms.

  Args:
    emb: ``[K, B, D]`` L2-normalised embeddings.
    labels: ``[B]`` int.
    tau: contrastive temperature.

  Returns:
    Scalar.
  """
  pos_mask, denom_mask = _in_batch_masks(labels)
  r, valid = _supcon_rows(_intra_similarities(emb, tau), pos_mask, denom_mask)
  return jnp.sum(_supcon_reduce(r, valid))


def icl_loss(emb, labels, tau, include_self_positive: bool = False) -> Array:
  """Interactive (cross-peer) contrastive loss, docs/methods.md#mcl-in-batch-terms.

  ``sum_{k != l} SupCon(z_k z_l^T / tau)``: anchor ``z_k[a]``, contrast set from peer l.

  Args:
    emb: ``[K, B, D]`` L2-normalised embeddings.
    labels: ``[B]`` int.
    tau: contrastive temperature.
    include_self_positive: False (official CIFAR code): the same sample seen by the other peer is
      excluded from positives and denominator. True: it is a positive and the denominator is the
      whole contrast set (docs/methods.md#mcl-choices).

  Returns:
    Scalar.
  """
  pos_mask, denom_mask = _in_batch_masks(labels, include_self_positive)
  r, valid = _supcon_rows(_peer_similarities(emb, tau), pos_mask, denom_mask)
  return _sum_ordered_pairs(_supcon_reduce(r, valid))


def soft_vcl_loss(emb, tau, T) -> Array:
  """Soft VCL, docs/methods.md#mcl-in-batch-terms: ``sum_{k != l} KL_T(A_k || sg(A_l))``.

  ``A_k = z_k z_k^T / tau``; full rows (diagonal included).

  Args:
    emb: ``[K, B, D]`` L2-normalised embeddings.
    tau: contrastive temperature.
    T: KL temperature.

  Returns:
    Scalar.
  """
  rows = _intra_transfer_rows(_intra_similarities(emb, tau), T)  # [K (student), K (target), B]
  return _sum_ordered_pairs(_soft_kl_reduce(rows, T))


def soft_icl_loss(emb, tau, T) -> Array:
  """Soft ICL, docs/methods.md#mcl-in-batch-terms: ``sum_{k != l} KL_T(X_{k,l} || sg(X_{l,k}))``.

  ``X_{k,l} = z_k z_l^T / tau``: row a of the student is anchor ``z_k[a]`` against all of peer l,
  row a of the target is anchor ``z_l[a]`` against all of peer k. Full rows (diagonal included).

  Args:
    emb: ``[K, B, D]`` L2-normalised embeddings.
    tau: contrastive temperature.
    T: KL temperature.

  Returns:
    Scalar.
  """
  rows = _cross_transfer_rows(_peer_similarities(emb, tau), T)  # [K, K, B]
  return _sum_ordered_pairs(_soft_kl_reduce(rows, T))


def logit_kd_loss(logits, T) -> Array:
  """Logit KD, docs/methods.md#mcl-logit-kd: ``sum_k KL_T(logits_k || sg(mean_l logits_l))``.

  All peers distil from the stop-gradient ensemble (not the official CIFAR K > 2 / ImageNet quirks,
  docs/methods.md#mcl-choices).

  Args:
    logits: ``[K, B, C]``.
    T: KL temperature.

  Returns:
    Scalar.
  """
  logits = _upcast(logits)
  ensemble = jnp.mean(logits, axis=0, keepdims=True)  # stop-gradient inside _soft_kl_rows
  return jnp.sum(_soft_kl_reduce(_soft_kl_rows(logits, ensemble, T), T))


def mcl_loss(
    emb,
    logits,
    labels,
    *,
    tau,
    T,
    alpha,
    beta,
    gamma,
    lam,
    logit_kd: bool,
    include_self_positive: bool = False
) -> tuple[Array, dict[str, Array]]:
  """Total MCL objective, docs/methods.md#mcl-total-loss.

  ``total = ce + kd + alpha*vcl + gamma*soft_vcl + beta*icl + lam*soft_icl``.

  Args:
    emb: ``[K, B, D]`` L2-normalised embeddings.
    logits: ``[K, B, C]`` class logits.
    labels: ``[B]`` int.
    tau, T: contrastive and KL temperatures.
    alpha, beta, gamma, lam: weights of vcl, icl, soft_vcl, soft_icl.
    logit_kd: static bool; add :func:`logit_kd_loss` (``kd`` is 0 otherwise).
    include_self_positive: forwarded to :func:`icl_loss`.

  Returns:
    ``(total, terms)``; ``terms`` holds the UNweighted ``ce, vcl, icl, soft_vcl, soft_icl, kd``.
  """
  ce = ce_loss(logits, labels)
  terms = {
      'ce': ce,
      'vcl': vcl_loss(emb, labels, tau),
      'icl': icl_loss(emb, labels, tau, include_self_positive),
      'soft_vcl': soft_vcl_loss(emb, tau, T),
      'soft_icl': soft_icl_loss(emb, tau, T),
      'kd': logit_kd_loss(logits, T) if logit_kd else jnp.zeros_like(ce),
  }
  total = (
      terms['ce']
      + terms['kd']
      + alpha * terms['vcl']
      + gamma * terms['soft_vcl']
      + beta * terms['icl']
      + lam * terms['soft_icl']
  )
  return total, terms


# ------------------------------------------------------------------------------------------------
# MCL, memory-bank variant (section 2.1).
# ------------------------------------------------------------------------------------------------


def memory_vcl_icl_losses(emb, memory, idx, num_pos: int, tau, T) -> dict[str, Array]:
  """Memory-bank VCL / ICL and their soft versions, docs/methods.md#mcl-memory-bank.

  Column 0 of ``idx`` is the sample's own slot, columns ``1..num_pos`` same-class slots, the rest
  negatives. With ``I[k, l][b, :] = M_k[idx[b]] . z_l[b] / tau`` (contrast = memory of peer k,
  anchor = live embedding of peer l):

  * ``icl = sum_{k != l} SupCon(I[k, l])``, positives = first ``1 + num_pos`` columns;
  * ``vcl = sum_k SupCon(V_k)``, ``V_k = I[k, k][:, 1:]`` (own slot dropped), positives = first
    ``num_pos`` columns;
  * ``soft_vcl = sum_{k != l} KL_T(V_k || sg V_l)``;
  * ``soft_icl = sum_{k != l} KL_T(I[k, l] || sg I[l, k])``.

  The memory is stop-gradient (it receives no gradient).

  Args:
    emb: ``[K, B, D]`` L2-normalised live embeddings.
    memory: ``[K, N, D]`` per-peer memory banks (any float dtype; upcast after the gather).
    idx: ``[B, 1 + P + Q]`` int memory indices per sample.
    num_pos: static int ``P``.
    tau, T: contrastive and KL temperatures.

  Returns:
    ``dict(vcl, soft_vcl, icl, soft_icl)`` of scalars.
  """
  z = _upcast(emb)
  bank = jax.lax.stop_gradient(_upcast(jnp.take(memory, idx, axis=1)))  # [K, B, J, D]
  num_cols = idx.shape[-1]
  columns = np.arange(num_cols)
  all_columns = np.ones(num_cols, dtype=bool)

  cross = jnp.einsum('kbjd,lbd->klbj', bank, z) / tau  # [K (memory), K (live), B, J]
  r, valid = _supcon_rows(cross, columns < 1 + num_pos, all_columns)
  icl = _sum_ordered_pairs(_supcon_reduce(r, valid))
  soft_icl = _sum_ordered_pairs(_soft_kl_reduce(_cross_transfer_rows(cross, T), T))

  intra = jnp.einsum('kbjd,kbd->kbj', bank[:, :, 1:], z) / tau  # [K, B, J - 1]
  r, valid = _supcon_rows(intra, columns[:-1] < num_pos, all_columns[:-1])
  vcl = jnp.sum(_supcon_reduce(r, valid))
  soft_vcl = _sum_ordered_pairs(_soft_kl_reduce(_intra_transfer_rows(intra, T), T))
  return {'vcl': vcl, 'soft_vcl': soft_vcl, 'icl': icl, 'soft_icl': soft_icl}


def memory_update(memory, emb, own_idx, momentum) -> Array:
  """Momentum update of every peer's memory slots (no gradient), docs/methods.md#mcl-memory-bank.

  ``M_k[n_b] <- normalise(m * M_k[n_b] + (1 - m) * z_k[b])`` for every peer k and sample b, the
  old entry read before any write. Duplicate indices within the batch: the LAST occurrence in
  batch order wins (as in the official code); earlier occurrences are dropped explicitly, so the
  result is deterministic on every backend.

  Args:
    memory: ``[K, N, D]``.
    emb: ``[K, B, D]`` embeddings (stop-gradient).
    own_idx: ``[B]`` int slot of each sample, in ``[0, N)``.
    momentum: ``m``.

  Returns:
    The updated ``[K, N, D]`` memory, in ``memory``'s dtype.
  """
  memory = jnp.asarray(memory)
  own_idx = jnp.asarray(own_idx)
  old = _upcast(jnp.take(memory, own_idx, axis=1))  # [K, B, D]
  new = l2_normalize(momentum * old + (1.0 - momentum) * _upcast(jax.lax.stop_gradient(emb)))
  same_slot = own_idx[:, None] == own_idx[None, :]
  has_later_duplicate = jnp.any(jnp.triu(same_slot, k=1), axis=1)  # O(B^2), B = global batch
  # Out-of-range index + mode='drop' discards the superseded writes.
  target = jnp.where(has_later_duplicate, memory.shape[1], own_idx)
  return memory.at[:, target].set(new.astype(memory.dtype), mode='drop')


# ------------------------------------------------------------------------------------------------
# L-MCL (sections 1.2 and 3.1).
# ------------------------------------------------------------------------------------------------


def _other_peers(num_peers: int) -> np.ndarray:
  """``others[i, m]``: the m-th peer of ``range(K)`` skipping i, ``[K, K-1]``."""
  m = np.arange(num_peers - 1)[None, :]
  return m + (m >= np.arange(num_peers)[:, None])


def layer_match_weights(proj_feats) -> Array:
  """Per-sample layer-matching weights ``sigmoid(cos(p_{i,s}[b], p_{j,t}[b]))``.

  See docs/methods.md#l-mcl-layer-matching.

  Args:
    proj_feats: ``[K, S, B, H]`` projected raw stage features ``P_{k,s} f_{k,s}``.

  Returns:
    ``[K*(K-1)*S*S, B]``; flat order: i over peers, j over peers skipping i, s over stages of i,
    t over stages of j (``reshape(K, K-1, S, S, B)`` recovers the axes).
  """
  num_peers, num_stages, batch = proj_feats.shape[:3]
  unit = l2_normalize(_upcast(proj_feats))
  cos = jnp.einsum('isbh,jtbh->ijstb', unit, unit)  # [K, K, S, S, B]
  cos = cos[np.arange(num_peers)[:, None], _other_peers(num_peers)]  # [K, K-1, S, S, B]
  return jax.nn.sigmoid(cos).reshape(num_peers * (num_peers - 1) * num_stages**2, batch)


def _node_pair_weights(w, num_peers: int, num_stages: int) -> Array:
  """Layer weights as a ``[K*S, K*S, B]`` table over (peer, stage) nodes ``u = k*S + s``.

  ``W[u, v]`` = weight of the combination (ea = node u, eb = node v); 0 for same-peer pairs.
  """
  batch = w.shape[-1]
  w = w.reshape(num_peers, num_peers - 1, num_stages, num_stages, batch)
  full = (
      jnp.zeros((num_peers, num_peers) + w.shape[2:], w.dtype)
      .at[np.arange(num_peers)[:, None], _other_peers(num_peers)]
      .set(w)
  )  # [K (i), K (j), S, S, B]
  nodes = num_peers * num_stages
  return jnp.transpose(full, (0, 2, 1, 3, 4)).reshape(nodes, nodes, batch)


def pair_mcl_terms(ea, eb, labels, w, tau, T) -> tuple[Array, Array, Array, Array]:
  """The four MCL terms of one combination (i, s, j, t), docs/methods.md#l-mcl-layer-wise-terms.

  With ``Aa = ea ea^T/tau``, ``Ab = eb eb^T/tau``, ``Xab = ea eb^T/tau``, ``Xba = Xab^T`` and the
  per-anchor weight ``w`` on every row:
  ``vcl = SupCon_w(Aa) + SupCon_w(Ab)``, ``soft_vcl = KL_w(Aa||sg Ab) + KL_w(Ab||sg Aa)``,
  ``icl = SupCon_w(Xab) + SupCon_w(Xba)``, ``soft_icl = KL_w(Xab||sg Xba) + KL_w(Xba||sg Xab)``.

  Args:
    ea, eb: ``[B, D]`` L2-normalised embeddings.
    labels: ``[B]`` int.
    w: ``[B]`` per-sample weights (None = 1).
    tau, T: contrastive and KL temperatures.

  Returns:
    ``(vcl, soft_vcl, icl, soft_icl)`` scalars.
  """
  a, b = _upcast(ea), _upcast(eb)
  pos_mask, denom_mask = _in_batch_masks(labels)
  aa, bb, ab = a @ a.T / tau, b @ b.T / tau, a @ b.T / tau
  ba = ab.T

  def supcon(logits):
    return supcon_from_logits(logits, pos_mask, denom_mask, w)

  vcl = supcon(aa) + supcon(bb)
  soft_vcl = soft_kl(aa, bb, T, w) + soft_kl(bb, aa, T, w)
  icl = supcon(ab) + supcon(ba)
  soft_icl = soft_kl(ab, ba, T, w) + soft_kl(ba, ab, T, w)
  return vcl, soft_vcl, icl, soft_icl


def layer_mcl_loss(emb, labels, w, tau, T) -> tuple[Array, Array, Array, Array]:
  """L-MCL totals: :func:`pair_mcl_terms` summed over all K(K-1)S^2 combinations.

  See docs/methods.md#l-mcl-layer-wise-terms.

  Vectorised over (peer, stage) nodes ``u = k*S + s``: every term is linear in the per-anchor
  weights, so ``sum_{(u,v)} W[u,v] (term(u,v) + term'(v,u))`` collapses to a contraction of
  per-row terms with ``W + W^T`` (same-peer pairs carry weight 0). Differentiable in ``w``
  (the caller applies stop-gradient to ``w`` in the main step, not in the meta step).

  Args:
    emb: ``[K, S, B, D]`` L2-normalised embeddings ``e_{k,s}``.
    labels: ``[B]`` int.
    w: ``[K, K-1, S, S, B]`` or flat ``[K*(K-1)*S*S, B]`` (:func:`layer_match_weights` order).
    tau, T: contrastive and KL temperatures.

  Returns:
    ``(vcl, soft_vcl, icl, soft_icl)`` scalars.
  """
  num_peers, num_stages, batch, dim = emb.shape
  nodes = num_peers * num_stages
  z = _upcast(emb).reshape(nodes, batch, dim)
  pair_w = _node_pair_weights(_upcast(w), num_peers, num_stages)  # [M, M, B], M = K*S
  sym_w = pair_w + jnp.swapaxes(pair_w, 0, 1)
  pos_mask, denom_mask = _in_batch_masks(labels)

  intra = _intra_similarities(z, tau)  # [M, B, B]
  cross = _peer_similarities(z, tau)  # [M, M, B, B]

  # A_u is `ea` of (u, v) with weight W[u, v] and `eb` of (v, u) with weight W[v, u].
  r, valid = _supcon_rows(intra, pos_mask, denom_mask)
  vcl = jnp.sum(_supcon_reduce(r, valid, jnp.sum(sym_w, axis=1)))
  r, valid = _supcon_rows(cross, pos_mask, denom_mask)
  icl = jnp.sum(_supcon_reduce(r, valid, sym_w))
  soft_vcl = jnp.sum(_soft_kl_reduce(_intra_transfer_rows(intra, T), T, sym_w))
  soft_icl = jnp.sum(_soft_kl_reduce(_cross_transfer_rows(cross, T), T, sym_w))
  return vcl, soft_vcl, icl, soft_icl


def _soft_kl_cross_entropy_rows(student_logits, target_logits, temperature, spec: str) -> Array:
  """KL rows ``KL(softmax(sg t/T) || softmax(s/T))`` for every pairing that `spec` (an einsum of the
  target's and the student's ``[..., B, N]`` into the output) names, without materialising the
  pairs' ``[..., B, N]`` products: ``KL = sum_n pt log pt - sum_n pt log ps``."""
  log_ps = jax.nn.log_softmax(_upcast(student_logits) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(_upcast(target_logits)) / temperature, axis=-1)
  pt = jnp.exp(log_pt)
  neg_entropy = jnp.sum(pt * log_pt, axis=-1)
  return neg_entropy, jnp.einsum(spec, pt, log_ps)


def memory_layer_mcl_loss(
    emb, memory, idx, num_pos: int, w, tau, T
) -> tuple[Array, Array, Array, Array]:
  """ImageNet L-MCL totals, docs/methods.md#l-mcl-memory-bank.

  Every combination (ea = e_{i,s}, eb = e_{j,t}, i != j) with per-anchor weight w contributes
  ``SupCon_w(V(M_i, ea)) + SupCon_w(V(M_j, eb))`` (VCL), ``KL_w(V(M_i, ea) || sg V(M_j, eb))`` and
  the reverse (SoftVCL), ``SupCon_w(I(M_j, ea)) + SupCon_w(I(M_i, eb))`` (ICL) and
  ``KL_w(I(M_j, ea) || sg I(M_i, eb))`` and the reverse (SoftICL), where ``I(M_k, z)[b] =
  M_k[idx[b]] . z[b] / tau`` (positives: the first ``1 + num_pos`` columns) and ``V(M_k, z)`` is
  the same without the own slot (positives: the first ``num_pos`` columns). Every stage of peer k
  queries the memory of peer k (the official code's "first peer's memory" quirk is not
  reproduced, docs/methods.md#l-mcl-choices). Sums over all K(K-1)S^2 combinations, vectorised
  like :func:`layer_mcl_loss`; the soft terms contract the target's probabilities with the student's
  log-probabilities by einsum, so no ``[KS, KS, B, J]`` tensor is formed. The memory is
  stop-gradient.

  Args:
    emb: ``[K, S, B, D]`` L2-normalised live embeddings.
    memory: ``[K, N, D]`` per-peer memory banks.
    idx: ``[B, 1 + P + Q]`` memory indices (own slot, P same-class, Q negatives).
    num_pos: static ``P``.
    w: layer weights, :func:`layer_match_weights` order.
    tau, T: contrastive and KL temperatures.

  Returns:
    ``(vcl, soft_vcl, icl, soft_icl)`` scalars.
  """
  num_peers, num_stages, batch, _ = emb.shape
  z = _upcast(emb)
  bank = jax.lax.stop_gradient(_upcast(jnp.take(memory, idx, axis=1)))  # [K, B, J, D]
  pair_w = _node_pair_weights(_upcast(w), num_peers, num_stages)  # [M, M, B]
  sym_w = pair_w + jnp.swapaxes(pair_w, 0, 1)
  # sym_w as [i, s, j, t, B]; and summed over the stages of the other node's peer.
  sym_w = sym_w.reshape(num_peers, num_stages, num_peers, num_stages, batch)
  w_to_peer = jnp.sum(sym_w, axis=3)  # [i, s, j, B]
  columns = np.arange(idx.shape[-1])
  all_columns = np.ones(idx.shape[-1], dtype=bool)

  # I(M_j, e_{i,s}): [i, s, j, B, J]. For u = (i, s) only j != i carries weight.
  cross = jnp.einsum('jbnd,isbd->isjbn', bank, z) / tau
  r, valid = _supcon_rows(cross, columns < 1 + num_pos, all_columns)
  icl = jnp.sum(_supcon_reduce(r, valid, w_to_peer))
  # KL(I(M_j, e_{i,s}) || sg I(M_i, e_{j,t})): target [j, t, i, B, J], student [i, s, j, B, J].
  neg_entropy, cross_ent = _soft_kl_cross_entropy_rows(cross, cross, T, 'jtibn,isjbn->isjtb')
  rows = jnp.transpose(neg_entropy, (2, 0, 1, 3))[:, None] - cross_ent  # [i, s, j, t, B]
  soft_icl = jnp.sum(_soft_kl_reduce(rows, T, sym_w))

  # V(M_i, e_{i,s}): [i, s, B, J - 1].
  intra = jnp.einsum('ibnd,isbd->isbn', bank[:, :, 1:], z) / tau
  r, valid = _supcon_rows(intra, columns[:-1] < num_pos, all_columns[:-1])
  vcl = jnp.sum(_supcon_reduce(r, valid, jnp.sum(w_to_peer, axis=2)))
  neg_entropy, cross_ent = _soft_kl_cross_entropy_rows(intra, intra, T, 'jtbn,isbn->isjtb')
  rows = neg_entropy[None, None] - cross_ent  # [i, s, j, t, B]
  soft_vcl = jnp.sum(_soft_kl_reduce(rows, T, sym_w))
  return vcl, soft_vcl, icl, soft_icl
