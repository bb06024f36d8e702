"""MCL-OKD (Yang, Xu, An, ICASSP 2021): online multi-view contrastive distillation (specs §1).

The views are the cohort's peers after flattening branches: with a multi-branch arch
(`resnet32_okd4`: shared stem + stage 0, four branches) one "peer" gives four views, evaluated as
`eval/peer_<k>` plus their ensemble; with plain archs every peer is a view. Each view m has a linear
embedding head (Dense -> L2) on its pooled feature and a memory bank `[N, F]` (method state).
Loss `gamma * sum_m CE_m + alpha * DOT + beta * MCL`: DOT distils the last view (the deployed
branch) from the stop-gradient ensemble; MCL is NCE between every view's query and every other
view's memory.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mcl_jax import heads, losses
from mcl_jax.losses.nce import init_memory
from mcl_jax.methods.base import Method
from mcl_jax.methods.mcl import check_negative_pool, class_index, sample_contrast_indices


def views_per_peer(group) -> int:
  """Branches of a multi-branch model (its outputs carry a branch axis), else 1."""
  return getattr(group.model, 'num_branches', 1)


@dataclasses.dataclass(frozen=True)
class MCLOKD(Method):
  """The `mcl_okd` method; `method.gamma` (CE), `alpha` (DOT), `beta` (MCL), `tau` (NCE T),
  `kd_T`, `num_negatives`, `memory_momentum`, `embed_dim`."""

  @property
  def head(self):
    return heads.LinearEmbeddingHead(dim=self.config.embed_dim)

  def init(self, rng, cohort, train_labels):
    check_negative_pool(train_labels, self.config.num_negatives)
    head_rng, memory_rng = jax.random.split(rng)
    view_heads = tuple(
        heads.init_stacked(self.head, jax.random.fold_in(head_rng, g),
                           group.num_peers * views_per_peer(group), dim)
        for g, (group, dim) in enumerate(zip(cohort.groups, cohort.feature_dims)))
    num_views = sum(g.num_peers * views_per_peer(g) for g in cohort.groups)
    memory = init_memory(memory_rng, len(train_labels), self.config.embed_dim, normalise=False,
                         leading=(num_views,))
    return {'heads': view_heads}, {'memory': memory, **class_index(train_labels)}

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    labels, idx = batch['label'], batch['index']
    emb = jnp.concatenate([
        heads.apply_stacked(self.head, p, out['feature'].reshape((-1,) + out['feature'].shape[-2:]))
        for p, out in zip(params['heads'], outputs['groups'])])  # [M, B, F]
    contrast_idx = sample_contrast_indices(ctx.rng, idx, labels, state, 0, c.num_negatives,
                                           replace=False)
    terms = {'ce': losses.ce_loss(outputs['logits'], labels),
             'dot': losses.dot_loss(outputs['logits'], c.kd_T),
             'mcl': losses.mcl_okd_contrastive_loss(emb, state['memory'], contrast_idx, c.tau)}
    total = c.gamma * terms['ce'] + c.alpha * terms['dot'] + c.beta * terms['mcl']
    memory = losses.memory_update(state['memory'], emb, idx, c.memory_momentum)
    return total, terms, {**state, 'memory': memory}
