"""Self-supervised MCL: K MoCo learners teaching each other (docs/methods.md#self-supervised-mcl).

Pure, jit-able functions of arrays. ``K`` peers, ``N`` the global batch, ``Q`` the queue length,
``D`` the embedding width. Every peer i has queries ``q_i`` (its query encoder on one view, with
gradient), keys ``k_i`` (its momentum key encoder on the other view) and a queue ``queue_i`` of
earlier keys. For every ordered pair (i, j), including i == j, the logits are

    logits[i, j] = concat([<q_i[n], k_j[n]>], [<q_i[n], queue_j[m]> for m < Q]) / tau

``[N, 1 + Q]`` with the positive in column 0; ``logits[i, i]`` are peer i's own ("intra") MoCo
logits. All terms are sums over peers / ordered pairs i != j and means over the batch; keys,
queues and the soft targets are constants (``stop_gradient``), so only the queries are trained.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax.losses.mcl import _soft_kl_rows, _upcast

Array = jax.Array


def moco_logits(q, k, queue, tau) -> Array:
  """The logits of every ordered peer pair, ``[K, K, N, 1 + Q]`` (see the module docstring).

  Args:
    q: ``[K, N, D]`` L2-normalised queries (differentiated).
    k: ``[K, N, D]`` L2-normalised keys (held constant).
    queue: ``[K, Q, D]`` per-peer queues of earlier keys (held constant).
    tau: contrastive temperature.
  """
  q = _upcast(q)
  k = jax.lax.stop_gradient(_upcast(k))
  queue = jax.lax.stop_gradient(_upcast(queue))
  positive = jnp.einsum('ind,jnd->ijn', q, k)
  negative = jnp.einsum('ind,jmd->ijnm', q, queue)
  return jnp.concatenate([positive[..., None], negative], axis=-1) / tau


def moco_mcl_terms(logits, kd_T) -> dict:
  """The four unweighted terms of :func:`moco_mcl_loss` from :func:`moco_logits`' output.

  CE (target column 0) of every pair ``[K, K]``: its diagonal sums to VCL, the rest to ICL.
  SoftVCL: ``KL_T(logits[i, i] || sg logits[j, j])``; SoftICL: ``KL_T(logits[i, j] || sg
  logits[j, i])``, each over i != j; ``KL_T`` is ``T**2`` times the batch mean of the KL.
  """
  num_peers, batch = logits.shape[0], logits.shape[2]
  ce = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[..., 0], axis=-1)  # [K, K]
  off_diagonal = jnp.asarray(~np.eye(num_peers, dtype=bool))
  intra = jnp.diagonal(logits, axis1=0, axis2=1)  # [N, 1 + Q, K]
  intra = jnp.moveaxis(intra, -1, 0)  # [K, N, 1 + Q]
  soft_vcl_rows = _soft_kl_rows(intra[:, None], intra[None, :], kd_T)  # [K, K, N]
  soft_icl_rows = _soft_kl_rows(logits, jnp.swapaxes(logits, 0, 1), kd_T)  # [K, K, N]

  def pair_sum(rows):
    return kd_T**2 * jnp.sum(jnp.where(off_diagonal, jnp.sum(rows, axis=-1), 0.0)) / batch

  return {
      'vcl': jnp.trace(ce),
      'soft_vcl': pair_sum(soft_vcl_rows),
      'icl': jnp.sum(jnp.where(off_diagonal, ce, 0.0)),
      'soft_icl': pair_sum(soft_icl_rows),
  }


def moco_mcl_loss(q, k, queue, tau, kd_T) -> dict:
  """Self-supervised MCL's terms, unweighted: ``{'vcl', 'soft_vcl', 'icl', 'soft_icl'}``.

  VCL = sum_i CE(logits[i, i]); SoftVCL = sum_{i != j} KL_T(logits[i, i] || sg logits[j, j]);
  ICL = sum_{i != j} CE(logits[i, j]); SoftICL = sum_{i != j} KL_T(logits[i, j] || sg
  logits[j, i]). CE is the batch mean of ``-log softmax(row)[0]``; ``KL_T(s || t)`` is ``T**2``
  times the batch mean of ``sum_c softmax(t/T)_c (log softmax(t/T)_c - log softmax(s/T)_c)``.
  With K = 1 only VCL is non-zero: plain MoCo's InfoNCE.

  Args:
    q: ``[K, N, D]`` L2-normalised queries; the only input that receives a gradient.
    k: ``[K, N, D]`` L2-normalised keys of the other view (same rows = same images).
    queue: ``[K, Q, D]`` per-peer queues.
    tau: contrastive temperature (MoCo's 0.07).
    kd_T: temperature of the soft terms (3).
  """
  return moco_mcl_terms(moco_logits(q, k, queue, tau), kd_T)


def moco_pretext_top1(logits) -> Array:
  """``[K]``: per peer, the fraction of rows of its intra logits whose largest entry is the
  positive (column 0; a tie counts as a hit, as ``argmax`` picks the first)."""
  intra = jnp.moveaxis(jnp.diagonal(logits, axis1=0, axis2=1), -1, 0)  # [K, N, 1 + Q]
  hit = intra[..., 0] >= jnp.max(intra[..., 1:], axis=-1)
  return jnp.mean(hit.astype(jnp.float32), axis=-1)


def moco_enqueue(queue, ptr, keys) -> tuple[Array, Array]:
  """Writes this step's keys into every peer's queue; returns ``(queue, ptr)``.

  Rows ``[ptr, ptr + N)`` of ``queue[i]`` become ``keys[i]`` and ``ptr`` advances to
  ``(ptr + N) mod Q``: the oldest keys are replaced first. All peers write the same rows, so one
  pointer serves them all. Q must be a multiple of N (checked from the static shapes), so a
  write never straddles the end of the queue.

  Args:
    queue: ``[K, Q, D]``.
    ptr: int32 scalar in ``[0, Q)``, a multiple of N.
    keys: ``[K, N, D]`` (held constant; cast to the queue's dtype).
  """
  queue_size, batch = queue.shape[1], keys.shape[1]
  if queue_size % batch:
    raise ValueError(f'moco_enqueue: the queue length {queue_size} is not a multiple of {batch}.')
  keys = jax.lax.stop_gradient(keys).astype(queue.dtype)
  zero = jnp.zeros((), jnp.int32)
  ptr = jnp.asarray(ptr, jnp.int32)
  queue = jax.lax.dynamic_update_slice(queue, keys, (zero, ptr, zero))
  return queue, (ptr + batch) % queue_size
