"""Pieces shared by the mobile-style nets (ShuffleNetV2, MobileNetV2): the depthwise conv.

Those nets, and VGG, are `StagedNet`s with per-stage strides (`stage_strides`) and, for
MobileNetV2, an overridden `make_stage`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mcl_jax.models.cifar_resnet import KAIMING_FAN_OUT

Dtype = Any


def depthwise_conv(
    channels: int, strides: int = 1, *, dtype: Dtype, name: str | None = None
) -> nn.Conv:
  """Bias-free 3x3 depthwise conv (one filter per channel), padding 1 as PyTorch's `groups=channels`.

  [B, H, W, channels] -> [B, ceil(H / strides), ceil(W / strides), channels]. Kaiming-normal fan_out
  init: fan_out = 9 * channels for the [3, 3, 1, channels] kernel, as torch's for [channels, 1, 3, 3].
  """
  return nn.Conv(
      channels,
      (3, 3),
      strides=strides,
      padding=((1, 1), (1, 1)),
      feature_group_count=channels,
      use_bias=False,
      kernel_init=KAIMING_FAN_OUT,
      dtype=dtype,
      name=name,
  )
