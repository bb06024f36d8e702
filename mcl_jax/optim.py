"""Optimizer and learning-rate schedules built from the config.

Durations are given in epochs (the user's unit) and converted to steps here, in one place.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return int(round(epochs * steps_per_epoch))


def scaled_lr(optim_config, batch_size: int | None = None) -> float:
  """The base learning rate for a global batch: `lr` (`lr_scaling='none'`), or
  `lr * batch_size / lr_reference_batch` (`'linear'`, the rule for growing the batch with hosts)."""
  rule = optim_config.get('lr_scaling', 'none')
  if rule == 'none':
    return optim_config.lr
  if rule == 'linear':
    if batch_size is None:
      raise ValueError("optim.lr_scaling='linear' needs the global batch size.")
    return optim_config.lr * batch_size / optim_config.get('lr_reference_batch', 256)
  raise ValueError(f"optim.lr_scaling={rule!r} is not one of 'none', 'linear'.")


def make_schedule(
    optim_config, total_steps: int, steps_per_epoch: int, batch_size: int | None = None
) -> optax.Schedule:
  """Learning rate as a function of the global step.

  `cosine`:    lr * 0.5 * (1 + cos(pi * t / T)). With `per_epoch=True` (the authors' code), t is the
               epoch index, so the rate is constant within an epoch
               (docs/methods.md#learning-rate-schedule).
  `multistep`: lr * decay_factor ** (number of `milestones` (epochs) passed).
  `constant`:  lr.
  Optional linear warm-up over `warmup_epochs`.
  """
  base_lr = scaled_lr(optim_config, batch_size)
  per_epoch = optim_config.get('per_epoch', True)
  warmup_steps = epochs_to_steps(optim_config.get('warmup_epochs', 0.0), steps_per_epoch)
  name = optim_config.schedule

  def progress_unit(step):
    # Position in the unit the schedule is defined in (epochs, or steps).
    if per_epoch:
      return jnp.floor(step / steps_per_epoch), max(total_steps / steps_per_epoch, 1.0)
    return step.astype(jnp.float32), max(float(total_steps), 1.0)

  if name == 'cosine':

    def schedule(step):
      t, horizon = progress_unit(jnp.asarray(step))
      return base_lr * 0.5 * (1.0 + jnp.cos(math.pi * t / horizon))

  elif name == 'multistep':
    boundaries = jnp.asarray(
        [epochs_to_steps(e, steps_per_epoch) for e in optim_config.milestones], jnp.int32
    )
    factor = optim_config.decay_factor

    def schedule(step):
      passed = jnp.sum(jnp.asarray(step) >= boundaries)
      return base_lr * factor**passed

  elif name == 'constant':

    def schedule(step):
      del step
      return jnp.asarray(base_lr, jnp.float32)

  else:
    raise ValueError(f"optim.schedule={name!r} is not one of 'cosine', 'multistep', 'constant'.")

  if warmup_steps <= 0:
    return schedule

  def warmed(step):
    step = jnp.asarray(step)
    ramp = jnp.minimum((step + 1) / warmup_steps, 1.0)
    return jnp.where(step < warmup_steps, ramp, 1.0) * schedule(step)

  return warmed


def weight_decay_mask(params, mode: str):
  """Which leaves get weight decay.

  `all` (the MCL/L-MCL reference: torch SGD weight_decay on every parameter) or `no_bn_bias`
  (kernels only: 1-D leaves, i.e. biases and BatchNorm scales/offsets, are spared).
  """
  if mode == 'all':
    return jax.tree.map(lambda _: True, params)
  if mode == 'no_bn_bias':
    # Leaves carry a leading peer axis in the cohort, so "1-D" means ndim <= 2 there; we look at
    # the leaf name instead, which is robust to stacking.
    def keep(path, _):
      name = getattr(path[-1], 'key', str(path[-1]))
      return name not in ('bias', 'scale')

    return jax.tree_util.tree_map_with_path(keep, params)
  raise ValueError(f"optim.wd_mask={mode!r} is not one of 'all', 'no_bn_bias'.")


def make_optimizer(
    optim_config, total_steps: int, steps_per_epoch: int, batch_size: int | None = None
):
  """SGD (heavy-ball or Nesterov momentum) with coupled weight decay, as torch.optim.SGD.

  Returns (optax transformation, lr schedule). Weight decay is added to the gradient before the
  momentum, exactly like PyTorch's SGD(weight_decay=...), which the reference numbers were made with.
  """
  schedule = make_schedule(optim_config, total_steps, steps_per_epoch, batch_size)
  tx = optax.chain(
      optax.add_decayed_weights(
          optim_config.weight_decay,
          mask=lambda params: weight_decay_mask(params, optim_config.wd_mask),
      ),
      optax.sgd(schedule, momentum=optim_config.momentum or None, nesterov=optim_config.nesterov),
  )
  return tx, schedule
