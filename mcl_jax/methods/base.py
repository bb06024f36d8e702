"""What a training method is: a small object owning its loss terms, extra parameters and state.

The trainer (mcl_jax/train.py) is method-agnostic: it applies the cohort, hands the outputs to
`Method.loss`, differentiates w.r.t. the peers' and the method's parameters, and logs every term
as `train/<term>`. A new method slots in by subclassing `Method` and registering it in
`mcl_jax.methods.get_method`; the loop is not touched.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import losses


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class. Subclasses override `loss` and, when they have any, `init`."""
  config: Any  # the `method` ConfigDict

  # Wants the class-balanced batch sampler (MCL on CIFAR: m images per class in every batch).
  class_balanced = False

  def init(self, rng, cohort, train_labels):
    """Returns (params, state): trainable extra parameters (e.g. embedding heads), optimised
    together with the peers, and non-trainable state (e.g. memory banks). `train_labels` [N] are
    the training set's labels (memory banks are indexed by example)."""
    del rng, cohort, train_labels
    return {}, {}

  # Methods with a meta-optimisation (L-MCL) set this > 0 and implement `meta_update`.
  meta_every_steps = 0

  def load_frozen(self, config):
    """Frozen variables (e.g. a trained teacher) passed to every step as `ctx.frozen`; never
    trained, never checkpointed with the run. None when the method has none."""
    del config
    return None

  def loss(self, params, state, outputs, batch, ctx):
    """Returns (total loss, {term name: unweighted scalar}, new state).

    outputs: the cohort's outputs ('logits' [K, B, C], 'groups': per-group model outputs with
      'feature' [K_g, B, d_g] and 'stages').
    batch: 'image' (augmented, normalised) [B, H, W, C], 'label' [B], 'index' [B] (training-set
      positions, for memory banks).
    ctx: a `mcl_jax.step.LossContext` (rng, step, peer_params, frozen, cohort).
    """
    raise NotImplementedError

  def meta_update(self, state, batch, ctx, *, cohort, lr, wd_mask='all'):
    """New method state after a meta-optimisation round (see `mcl_jax.step.make_meta_step`);
    wd_mask: `optim.wd_mask` of the real optimizer."""
    raise NotImplementedError


def ordered_pairs(num_peers: int) -> tuple[np.ndarray, np.ndarray]:
  """Index arrays (k, l) of all ordered peer pairs k != l, [K(K-1)] each."""
  k, l = np.nonzero(~np.eye(num_peers, dtype=bool))
  return k, l


class Independent(Method):
  """K peers trained side by side with no interaction: sum_k CE_k (the baseline)."""

  def loss(self, params, state, outputs, batch, ctx):
    ce = losses.ce_loss(outputs['logits'], batch['label'])
    return ce, {'ce': ce}, state


class DML(Method):
  """Deep mutual learning: CE_k + mean over l != k of T^2 KL(p_l^T || p_k^T), targets stop-gradient.

  All K(K-1) ordered pairs are computed at once; `kd_T` is the temperature.
  """

  def loss(self, params, state, outputs, batch, ctx):
    logits = outputs['logits']
    num_peers = logits.shape[0]
    ce = losses.ce_loss(logits, batch['label'])
    if num_peers == 1:
      return ce, {'ce': ce, 'dml': jnp.zeros(())}, state
    k, l = ordered_pairs(num_peers)
    pair_kl = jax.vmap(lambda s, t: losses.soft_kl(s, t, self.config.kd_T))(logits[k], logits[l])
    dml = jnp.sum(pair_kl) / (num_peers - 1)
    return ce + self.config.get('dml_weight', 1.0) * dml, {'ce': ce, 'dml': dml}, state

