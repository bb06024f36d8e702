"""MCL-OKD (Yang, Xu, An, ICASSP 2021): online multi-view contrastive distillation
(docs/methods.md#mcl-okd).

The views are the cohort's peers after flattening branches: with a multi-branch arch
(`resnet32_okd4`: shared stem + stage 0, four branches) one "peer" gives four views, evaluated as
`eval/peer_<k>` plus their ensemble; with plain archs every peer is a view. Each view m has a linear
embedding head (Dense -> L2) on its pooled feature and a memory bank `[N, F]` (method state).
Loss `ce_weight * sum_m CE_m + dot_weight * DOT + contrast_weight * MCL`: DOT distils the last view (the deployed
branch) from the stop-gradient ensemble; MCL is NCE between every view's query and every other
view's memory.
"""

from __future__ import annotations

import dataclasses

import jax

from mcl_jax import heads, losses
from mcl_jax.losses.nce import init_memory
from mcl_jax.methods import base
from mcl_jax.methods.base import Method
from mcl_jax.methods.mcl import check_negative_pool, class_index, init_view_heads, memory_layout, sample_contrast_indices, view_embeddings


@dataclasses.dataclass(frozen=True)
class MCLOKD(Method):
  """The `mcl_okd` method (hyper-parameters in `hparams`)."""

  legacy_names = {'ce_weight': 'gamma', 'dot_weight': 'alpha', 'contrast_weight': 'beta'}
  hparams = {
      'ce_weight': base.non_negative(1.0, 'weight of the summed CE of every view'),
      'dot_weight': base.non_negative(1.0, 'weight of DOT (last view <- ensemble KL)'),
      'contrast_weight': base.non_negative(0.025, 'weight of the cross-view NCE contrast'),
      'tau': base.positive(0.1, 'NCE temperature'),
      'kd_T': base.positive(3.0, 'temperature of DOT'),
      'num_negatives': base.at_least_one(256, 'NCE negatives per anchor (without replacement)'),
      'memory_momentum': base.fraction(0.5, 'momentum of the memory update'),
      'embed_dim': base.at_least_one(128, 'width of the linear embedding heads'),
  }

  @classmethod
  def validate(cls, config, run):
    found = super().validate(config, run)
    if run is not None and config.get('num_negatives', 0) >= run.num_train_examples:
      found.append(
          f'method.num_negatives={config.num_negatives} must be < the {run.num_train_examples} '
          'training examples.'
      )
    return found

  def layout(self, params, state):
    return base.same_placement(params, base.PEER), memory_layout(state)

  @property
  def head(self):
    return heads.LinearEmbeddingHead(dim=self.config.embed_dim)

  def init(self, rng, cohort, train_labels):
    check_negative_pool(train_labels, self.config.num_negatives)
    head_rng, memory_rng = jax.random.split(rng)
    view_heads = init_view_heads(self.head, head_rng, cohort)
    memory = init_memory(
        memory_rng,
        len(train_labels),
        self.config.embed_dim,
        normalise=False,
        leading=(cohort.num_views,),
    )
    return {'heads': view_heads}, {'memory': memory, **class_index(train_labels)}

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    labels, idx = batch['label'], batch['index']
    emb = view_embeddings(self.head, params['heads'], outputs)  # [M, B, F]
    contrast_idx = sample_contrast_indices(
        ctx.rng, idx, labels, state, 0, c.num_negatives, replace=False
    )
    terms = {
        'ce': losses.ce_loss(outputs['logits'], labels),
        'dot': losses.dot_loss(outputs['logits'], c.kd_T),
        'mcl': losses.mcl_okd_contrastive_loss(emb, state['memory'], contrast_idx, c.tau),
    }
    total = (
        c.ce_weight * terms['ce'] + c.dot_weight * terms['dot'] + c.contrast_weight * terms['mcl']
    )
    memory = losses.memory_update(state['memory'], emb, idx, c.memory_momentum)
    return total, terms, {**state, 'memory': memory}
