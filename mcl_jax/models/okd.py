"""Multi-branch CIFAR ResNets for MCL-OKD (ONE/OKDDip style, ``docs/methods.md#mcl-okd``).

The stem and the first stage are shared; each of the M branches owns the later stages, the global
average pool and the classifier (a `StagedNet` tail built with `first_stage=1`). Arch names are
`<resnet>_okd<M>`, e.g. `resnet32_okd4`. Outputs carry a leading branch axis, which the cohort
flattens into its peer axis, so the M branches are evaluated and distilled like M peers:
  'logits'  [M, B, num_classes],  'feature' [M, B, feature_dim],
  'stages'  (shared stage-0 map [B, H, W, C_0], then per-branch later stages [M, B, H_s, W_s, C_s]).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mcl_jax.models import cifar_resnet
from mcl_jax.models.cifar_resnet import Stage, batch_norm, conv

BRANCH_COUNTS = (2, 3, 4)
BASES = ('resnet8', 'resnet20', 'resnet32', 'resnet56', 'resnet110')


class MultiBranchResNet(nn.Module):
  """Shared stem + stage 0 of the CIFAR ResNet `base`, then `num_branches` independent tails."""

  base: Any  # a `cifar_resnet.cifar_resnet(...)` constructor (functools.partial of CifarResNet)
  num_classes: int
  num_branches: int
  dtype: Any = jnp.float32

  def _branch(self, m: int) -> nn.Module:
    return self.base(
        num_classes=self.num_classes, dtype=self.dtype, first_stage=1, name=f'branch{m}'
    )

  @property
  def feature_dim(self) -> int:
    return self.base(num_classes=self.num_classes).feature_dim

  @nn.compact
  def __call__(self, x, *, train: bool):
    kw = self.base.keywords
    x = conv(kw['stem_width'], 3, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    shared = Stage(
        kw['block'],
        kw['stage_sizes'][0],
        kw['stage_widths'][0],
        strides=1,
        dtype=self.dtype,
        name='stage0',
    )(x, train=train)
    outs = [self._branch(m)(shared, train=train) for m in range(self.num_branches)]
    stack = lambda key: jnp.stack([o[key] for o in outs])  # noqa: E731
    later = tuple(jnp.stack(maps) for maps in zip(*(o['stages'] for o in outs)))
    return {'logits': stack('logits'), 'feature': stack('feature'), 'stages': (shared,) + later}


def _constructor(base: str, branches: int):
  def make(num_classes: int, dtype=jnp.float32):
    return MultiBranchResNet(cifar_resnet.CONSTRUCTORS[base], num_classes, branches, dtype)

  return make


# name -> (constructor, number of branches)
CONSTRUCTORS = {
    f'{base}_okd{m}': (_constructor(base, m), m) for base in BASES for m in BRANCH_COUNTS
}
