"""ImageNet ResNet-18/34/50 (torchvision architecture, v1.5: the bottleneck strides in its 3x3 conv)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from mcl_jax.models.cifar_resnet import BasicBlock, Bottleneck, StagedNet, batch_norm, conv


class ImageNetResNet(StagedNet):
  """ResNet: 7x7/2 conv (64 ch) + BN + ReLU + 3x3/2 max-pool stem, four stages (strides 1, 2, 2, 2).

  Input [B, 224, 224, 3] -> stage maps 56, 28, 14, 7.
  """

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(64, 7, 2, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


_resnet = functools.partial(ImageNetResNet, stage_widths=(64, 128, 256, 512))

CONSTRUCTORS = {
    'resnet18': functools.partial(_resnet, stage_sizes=(2, 2, 2, 2), block=BasicBlock),
    'resnet34': functools.partial(_resnet, stage_sizes=(3, 4, 6, 3), block=BasicBlock),
    'resnet50': functools.partial(_resnet, stage_sizes=(3, 4, 6, 3), block=Bottleneck),
}
