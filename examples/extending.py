r"""Extending mcl_jax without editing it: a new cohort method, a new model and a new data set.

This file is both the plug-ins and a config. Train, evaluate, export and resume with the
package's own commands (the run records this file; `evaluate` / `export` import it again):

    python -m mcl_jax.main --config examples/extending.py --workdir workdirs/extending
    python -m mcl_jax.evaluate --workdir workdirs/extending
    python -m mcl_jax.export --workdir workdirs/extending --peer 0 --out peer0.msgpack

Arguments: `l2_weight`, `epochs`, `seed`, `smoke` (e.g. `examples/extending.py:smoke`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import config_lib, data, methods, models


# 1. A method: MCL plus an L2 pull between the logits of every ordered pair of peers.
class MclL2(methods.MCL):
  """MCL's loss + `l2_weight` * mean over ordered pairs (k, l) of ||z_k - sg(z_l)||^2 / C."""

  hparams = {
      **methods.MCL.hparams,
      'l2_weight': methods.HParam(0.01, 'weight of the logit L2 term', lambda v: v >= 0, '>= 0'),
  }

  def loss(self, params, state, outputs, batch, ctx):
    total, terms, state = super().loss(params, state, outputs, batch, ctx)
    z = outputs['logits']  # [K, B, C]
    gap = z[:, None] - jax.lax.stop_gradient(z)[None]  # [K, K, B, C]; the diagonal is zero
    pairs = z.shape[0] * max(z.shape[0] - 1, 1)
    terms['l2'] = jnp.sum(jnp.mean(gap**2, axis=(2, 3))) / pairs
    return total + self.config.l2_weight * terms['l2'], terms, state


methods.register('mcl_l2', MclL2)


# 2. A model: a small CNN. The contract: `num_classes` and `feature_dim` attributes, and
# `__call__(x, *, train)` -> {'logits' [B, C], 'feature' [B, D], 'stages' (may be empty)}.
class TinyCNN(nn.Module):
  num_classes: int
  width: int = 16
  dtype: jnp.dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return 2 * self.width

  @nn.compact
  def __call__(self, x, *, train: bool):
    stages = []
    for i, (width, stride) in enumerate([(self.width, 1), (2 * self.width, 2)]):
      x = nn.Conv(width, (3, 3), (stride, stride), use_bias=False, dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
      stages.append(x)
    feature = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    logits = nn.Dense(self.num_classes, name='classifier')(feature)
    return {'logits': logits, 'feature': feature, 'stages': tuple(stages)}


models.register('tiny_cnn', TinyCNN)


# 3. A data set from numpy arrays: the first four Fashion-MNIST classes (T-shirt, trouser,
# pullover, dress) of the embedded subset, 8,000 training and 4,000 test images.
def _first_classes(split: str, num_classes: int = 4):
  full = data.get('fashion_mnist').load(split)
  keep = full.labels < num_classes
  return np.asarray(full.images[keep]), np.asarray(full.labels[keep])


data.register(
    'fashion4',
    data.InMemorySource(
        'fashion4',
        train=_first_classes('train'),
        test=_first_classes('test'),
        crop_padding=2,
        flip=True,
    ),
)


def get_config(arg=None):
  args = config_lib.parse_arg(arg, l2_weight=0.01, epochs=2.0, seed=0, smoke=False)
  c = config_lib.base_config()
  c.seed = args['seed']
  c.data.name = 'fashion4'
  c.model.arch = 'tiny_cnn'
  c.cohort.num_peers = 2
  c.method = methods.config('mcl_l2', l2_weight=args['l2_weight'])
  config_lib.set_sgd(
      c,
      batch_size=64,
      epochs=args['epochs'],
      lr=0.05,
      weight_decay=5e-4,
      nesterov=True,
      schedule='cosine',
      per_epoch=False,
  )
  c.log_every_steps, c.ckpt_every_steps = 25, 100
  return config_lib.finish(c, args['smoke'])
