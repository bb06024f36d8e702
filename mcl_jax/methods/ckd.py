"""CKD (Zhu et al., arXiv 2404.14109): `ce_weight * CE + ckd_weight * sum_k ckd_loss(z_k, z_t, tau)`, the
sample-wise logit InfoNCE of every student peer against a frozen teacher (docs/methods.md#ckd)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcl_jax import losses
from mcl_jax.methods import base
from mcl_jax.methods.teacher import Distillation


class CKD(Distillation):
  """The `ckd` method (hyper-parameters in `hparams`; defaults: the res56 -> res20 row)."""

  legacy_names = {'ce_weight': 'gamma', 'ckd_weight': 'beta'}
  hparams = {
      'ce_weight': base.non_negative(1.0, "weight of the students' CE (w_ce)"),
      'ckd_weight': base.non_negative(10.0, 'weight of the logit InfoNCE (w_cl)'),
      'tau': base.positive(1.0, 'temperature of the logit InfoNCE'),
  }

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    teacher_logits = self.teacher_outputs(batch, ctx)['logits']
    ce = losses.ce_loss(outputs['logits'], batch['label'])
    ckd = jnp.sum(jax.vmap(lambda z: losses.ckd_loss(z, teacher_logits, c.tau))(outputs['logits']))
    return c.ce_weight * ce + c.ckd_weight * ckd, {'ce': ce, 'ckd': ckd}, state
