"""CIFAR MobileNetV2, as CRD's `models/mobilenetv2.py` (`mobile_half`: width multiplier 0.5, expansion 6).

3x3/2 conv stem, CRD's seven rows of inverted residuals (expansion t, width c, blocks n, stride s), a 1x1
conv to 1280 + BN + ReLU, global average pooling and Dense(1280 -> C). CRD's nets use ReLU (not ReLU6)
and keep the expansion 1x1 conv even where t = 1. The rows are grouped into four stages at CRD's feature
taps (after rows 1, 2, 4 and 6, counting from 0), so the stage strides are (1, 2, 2, 2) and a 32x32 input
gives stage maps 16, 8, 4, 2.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from mcl_jax.models.cifar_resnet import ResidualBlock, StagedNet, batch_norm, conv
from mcl_jax.models.flexible import Dtype, depthwise_conv


def _crd_rows(t: int) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
  """CRD's rows (expansion, width, blocks, stride) for expansion t, grouped into the four stages."""
  return (
      ((1, 16, 1, 1), (t, 24, 2, 1)),
      ((t, 32, 3, 2),),
      ((t, 64, 4, 2), (t, 96, 3, 1)),
      ((t, 160, 3, 2), (t, 320, 1, 1)),
  )


class InvertedResidual(ResidualBlock):
  """1x1 conv to C_in * expand_ratio + BN + ReLU -> 3x3 depthwise (the stride) + BN + ReLU -> 1x1 conv
  to `features` + BN (linear), plus x when the shape is kept.

  x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features].
  """

  expand_ratio: int = 6

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    hidden = x.shape[-1] * self.expand_ratio
    h = conv(hidden, 1, dtype=self.dtype, name='expand_conv')(x)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='expand_bn')(h))
    h = depthwise_conv(hidden, self.strides, dtype=self.dtype, name='dw_conv')(h)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='dw_bn')(h))
    h = conv(self.features, 1, dtype=self.dtype, name='project_conv')(h)
    h = batch_norm(train, dtype=self.dtype, name='project_bn')(h)
    if self.strides == 1 and x.shape[-1] == self.features:
      return x + h
    return h


class InvertedResidualStage(nn.Module):
  """Rows of `InvertedResidual`s (blocks `block0`, `block1`, ... across rows); only the first strides.

  rows: (expand_ratio, features, num_blocks) per row.
  x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), rows[-1].features].
  """

  rows: Sequence[tuple[int, int, int]]
  strides: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    index = 0
    for expand_ratio, features, num_blocks in self.rows:
      for _ in range(num_blocks):
        block = InvertedResidual(
            features=features,
            strides=self.strides if index == 0 else 1,
            dtype=self.dtype,
            expand_ratio=expand_ratio,
            name=f'block{index}',
        )
        x = block(x, train=train)
        index += 1
    return x


class MobileNetV2(StagedNet):
  """CIFAR MobileNetV2: 3x3/2 conv (`stem_width`) + BN + ReLU stem, four `InvertedResidualStage`s
  (`stage_rows`, `stage_strides` 1, 2, 2, 2), a 1x1 conv to `final_width` + BN + ReLU before pooling.

  Input [B, H, W, C] at any size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST); feature dim `final_width`.
  `stage_sizes` / `stage_widths` must agree with `stage_rows` (see `mobilenet_v2`).
  """

  block: type[ResidualBlock] = InvertedResidual
  stage_rows: tuple[tuple[tuple[int, int, int], ...], ...] = ()
  stem_width: int = 32
  final_width: int = 1280

  @property
  def feature_dim(self) -> int:
    return self.final_width

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.stem_width, 3, 2, dtype=self.dtype, name='stem_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))

  def make_stage(self, i: int) -> nn.Module:
    rows = self.stage_rows[i]
    if self.stage_sizes[i] != sum(n for _, _, n in rows) or self.stage_widths[i] != rows[-1][1]:
      raise ValueError(
          f'MobileNetV2 stage {i}: stage_sizes / stage_widths {self.stage_sizes[i]} / '
          f'{self.stage_widths[i]} disagree with its rows {rows} (the rows fix them)'
      )
    return InvertedResidualStage(rows, self.stage_strides[i], self.dtype, name=f'stage{i}')

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.final_width, 1, dtype=self.dtype, name='final_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='final_bn')(x))


def mobilenet_v2(width_mult: float, expand_ratio: int = 6) -> functools.partial:
  """Constructor of CRD's `mobilenetv2_T_w(T=expand_ratio, W=width_mult)` (taking num_classes, dtype,
  first_stage as keywords): row widths int(c * W), stem int(32 * W), final width 1280 (1280 W if W > 1).
  """
  if width_mult <= 0 or expand_ratio < 1:
    raise ValueError(f'Need width_mult > 0 and expand_ratio >= 1, got {width_mult}, {expand_ratio}')
  stages = _crd_rows(expand_ratio)
  stage_rows = tuple(tuple((t, int(c * width_mult), n) for t, c, n, _ in rows) for rows in stages)
  return functools.partial(
      MobileNetV2,
      stage_rows=stage_rows,
      stage_strides=tuple(rows[0][3] for rows in stages),
      stage_sizes=tuple(sum(n for _, _, n in rows) for rows in stage_rows),
      stage_widths=tuple(rows[-1][1] for rows in stage_rows),
      stem_width=int(32 * width_mult),
      final_width=int(1280 * width_mult) if width_mult > 1.0 else 1280,
  )


CONSTRUCTORS = {
    'mobilenetv2': mobilenet_v2(0.5),  # CRD's 'MobileNetV2' student (`mobile_half`)
}
