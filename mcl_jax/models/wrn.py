"""Wide ResNets WRN-d-k for CIFAR-size inputs (pre-activation, as in CRD and the authors' code)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from mcl_jax.models.cifar_resnet import ResidualBlock, StagedNet, batch_norm, conv


class PreActBlock(ResidualBlock):
  """Pre-activation wide block: conv3x3(relu(bn(conv3x3(a)))) + shortcut, with a = relu(bn(x)).

  The shortcut is x itself, or a 1x1 conv (no BN) of the activated a when the shape changes.
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    a = nn.relu(batch_norm(train, dtype=self.dtype, name='bn1')(x))
    h = conv(self.features, 3, self.strides, dtype=self.dtype, name='conv1')(a)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='bn2')(h))
    h = conv(self.features, 3, dtype=self.dtype, name='conv2')(h)
    if self.strides == 1 and x.shape[-1] == self.features:
      return h + x
    return h + conv(self.features, 1, self.strides, dtype=self.dtype, name='proj_conv')(a)


class WideResNet(StagedNet):
  """WRN: plain 3x3 conv stem (16 ch, no BN: the first block normalises), three pre-activation
  stages (strides 1, 2, 2), and a final BN + ReLU before pooling.

  Input [B, H, W, C] at any size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST).
  """

  block: type[ResidualBlock] = PreActBlock

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    return conv(16, 3, dtype=self.dtype, name='stem_conv')(x)

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    # Pre-activation stages end on an un-normalised residual sum.
    return nn.relu(batch_norm(train, dtype=self.dtype, name='final_bn')(x))


def wide_resnet(depth: int, widen_factor: int) -> functools.partial:
  """Constructor of WRN-`depth`-`widen_factor` (taking num_classes, dtype, first_stage as keywords).

  depth = 6n + 4 (n blocks per stage); stage widths 16k, 32k, 64k; feature dim 64k.
  """
  if (depth - 4) % 6:
    raise ValueError(f'WRN depth {depth} is not 6n + 4')
  n = (depth - 4) // 6
  return functools.partial(
      WideResNet,
      stage_sizes=(n, n, n),
      stage_widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
  )


CONSTRUCTORS = {
    'wrn_16_2': wide_resnet(16, 2),
    'wrn_40_1': wide_resnet(40, 1),
    'wrn_40_2': wide_resnet(40, 2),
    'wrn_28_4': wide_resnet(28, 4),
}
