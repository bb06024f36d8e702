"""CRD-style NCE over a memory bank, shared by MCL-OKD and CRCD (``docs/methods.md``).

A memory bank ``V [N, F]`` holds one (detached) embedding per training example. A query ``q [B, F]``
is scored against ``K + 1`` rows of it, column 0 the positive: ``E = exp(<V[cidx], q> / T)``,
``P = E / Z``; :func:`nce_loss` is the binary NCE of the positive against ``K`` noise samples of
probability ``Pn = 1 / N``. Shapes: ``B`` batch, ``K`` negatives, ``F`` embedding width, ``N``
examples (memory rows).
"""

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax.losses.mcl import _upcast, memory_update

Array = jax.Array

NCE_EPS = 1e-7


def nce_loss(P, n_data: int, eps: float = NCE_EPS) -> Array:
  """NCE loss of normalised scores, mean over rows, sum over the ``K`` noise columns.

  ``-(1/R) sum_r [log(P[r,0] / (P[r,0] + K/N + eps)) + sum_{k>=1} log((K/N) / (P[r,k] + K/N + eps))]``

  Args:
    P: ``[R, K + 1]`` scores ``E / Z``, column 0 the positive.
    n_data: ``N``, the number of memory rows (noise probability ``1 / N``).
    eps: the reference's 1e-7.

  Returns:
    Scalar.
  """
  P = _upcast(P)
  noise = (P.shape[-1] - 1) / n_data  # m * Pn
  log_pos = jnp.log(P[:, 0] / (P[:, 0] + noise + eps))
  log_neg = jnp.log(noise / (P[:, 1:] + noise + eps))
  return -jnp.mean(log_pos + jnp.sum(log_neg, axis=-1))


def normalising_constant(E, Z, n_data: int) -> Array:
  """``Z`` where it is set (> 0), else ``sg(mean(E)) * N`` from these scores.

  ``Z`` None or <= 0 means "compute from this batch" (MCL-OKD every step; CRD/CRCD on the first
  step, after which the caller keeps the returned value fixed).
  """
  batch_z = jax.lax.stop_gradient(jnp.mean(E)) * n_data
  if Z is None:
    return batch_z
  Z = jax.lax.stop_gradient(_upcast(Z))
  return jnp.where(Z > 0, Z, batch_z)


def nce_scores(query, keys, temperature, Z, n_data: int) -> tuple[Array, Array]:
  """Normalised NCE scores of queries against memory rows.

  Args:
    query: ``[B, F]`` (unit-norm) query embeddings; receives the gradient.
    keys: ``[B, K + 1, F]`` memory rows ``V[contrast_idx]`` (detached here), column 0 the positive.
    temperature: ``T``.
    Z: scalar normalising constant, or None / <= 0 for ``sg(mean(E)) * N`` of this batch.
    n_data: ``N``.

  Returns:
    ``(P [B, K + 1], Z_used)`` with ``P = exp(<keys, query> / T) / Z_used``.
  """
  keys = jax.lax.stop_gradient(_upcast(keys))
  E = jnp.exp(jnp.einsum('bkf,bf->bk', keys, _upcast(query)) / temperature)
  Z_used = normalising_constant(E, Z, n_data)
  return E / Z_used, Z_used


def nce_memory_update(memory, idx, feats, momentum) -> Array:
  """``V[idx] <- nrm(mu V[idx] + (1 - mu) sg(feats))``, the old rows read before any write.

  Args:
    memory: ``[N, F]``.
    idx: ``[B]`` int dataset indices of the batch (the last occurrence wins on duplicates).
    feats: ``[B, F]`` new embeddings (stop-gradient).
    momentum: ``mu``.

  Returns:
    The updated ``[N, F]`` memory.
  """
  return memory_update(jnp.asarray(memory)[None], jnp.asarray(feats)[None], idx, momentum)[0]


def init_memory(rng, num_examples: int, dim: int, normalise: bool, leading=()) -> Array:
  """Memory rows uniform in ``[-s, s]``, ``s = 1 / sqrt(F / 3)``; L2-normalised rows when
  ``normalise`` (CRCD) and raw otherwise (MCL-OKD). Shape ``leading + (N, F)``."""
  bound = 1.0 / np.sqrt(dim / 3.0)  # a Python float: the same bound in every dtype
  memory = jax.random.uniform(
      rng, tuple(leading) + (num_examples, dim), minval=-bound, maxval=bound
  )
  if normalise:
    memory = memory / jnp.linalg.norm(memory, axis=-1, keepdims=True)
  return memory
