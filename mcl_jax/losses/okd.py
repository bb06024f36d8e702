"""MCL-OKD losses (Yang, Xu, An, ICASSP 2021; ``docs/methods.md#mcl-okd``).

``M`` views (branches of a multi-branch network, or peers), ``B`` batch, ``C`` classes, ``F``
embedding width, ``N`` training examples, ``K`` negatives.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax.losses.mcl import _upcast, soft_kl
from mcl_jax.losses.nce import nce_loss, normalising_constant

Array = jax.Array


def mcl_okd_contrastive_loss(embeds, memories, contrast_idx, temperature=0.1) -> Array:
  """Multi-view contrastive loss: NCE of view j's query against view i's memory, summed over the
  ``M(M-1)`` ordered pairs ``i != j``.

  ``P_{i<-j}[b, k] = exp(<V_i[cidx[b, k]], h_j[b]> / T) / Z_{i<-j}``, ``Z_{i<-j}`` recomputed from
  the batch (``sg(mean) * N``, per pair), loss ``= sum_{i != j} nce_loss(P_{i<-j})``. Memories are
  detached; the gradient flows into the queries ``h_j``.

  Args:
    embeds: ``[M, B, F]`` L2-normalised embeddings ``h``.
    memories: ``[M, N, F]`` per-view memory banks.
    contrast_idx: ``[B, K + 1]`` int, column 0 the sample's own index, then ``K`` negatives.
    temperature: ``T``.

  Returns:
    Scalar.
  """
  num_views, n_data = memories.shape[0], memories.shape[1]
  keys = jax.lax.stop_gradient(_upcast(jnp.take(memories, contrast_idx, axis=1)))  # [M, B, K+1, F]
  E = jnp.exp(jnp.einsum('ibkf,jbf->ijbk', keys, _upcast(embeds)) / temperature)
  Z = jax.vmap(jax.vmap(lambda e: normalising_constant(e, None, n_data)))(E)  # [M, M]
  pair_loss = jax.vmap(jax.vmap(lambda p: nce_loss(p, n_data)))(E / Z[..., None, None])
  i, j = np.nonzero(~np.eye(num_views, dtype=bool))
  return jnp.sum(pair_loss[i, j])


def dot_loss(logits, temperature=3.0) -> Array:
  """Distillation from the online teacher: ``T^2 * batchmean KL(softmax(sg(mean_m z_m)/T) ||
  softmax(z_{M-1}/T))`` — only the last view (the deployed branch) is distilled.

  Args:
    logits: ``[M, B, C]``.
    temperature: ``T``.

  Returns:
    Scalar.
  """
  logits = _upcast(logits)
  return soft_kl(logits[-1], jnp.mean(logits, axis=0), temperature)
