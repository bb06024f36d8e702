"""CRCD: complementary relation contrastive distillation (Zhu et al., CVPR 2021;
``docs/methods.md#crcd``).

Relations are anchor-based: the relation of an embedding ``e`` to an anchor ``a`` (a memory row of
one of the batch's examples) is ``nrm(e - a + 1e-6)``. The student relation ``e_s - A_t`` is
contrasted against the teacher-memory relations ``V_t[cidx] - A_t`` of the same anchor (NCE,
positive = the same example), and symmetrically for the teacher head. ``B`` batch (= number of
anchors ``A``), ``K`` negatives, ``F`` embedding width, ``N`` memory rows, ``D`` feature width.
"""

import jax
import jax.numpy as jnp

from mcl_jax.losses.mcl import _upcast, l2_normalize
from mcl_jax.losses.nce import nce_loss, normalising_constant

Array = jax.Array

# Added to every component of a difference before normalising (the reference code's shift). It is
# what gives the all-zero difference `V[i] - V[i]` (a key that is its own anchor) a direction.
RELATION_SHIFT = 1e-6


def crcd_relation_scores(query, anchors, keys, temperature, key_is_anchor) -> Array:
  """Unnormalised relation scores ``E[(b, a), k] = exp(<nrm(keys[b,k] - anchors[a] + 1e-6),
  nrm(query[b] - anchors[a] + 1e-6)> / T)``.

  The ``[B, A, K+1, F]`` key relations are never materialised: with ``v' = v + 1e-6`` the score
  is ``(<v', q_ba> - <a, q_ba>) / ||v' - a||`` and ``||v' - a||^2 = ||v'||^2 - 2<v', a> + ||a||^2``.
  Where a key IS its anchor (``v == a``; flagged by ``key_is_anchor``) that expansion loses the
  ``F * 1e-12`` norm to cancellation, so the exact value ``sum(q_ba) / sqrt(F)`` (the relation
  ``nrm(1e-6 * 1)``) is used instead.

  Args:
    query: ``[B, F]`` embeddings (receive the gradient).
    anchors: ``[A, F]`` anchor rows (detached).
    keys: ``[B, K + 1, F]`` memory rows (detached), column 0 the positive.
    temperature: ``T``.
    key_is_anchor: ``[B, A, K + 1]`` bool, ``keys[b, k]`` is the same memory row as ``anchors[a]``.

  Returns:
    ``[B * A, K + 1]``, rows in ``(b, a)`` order.
  """
  anchors = jax.lax.stop_gradient(_upcast(anchors))
  keys = jax.lax.stop_gradient(_upcast(keys)) + RELATION_SHIFT
  q = l2_normalize(_upcast(query)[:, None, :] - anchors[None] + RELATION_SHIFT)  # [B, A, F]
  numerator = jnp.einsum('bkf,baf->bak', keys, q) - jnp.einsum('af,baf->ba', anchors, q)[..., None]
  squared_norm = (
      jnp.sum(keys * keys, axis=-1)[:, None, :]
      - 2.0 * jnp.einsum('bkf,af->bak', keys, anchors)
      + jnp.sum(anchors * anchors, axis=-1)[None, :, None]
  )
  # Double where: the discarded branch must not produce a NaN gradient either.
  safe_norm = jnp.sqrt(jnp.where(key_is_anchor, 1.0, jnp.maximum(squared_norm, 1e-24)))
  self_relation = jnp.sum(q, axis=-1, keepdims=True) / jnp.sqrt(q.shape[-1])
  cosine = jnp.where(key_is_anchor, self_relation, numerator / safe_norm)
  return jnp.exp(cosine / temperature).reshape(-1, keys.shape[1])


def crcd_relation_loss(
    e_s, e_t, mem_s, mem_t, idx, contrast_idx, temperature=0.05, Z=None
) -> tuple[Array, Array]:
  """Relation contrastive loss of one distilled element (feature or gradient).

  ``P1``: student relations ``e_s - V_t[idx]`` against teacher-memory relations
  ``V_t[cidx] - V_t[idx]``; ``P2``: teacher relations ``e_t - V_s[idx]`` against
  ``V_s[cidx] - V_s[idx]``. Loss ``= nce_loss(P1) + nce_loss(P2)``, each a mean over the
  ``B * B`` (sample, anchor) rows.

  Args:
    e_s, e_t: ``[B, F]`` L2-normalised student / teacher embeddings.
    mem_s, mem_t: ``[N, F]`` student / teacher memory banks.
    idx: ``[B]`` int dataset indices of the batch (the anchors).
    contrast_idx: ``[B, K + 1]`` int, column 0 = ``idx``, then ``K`` other-class negatives.
    temperature: ``T``.
    Z: ``[2]`` normalising constants ``(Z1, Z2)``; None or entries <= 0 are computed from this
      batch (the first step; CRD keeps them fixed afterwards).

  Returns:
    ``(loss, Z_used [2])``.
  """
  n_data = mem_s.shape[0]
  key_is_anchor = contrast_idx[:, None, :] == idx[None, :, None]  # [B, A, K+1]
  Z = (None, None) if Z is None else (Z[0], Z[1])
  losses, Z_used = [], []
  for query, memory, z in ((e_s, mem_t, Z[0]), (e_t, mem_s, Z[1])):
    E = crcd_relation_scores(
        query,
        jnp.take(memory, idx, axis=0),
        jnp.take(memory, contrast_idx, axis=0),
        temperature,
        key_is_anchor,
    )
    z = normalising_constant(E, z, n_data)
    losses.append(nce_loss(E / z, n_data))
    Z_used.append(z)
  return losses[0] + losses[1], jnp.stack(Z_used)


def linear_ce_feature_grad(feat, W, b, labels) -> Array:
  """``d CE / d feat`` of a linear classifier, in closed form and itself differentiable.

  ``logits = feat W^T + b``, CE averaged over the batch, so
  ``grad = (softmax(logits) - onehot(labels)) @ W / B`` (each row carries the 1/B factor).

  Args:
    feat: ``[B, D]`` features.
    W: ``[C, D]`` classifier weights (a Flax kernel transposed).
    b: ``[C]`` bias.
    labels: ``[B]`` int.

  Returns:
    ``[B, D]``.
  """
  feat, W = _upcast(feat), _upcast(W)
  probs = jax.nn.softmax(feat @ W.T + _upcast(b), axis=-1)
  residual = probs - jax.nn.one_hot(labels, W.shape[0], dtype=probs.dtype)
  return residual @ W / feat.shape[0]
