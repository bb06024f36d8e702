"""CRCD (Zhu et al., CVPR 2021): complementary relation contrastive distillation (specs §3).

Two distilled elements per student peer, each with its own student/teacher linear embedding heads
(trainable, method params) and student/teacher memory banks (method state):
- feature: the pooled penultimate features f_s, f_t;
- gradient: g = dCE/df of each network's linear classifier, computed in-graph in closed form
  (`losses.linear_ce_feature_grad`); the student's is differentiated through (double backprop),
  the teacher's is a constant.
Loss `gamma*CE + w(t) * [alpha*KD_T + beta*(L_rel^feat + lam*L_rel^grad)]` with w(t) = 1 for the
first `method.distill_fraction` of the steps and 0 afterwards. The NCE constants Z are computed on
the first step and then kept (method state).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mcl_jax import heads, losses
from mcl_jax.losses.nce import init_memory
from mcl_jax.methods.mcl import check_negative_pool, class_index, init_peer_heads, \
    peer_embeddings, sample_contrast_indices
from mcl_jax.methods.teacher import Distillation, teacher_model

ELEMENTS = ('feat', 'grad')


def student_gradient_elements(outputs, peer_params, labels):
  """dCE/df of every student peer's classifier, per group: tuple of `[K_g, B, D_g]`."""
  def one_group(out, p):
    kernel, bias = p['classifier']['kernel'], p['classifier']['bias']  # [K_g, D, C], [K_g, C]
    return jax.vmap(losses.linear_ce_feature_grad, in_axes=(0, 0, 0, None))(
        out['feature'], jnp.swapaxes(kernel, 1, 2), bias, labels)
  return tuple(one_group(out, p) for out, p in zip(outputs['groups'], peer_params))


@dataclasses.dataclass(frozen=True)
class CRCD(Distillation):
  """The `crcd` method; `method.alpha` (KD), `beta` (relation losses), `lam` (gradient element),
  `gamma` (CE), `kd_T`, `tau` (NCE temperature), `num_negatives`, `memory_momentum`,
  `embed_dim`, `distill_fraction`."""

  @property
  def head(self):
    return heads.LinearEmbeddingHead(dim=self.config.embed_dim)

  def init(self, rng, cohort, train_labels):
    check_negative_pool(train_labels, self.config.num_negatives)
    num_peers, dim = cohort.num_peers, self.config.embed_dim
    teacher_dim = teacher_model(self.config.teacher_arch,
                                cohort.groups[0].model.num_classes).feature_dim
    keys = iter(jax.random.split(rng, 4 * len(ELEMENTS)))
    params, memory = {'heads': {}}, {}
    for e in ELEMENTS:
      params['heads'][e] = init_peer_heads(self.head, next(keys), cohort)
      params['heads'][e + '_t'] = heads.init_stacked(self.head, next(keys), num_peers, teacher_dim)
      for side in ('_s', '_t'):
        memory[e + side] = init_memory(next(keys), len(train_labels), dim, normalise=True,
                                       leading=(num_peers,))
    state = {'memory': memory, 'Z': {e: jnp.zeros((num_peers, 2)) for e in ELEMENTS},
             **class_index(train_labels)}
    return params, state

  def load_frozen(self, config):
    from mcl_jax import data, train  # pylint: disable=g-import-not-at-top  (train imports methods)
    num_train = data.dataset_info(config.data.name).num_train_examples
    if config.data.train_examples > 0:
      num_train = min(num_train, config.data.train_examples)
    total_steps = train.schedule_lengths(config, num_train)[1]
    distill_steps = round(config.method.distill_fraction * total_steps)
    return {**super().load_frozen(config), 'distill_steps': jnp.int32(distill_steps)}

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    labels, idx = batch['label'], batch['index']
    teacher = ctx.frozen['teacher']
    t_out = teacher(batch['image'])
    t_cls = teacher.params['classifier']
    student = {'feat': outputs, 'grad': {'groups': tuple(
        {'feature': g} for g in student_gradient_elements(outputs, ctx.peer_params, labels))}}
    teacher_elements = {'feat': t_out['feature'], 'grad': jax.lax.stop_gradient(
        losses.linear_ce_feature_grad(t_out['feature'], t_cls['kernel'].T, t_cls['bias'],
                                      labels))}
    contrast_idx = sample_contrast_indices(ctx.rng, idx, labels, state, 0, c.num_negatives,
                                           replace=False)
    num_peers = outputs['logits'].shape[0]

    terms, memory, Z = {}, {}, {}
    for e in ELEMENTS:
      e_s = peer_embeddings(self.head, params['heads'][e], student[e])  # [K, B, F]
      f_t = jnp.broadcast_to(teacher_elements[e], (num_peers,) + teacher_elements[e].shape)
      e_t = heads.apply_stacked(self.head, params['heads'][e + '_t'], f_t)
      mem_s, mem_t = state['memory'][e + '_s'], state['memory'][e + '_t']
      per_peer, Z[e] = jax.vmap(
          lambda es, et, ms, mt, z: losses.crcd_relation_loss(es, et, ms, mt, idx, contrast_idx,
                                                              c.tau, z))(
              e_s, e_t, mem_s, mem_t, state['Z'][e])
      terms['crcd_' + e] = jnp.sum(per_peer)
      memory[e + '_s'] = losses.memory_update(mem_s, e_s, idx, c.memory_momentum)
      memory[e + '_t'] = losses.memory_update(mem_t, e_t, idx, c.memory_momentum)

    terms['ce'] = losses.ce_loss(outputs['logits'], labels)
    terms['kd'] = jnp.sum(losses.soft_kl(outputs['logits'], t_out['logits'][None], c.kd_T))
    distilling = (ctx.step < ctx.frozen['distill_steps']).astype(terms['ce'].dtype)
    total = c.gamma * terms['ce'] + distilling * (
        c.alpha * terms['kd'] + c.beta * (terms['crcd_feat'] + c.lam * terms['crcd_grad']))
    return total, terms, {**state, 'memory': memory, 'Z': Z}
