"""ImageNet MobileNetV1 (width 1.0), as mdistiller's `mdistiller/models/imagenet/mobilenetv1.py`
`MobileNetV1` (megvii-research/mdistiller; the ResNet-50 -> MobileNet-V1 student of CKD / DKD / CRD).

3x3/2 conv (32 ch) + BN + ReLU, then 13 depthwise-separable layers (3x3 depthwise + BN + ReLU, 1x1 conv
+ BN + ReLU), global average pooling and Dense(1024 -> C); 4.23M parameters at 1000 classes. The first
separable layer (32 -> 64, stride 1) is part of the stem; the other twelve form four stages at
mdistiller's feature taps, (2, 2, 6, 2) layers of widths (128, 256, 512, 1024), each stage's first
layer striding 2, so a 224x224 input gives stage maps 56, 28, 14, 7 (as the ImageNet ResNets').

The reference pools with AvgPool2d(7) (global at 224x224); the mean over all positions is taken here
for any size. Its classifier is fixed at 1000 classes; here it has `num_classes`. Convs start from
the zoo's kaiming-normal (fan_out) init; the reference keeps torch's default.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mcl_jax.models.cifar_resnet import ResidualBlock, StagedNet, batch_norm, conv
from mcl_jax.models.flexible import depthwise_conv


class DepthwiseSeparable(ResidualBlock):
  """3x3 depthwise conv (the stride) + BN + ReLU -> 1x1 conv to `features` + BN + ReLU (no residual).

  x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features].
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = depthwise_conv(x.shape[-1], self.strides, dtype=self.dtype, name='dw_conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='dw_bn')(x))
    x = conv(self.features, 1, dtype=self.dtype, name='pw_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='pw_bn')(x))


class MobileNetV1(StagedNet):
  """ImageNet MobileNetV1: 3x3/2 conv (32) + BN + ReLU + `DepthwiseSeparable`(64) stem, four
  `DepthwiseSeparable` stages (strides 2, 2, 2, 2). Input [B, 224, 224, 3] -> stage maps 56, 28, 14, 7;
  feature dim 1024.
  """

  block: type[ResidualBlock] = DepthwiseSeparable
  stage_sizes: tuple[int, ...] = (2, 2, 6, 2)
  stage_widths: tuple[int, ...] = (128, 256, 512, 1024)
  stage_strides: tuple[int, ...] = (2, 2, 2, 2)

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(32, 3, 2, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    return DepthwiseSeparable(64, dtype=self.dtype, name='stem_separable')(x, train=train)


CONSTRUCTORS = {
    'mobilenetv1': MobileNetV1,  # mdistiller's ImageNet MobileNetV1
}
