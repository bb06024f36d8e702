"""CIFAR ShuffleNetV2 0.5x / 1x, as the authors' `models/shufflenetv2.py` (winycg/MCL; CRD's is the same
net with a 1x1 stem).

3x3 conv stem (24 ch, stride 1, no max-pool: 32x32 inputs), three stages of one downsampling unit plus
(3, 7, 3) basic units — (4, 8, 4) units, all strides 2 — then a 1x1 conv to 1024 + BN + ReLU, global
average pooling and Dense(1024 -> C). A 32x32 input gives stage maps 16, 8, 4.

`shufflenetv2_1_0_imagenet` is L-MCL's ImageNet ShuffleNetV2 1x (see `ImageNetShuffleNetV2`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models.cifar_resnet import ResidualBlock, StagedNet, batch_norm, conv
from mcl_jax.models.flexible import Dtype, depthwise_conv


def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C]: channel g * (C / groups) + j moves to j * groups + g (torch's
  view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4), in NHWC)."""
  *lead, c = x.shape
  return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


class ShuffleUnit(ResidualBlock):
  """ShuffleNetV2 unit; its kind follows `strides`.

  strides == 1 (basic unit, needs C_in == features): split the channels in halves (x1, x2), keep x1,
    x2 -> 1x1 conv + BN + ReLU -> 3x3 depthwise + BN -> 1x1 conv + BN + ReLU; concat, shuffle.
  strides == 2 (downsampling unit): left x -> 3x3/2 depthwise + BN -> 1x1 conv + BN + ReLU; right
    x -> 1x1 conv + BN + ReLU -> 3x3/2 depthwise + BN -> 1x1 conv + BN + ReLU, both features / 2
    wide; concat, shuffle.
  x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features].
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.features % 2:
      raise ValueError(f'ShuffleUnit features must be even, got {self.features}')
    bn = functools.partial(batch_norm, train, dtype=self.dtype)
    conv1x1 = functools.partial(conv, kernel=1, dtype=self.dtype)
    half = self.features // 2
    if self.strides == 1:
      if x.shape[-1] != self.features:
        raise ValueError(
            f'A stride-1 ShuffleUnit keeps the width: got {x.shape[-1]} -> {self.features}'
        )
      left, h = x[..., :half], x[..., half:]
      h = nn.relu(bn(name='bn1')(conv1x1(half, name='conv1')(h)))
      h = bn(name='bn2')(depthwise_conv(half, dtype=self.dtype, name='conv2')(h))
      right = nn.relu(bn(name='bn3')(conv1x1(half, name='conv3')(h)))
    elif self.strides == 2:
      in_features = x.shape[-1]
      left = bn(name='bn1')(depthwise_conv(in_features, 2, dtype=self.dtype, name='conv1')(x))
      left = nn.relu(bn(name='bn2')(conv1x1(half, name='conv2')(left)))
      h = nn.relu(bn(name='bn3')(conv1x1(half, name='conv3')(x)))
      h = bn(name='bn4')(depthwise_conv(half, 2, dtype=self.dtype, name='conv4')(h))
      right = nn.relu(bn(name='bn5')(conv1x1(half, name='conv5')(h)))
    else:
      raise ValueError(f'ShuffleUnit strides must be 1 or 2, got {self.strides}')
    return channel_shuffle(jnp.concatenate([left, right], axis=-1))


class ShuffleNetV2(StagedNet):
  """CIFAR ShuffleNetV2: 3x3 conv (24 ch) + BN + ReLU stem, three `ShuffleUnit` stages (strides 2, 2, 2),
  a 1x1 conv to `final_width` + BN + ReLU before pooling.

  Input [B, H, W, C] at any size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST); feature dim `final_width`.
  """

  block: type[ResidualBlock] = ShuffleUnit
  stage_strides: tuple[int, ...] = (2, 2, 2)
  final_width: int = 1024

  @property
  def feature_dim(self) -> int:
    return self.final_width

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(24, 3, dtype=self.dtype, name='stem_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.final_width, 1, dtype=self.dtype, name='final_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='final_bn')(x))


class ImageNetShuffleStem(nn.Module):
  """ImageNet ShuffleNetV2 stem: 3x3/2 conv + BN + ReLU, 3x3/2 max-pool (padding 1).

  x: [B, H, W, C] -> [B, ceil(H / 4), ceil(W / 4), features].
  """

  features: int = 24
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = conv(self.features, 3, 2, dtype=self.dtype, name='conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='bn')(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ImageNetShuffleNetV2(ShuffleNetV2):
  """ImageNet ShuffleNetV2 1x, as L-MCL's `models/shufflenetv2_imagenet.py` `ShuffleNetV2_1x_imagenet`
  (winycg/L-MCL; the same net and parameter count, 2,278,604 at 1000 classes, as torchvision's
  `shufflenet_v2_x1_0`): `ImageNetShuffleStem` (24 ch), three `ShuffleUnit` stages of (4, 8, 4) units,
  widths (116, 232, 464), then a 1x1 conv to 1024 + BN + ReLU, pooling and Dense(1024 -> C).

  Four stages, as L-MCL splits it: its auxiliary branches start on the stem's output and on the first
  two unit stages' outputs, like the ResNets' on layer1..layer3. So the stem is stage 0 (parameters
  under `stage0`; `stage_sizes[0]` is unused) and `stem` is the identity. Input [B, 224, 224, 3] ->
  stage maps 56, 28, 14, 7 (as the ImageNet ResNets'). L-MCL's first branch (on stage 0) has two units
  per stage, its others copy the backbone's as these tails do (`branch_blocks` sets every branch's).
  Convs start from the zoo's kaiming-normal (fan_out) init; the reference keeps torch's default.
  """

  stage_sizes: tuple[int, ...] = (1, 4, 8, 4)
  stage_widths: tuple[int, ...] = (24, 116, 232, 464)
  stage_strides: tuple[int, ...] = (4, 2, 2, 2)

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    return x

  def make_stage(self, i: int) -> nn.Module:
    if i == 0:
      return ImageNetShuffleStem(self.stage_widths[0], self.dtype, name='stage0')
    return super().make_stage(i)


# One downsampling unit + (3, 7, 3) basic units per stage; stage widths per net size.
_shufflenet_v2 = functools.partial(ShuffleNetV2, stage_sizes=(4, 8, 4))

CONSTRUCTORS = {
    'shufflenetv2_0_5': functools.partial(_shufflenet_v2, stage_widths=(48, 96, 192)),
    'shufflenetv2_1_0': functools.partial(_shufflenet_v2, stage_widths=(116, 232, 464)),
    'shufflenetv2_1_0_imagenet': ImageNetShuffleNetV2,
}
