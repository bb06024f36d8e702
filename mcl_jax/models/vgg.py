"""CIFAR VGG-8 / VGG-13 with BatchNorm, as CRD's `models/vgg.py` (`vgg8_bn`, `vgg13_bn`), and VGG-16
as MCL-OKD's `models/vgg.py` (`vgg16`, github.com/winycg/MCL-OKD).

CRD's: five blocks of 3x3 conv (with bias) + BN + ReLU; a 2x2 max-pool before blocks 1, 2 and 3 but
not before block 4 (CRD pools there only for 64x64 inputs), global average pooling and Dense(512 -> C):
no FC layers. Each block is one stage, so a 32x32 input gives stage maps 32, 16, 8, 4, 4.

MCL-OKD's VGG-16 (`MaxPoolVGG`): the same layers (2, 2, 3, 3, 3 convs of 64, 128, 256, 512, 512), but
a 2x2 max-pool after every block, flattened into Dense(512 -> C): no FC layers either. Here the pools
after blocks 0-3 open stages 1-4 and the last one is a global max pool: on 32x32 inputs block 4's
map is 2x2, so this is exactly the authors' pool + flatten, and it stays defined at other sizes
(28x28 gives a 1x1 map, which the authors' net would pool to nothing). Stage maps 32, 16, 8, 4, 2.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models.cifar_resnet import KAIMING_FAN_OUT, ResidualBlock, StagedNet, batch_norm


class VGGConv(ResidualBlock):
  """One VGG layer (no residual): [2x2 max-pool if strides == 2] -> 3x3 conv + bias -> BN -> ReLU.

  x: [B, H, W, C_in] -> [B, H // strides, W // strides, features] (the pool floors, as torch's).
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.strides not in (1, 2):
      raise ValueError(f'VGGConv strides must be 1 or 2, got {self.strides}')
    if self.strides == 2:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    # CRD's convs keep torch's bias (zero-initialised) even though BN follows.
    x = nn.Conv(
        self.features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        kernel_init=KAIMING_FAN_OUT,
        dtype=self.dtype,
        name='conv',
    )(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='bn')(x))


class VGG(StagedNet):
  """CIFAR VGG: no stem, five `VGGConv` stages (strides 1, 2, 2, 2, 1).

  Input [B, H, W, C] at any size >= 8 (32x32x3 CIFAR, 28x28x1 Fashion-MNIST); feature dim 512.
  """

  block: type[ResidualBlock] = VGGConv
  stage_widths: tuple[int, ...] = (64, 128, 256, 512, 512)
  stage_strides: tuple[int, ...] = (1, 2, 2, 2, 1)

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    return x


class MaxPoolVGG(VGG):
  """MCL-OKD's CIFAR VGG: five `VGGConv` stages (strides 1, 2, 2, 2, 2: each later stage opens with
  the 2x2 max-pool closing the previous block), a global max pool, Dense(512 -> C) initialised as the
  authors' (weight N(0, 0.01), bias 0).

  Input [B, H, W, C] at any size >= 16 (32x32x3 CIFAR, 28x28x1 Fashion-MNIST); feature dim 512.
  """

  stage_strides: tuple[int, ...] = (1, 2, 2, 2, 2)

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    # The authors' last 2x2 max-pool + flatten, for any map size (see the module docstring).
    return jnp.max(x, axis=(1, 2), keepdims=True)

  def make_classifier(self) -> nn.Module:
    return nn.Dense(
        self.num_classes,
        dtype=self.head_dtype,
        kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.zeros,
        name='classifier',
    )


CONSTRUCTORS = {
    # CRD's cfg 'S' (one conv per block) and 'B' (two).
    'vgg8': functools.partial(VGG, stage_sizes=(1, 1, 1, 1, 1)),
    'vgg13': functools.partial(VGG, stage_sizes=(2, 2, 2, 2, 2)),
    # MCL-OKD's `vgg16` (depth 16: 2, 2, 3, 3, 3 convs).
    'vgg16': functools.partial(MaxPoolVGG, stage_sizes=(2, 2, 3, 3, 3)),
}
