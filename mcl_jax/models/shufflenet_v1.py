"""CIFAR ShuffleNetV1 (groups 3), as CRD's `models/ShuffleNetv1.py` `ShuffleV1` (HobbitLong/RepDistiller):
the student of CRD / CKD / CRCD's resnet32x4 -> ShuffleV1 and wrn_40_2 -> ShuffleV1 rows.

1x1 conv stem (24 ch, stride 1) + BN + ReLU, three stages of (4, 8, 4) bottleneck units with output
widths (240, 480, 960), all strides 2, global average pooling and Dense(960 -> C). A 32x32 input gives
stage maps 16, 8, 4.

Deviations of the reference (kept) from the ShuffleNet paper's ImageNet net: a 1x1/1 stem without
max-pool (CIFAR inputs), and a ReLU after the depthwise conv's BN. As in the paper, the first 1x1 conv
of stage 0's first unit (on the 24-channel stem) is not grouped. The reference pools with avg_pool2d(4),
which is global for 32x32 and 28x28 inputs; the mean over all positions is taken here for any size.
Convs start from the zoo's kaiming-normal (fan_out) init; the reference keeps torch's default.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models.cifar_resnet import KAIMING_FAN_OUT, ResidualBlock, StagedNet, batch_norm, conv
from mcl_jax.models.flexible import depthwise_conv
from mcl_jax.models.shufflenet import channel_shuffle

# The reference leaves the first 1x1 conv ungrouped when its input is the 24-channel stem output.
STEM_WIDTH = 24


def grouped_conv1x1(features: int, groups: int, *, dtype, name: str) -> nn.Conv:
  """Bias-free 1x1 conv in `groups` groups (torch's `groups=`); fan_out init as `conv`."""
  return nn.Conv(
      features,
      (1, 1),
      feature_group_count=groups,
      use_bias=False,
      kernel_init=KAIMING_FAN_OUT,
      dtype=dtype,
      name=name,
  )


class ShuffleV1Unit(ResidualBlock):
  """ShuffleNetV1 unit: 1x1 group conv to features / 4 + BN + ReLU -> channel shuffle -> 3x3 depthwise
  (the stride) + BN + ReLU -> 1x1 group conv + BN, then

    strides == 1: relu(h + x), with h `features` wide (needs C_in == features);
    strides == 2: relu(concat(h, avg_pool3x3/2(x))), h `features - C_in` wide (the pool counts the
      zero padding, as torch's AvgPool2d(3, 2, 1)).

  x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features].
  """

  groups: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    if self.strides == 1:
      if in_features != self.features:
        raise ValueError(
            f'A stride-1 ShuffleV1Unit keeps the width: got {in_features} -> {self.features}'
        )
      out_features = self.features
    elif self.strides == 2:
      out_features = self.features - in_features
    else:
      raise ValueError(f'ShuffleV1Unit strides must be 1 or 2, got {self.strides}')
    mid = out_features // 4
    first_groups = 1 if in_features == STEM_WIDTH else self.groups
    bn = functools.partial(batch_norm, train, dtype=self.dtype)
    h = grouped_conv1x1(mid, first_groups, dtype=self.dtype, name='conv1')(x)
    h = channel_shuffle(nn.relu(bn(name='bn1')(h)), first_groups)
    h = depthwise_conv(mid, self.strides, dtype=self.dtype, name='conv2')(h)
    h = nn.relu(bn(name='bn2')(h))
    h = grouped_conv1x1(out_features, self.groups, dtype=self.dtype, name='conv3')(h)
    h = bn(name='bn3')(h)
    if self.strides == 1:
      return nn.relu(h + x)
    shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return nn.relu(jnp.concatenate([h, shortcut.astype(h.dtype)], axis=-1))


class ShuffleNetV1(StagedNet):
  """CIFAR ShuffleNetV1: 1x1 conv (24 ch) + BN + ReLU stem, three `ShuffleV1Unit` stages (strides
  2, 2, 2). Input [B, H, W, C] at any size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST); feature dim 960.
  """

  block: type[ResidualBlock] = ShuffleV1Unit
  stage_sizes: tuple[int, ...] = (4, 8, 4)
  stage_widths: tuple[int, ...] = (240, 480, 960)
  stage_strides: tuple[int, ...] = (2, 2, 2)

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(STEM_WIDTH, 1, dtype=self.dtype, name='stem_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))


CONSTRUCTORS = {
    'shufflenetv1': ShuffleNetV1,  # CRD's ShuffleV1 (groups 3)
}
