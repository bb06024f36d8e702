"""CRCD (Zhu et al., CVPR 2021): complementary relation contrastive distillation
(docs/methods.md#crcd).

Two distilled elements per student peer, each with its own student/teacher linear embedding heads
(trainable, method params) and student/teacher memory banks (method state):
- feature: the pooled penultimate features f_s, f_t;
- gradient: g = dCE/df of each network's linear classifier, computed in-graph in closed form
  (`losses.linear_ce_feature_grad`); the student's is differentiated through (double backprop),
  the teacher's is a constant.
Loss `ce_weight*CE + w(t) * [kd_weight*KD_T + relation_weight*(L_rel^feat +
grad_relation_weight*L_rel^grad)]` with w(t) = 1 for the
first `method.distill_fraction` of the steps and 0 afterwards. The NCE constants Z are computed on
the first step and then kept (method state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mcl_jax import heads, losses
from mcl_jax.losses.nce import init_memory
from mcl_jax.methods import base
from mcl_jax.methods.mcl import check_negative_pool, class_index, init_view_heads, sample_contrast_indices, view_embeddings
from mcl_jax.methods.teacher import Distillation, teacher_model

ELEMENTS = ('feat', 'grad')


def student_gradient_elements(outputs, peer_params, labels):
  """dCE/df of every student peer's classifier, per group: tuple of `[K_g, B, D_g]`."""

  def one_group(out, p):
    kernel, bias = p['classifier']['kernel'], p['classifier']['bias']  # [K_g, D, C], [K_g, C]
    return jax.vmap(losses.linear_ce_feature_grad, in_axes=(0, 0, 0, None))(
        out['feature'], jnp.swapaxes(kernel, 1, 2), bias, labels
    )

  return tuple(one_group(out, p) for out, p in zip(outputs['groups'], peer_params))


@dataclasses.dataclass(frozen=True)
class CRCD(Distillation):
  """The `crcd` method (hyper-parameters in `hparams`; defaults: CRCD's CIFAR protocol)."""

  legacy_names = {
      'ce_weight': 'gamma',
      'kd_weight': 'alpha',
      'relation_weight': 'beta',
      'grad_relation_weight': 'lam',
  }
  hparams = {
      'ce_weight': base.non_negative(1.0, "weight of the students' CE"),
      'kd_weight': base.non_negative(0.9, 'weight of the logit KD to the teacher'),
      'relation_weight': base.non_negative(1.0, 'weight of the relation contrastive losses'),
      'grad_relation_weight': base.non_negative(
          1.0, 'weight of the gradient element relative to the feature element'
      ),
      'kd_T': base.positive(4.0, 'temperature of the KD term'),
      'tau': base.positive(0.05, 'NCE temperature'),
      'num_negatives': base.at_least_one(500, 'NCE negatives per anchor (without replacement)'),
      'memory_momentum': base.fraction(0.5, 'momentum of the memory updates'),
      'embed_dim': base.at_least_one(128, 'width of the linear embedding heads'),
      'distill_fraction': base.fraction(
          1.0, 'distillation terms on for this fraction of the steps, then CE only'
      ),
  }

  @classmethod
  def validate(cls, config, run):
    found = super().validate(config, run)
    if run is None:
      return found
    from mcl_jax import models  # pylint: disable=g-import-not-at-top  (methods load before models)

    branched = sorted(
        {a for a in run.archs if a in models.names() and models.spec(a).num_branches > 1}
    )
    if branched:
      found.append(
          'method.name=crcd needs single-branch students (its gradient element reads each '
          f"student's own classifier, its memories are one per peer); {branched} are "
          'multi-branch networks: use their single-branch base architectures.'
      )
    return found

  @property
  def head(self):
    return heads.LinearEmbeddingHead(dim=self.config.embed_dim)

  def init(self, rng, cohort, train_labels):
    check_negative_pool(train_labels, self.config.num_negatives)
    num_peers, dim = cohort.num_peers, self.config.embed_dim
    teacher_dim = teacher_model(
        self.run.teacher_arch, cohort.groups[0].model.num_classes
    ).feature_dim
    keys = iter(jax.random.split(rng, 4 * len(ELEMENTS)))
    params, memory = {'heads': {}}, {}
    for e in ELEMENTS:
      params['heads'][e] = init_view_heads(self.head, next(keys), cohort)  # single-branch: per peer
      params['heads'][e + '_t'] = heads.init_stacked(self.head, next(keys), num_peers, teacher_dim)
      for side in ('_s', '_t'):
        memory[e + side] = init_memory(
            next(keys), len(train_labels), dim, normalise=True, leading=(num_peers,)
        )
    state = {
        'memory': memory,
        'Z': {e: jnp.zeros((num_peers, 2)) for e in ELEMENTS},
        **class_index(train_labels),
    }
    return params, state

  def load_frozen(self, config):
    distill_steps = round(self.config.distill_fraction * self.run.total_steps)
    return {**super().load_frozen(config), 'distill_steps': jnp.int32(distill_steps)}

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    labels, idx = batch['label'], batch['index']
    teacher = ctx.frozen['teacher']
    t_out = teacher(batch['image'])
    t_cls = teacher.params['classifier']
    student = {
        'feat': outputs,
        'grad': {
            'groups': tuple(
                {'feature': g} for g in student_gradient_elements(outputs, ctx.peer_params, labels)
            )
        },
    }
    teacher_elements = {
        'feat': t_out['feature'],
        'grad': jax.lax.stop_gradient(
            losses.linear_ce_feature_grad(
                t_out['feature'], t_cls['kernel'].T, t_cls['bias'], labels
            )
        ),
    }
    contrast_idx = sample_contrast_indices(
        ctx.rng, idx, labels, state, 0, c.num_negatives, replace=False
    )
    num_peers = outputs['logits'].shape[0]

    terms, memory, Z = {}, {}, {}
    for e in ELEMENTS:
      e_s = view_embeddings(self.head, params['heads'][e], student[e])  # [K, B, F]
      f_t = jnp.broadcast_to(teacher_elements[e], (num_peers,) + teacher_elements[e].shape)
      e_t = heads.apply_stacked(self.head, params['heads'][e + '_t'], f_t)
      mem_s, mem_t = state['memory'][e + '_s'], state['memory'][e + '_t']
      per_peer, Z[e] = jax.vmap(
          lambda es, et, ms, mt, z: losses.crcd_relation_loss(
              es, et, ms, mt, idx, contrast_idx, c.tau, z
          )
      )(e_s, e_t, mem_s, mem_t, state['Z'][e])
      terms['crcd_' + e] = jnp.sum(per_peer)
      memory[e + '_s'] = losses.memory_update(mem_s, e_s, idx, c.memory_momentum)
      memory[e + '_t'] = losses.memory_update(mem_t, e_t, idx, c.memory_momentum)

    terms['ce'] = losses.ce_loss(outputs['logits'], labels)
    terms['kd'] = jnp.sum(losses.soft_kl(outputs['logits'], t_out['logits'][None], c.kd_T))
    distilling = (ctx.step < ctx.frozen['distill_steps']).astype(terms['ce'].dtype)
    total = c.ce_weight * terms['ce'] + distilling * (
        c.kd_weight * terms['kd']
        + c.relation_weight * (terms['crcd_feat'] + c.grad_relation_weight * terms['crcd_grad'])
    )
    return total, terms, {**state, 'memory': memory, 'Z': Z}
