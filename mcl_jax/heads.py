"""Projection / embedding heads applied to the peers' pooled features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.losses import l2_normalize


class EmbeddingHead(nn.Module):
  """Dense(d -> hidden) -> ReLU -> Dense(hidden -> dim) -> L2-normalise (MCL's head, no BN).

  `[B, d] -> [B, dim]`, rows of unit norm. Applied in training only; evaluation uses the classifier.
  """

  dim: int = 128
  hidden: int = 128

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Dense(self.hidden, name='fc1')(features.astype(jnp.float32)))
    return l2_normalize(nn.Dense(self.dim, name='fc2')(x))


class LinearEmbeddingHead(nn.Module):
  """Dense(d -> dim) (with bias) -> L2-normalise: CRD's `Embed`, used by MCL-OKD and CRCD.

  `[B, d] -> [B, dim]`, rows of unit norm.
  """

  dim: int = 128

  @nn.compact
  def __call__(self, features):
    return l2_normalize(nn.Dense(self.dim, name='fc')(features.astype(jnp.float32)))


def init_stacked(module: nn.Module, rng, num: int, feature_dim: int):
  """`num` independently initialised copies of `module`'s params, stacked on a leading axis."""
  sample = jnp.zeros((1, feature_dim), jnp.float32)
  keys = jax.random.split(rng, num)
  return jax.vmap(lambda k: module.init(k, sample)['params'])(keys)


def apply_stacked(module: nn.Module, params, features):
  """Applies stacked heads `[K, ...]` to per-peer features `[K, B, d]` -> `[K, B, dim]`."""
  return jax.vmap(lambda p, f: module.apply({'params': p}, f))(params, features)
