"""CKD (Zhu et al., arXiv 2404.14109): `gamma * CE + beta * sum_k ckd_loss(z_k, z_t, tau)`, the
sample-wise logit InfoNCE of every student peer against a frozen teacher (specs §2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mcl_jax import losses
from mcl_jax.methods.teacher import Distillation


class CKD(Distillation):
  """The `ckd` method: `method.gamma` (CE weight, w_ce), `method.beta` (w_cl), `method.tau`."""

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    teacher_logits = self.teacher_outputs(batch, ctx)['logits']
    ce = losses.ce_loss(outputs['logits'], batch['label'])
    ckd = jnp.sum(jax.vmap(lambda z: losses.ckd_loss(z, teacher_logits, c.tau))(outputs['logits']))
    return c.gamma * ce + c.beta * ckd, {'ce': ce, 'ckd': ckd}, state
