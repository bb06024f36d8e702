"""CIFAR DenseNet-40-12 as MCL-OKD's `models/densenet.py` (`densenetd40k12`, github.com/winycg/MCL-OKD).

The authors' net is a DenseNet-BC: a 3x3 conv stem to 2 * growth = 24 channels (no BN / ReLU after it:
`small_inputs`), three dense blocks of 6 bottleneck layers (BN -> ReLU -> 1x1 conv to 4 * growth ->
BN -> ReLU -> 3x3 conv to growth, concatenated to the input), a transition after blocks 1 and 2 (BN ->
ReLU -> 1x1 conv to half the channels -> 2x2 average pool), a final BN + ReLU, global average pooling
and Dense(132 -> C). Depth 40 = 3 blocks x 6 layers x 2 convs + stem + 2 transitions + classifier.

Stage i is dense block i followed by its transition (the authors' MCL-OKD split falls after
transition 1, a stage boundary here), so the stage widths are 48, 60, 132 and a 32x32 input gives
stage maps 16, 8, 8 (28x28: 14, 7, 7; the average pool floors, as torch's).

Initialisation as the authors': convs `kaiming_normal_` with torch's default mode (fan_in, gain
sqrt(2)), BN weight 1 / bias 0, classifier weight torch's default (U(+-1/sqrt(fan_in))) and bias 0.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models.cifar_resnet import Dtype, ResidualBlock, StagedNet, batch_norm

# torch.nn.init.kaiming_normal_(w) with its defaults (mode='fan_in', a=0): variance 2 / fan_in.
KAIMING_FAN_IN = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _conv(features: int, kernel: int, *, dtype: Dtype, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=KAIMING_FAN_IN,
      dtype=dtype,
      name=name,
  )


class DenseLayer(ResidualBlock):
  """Bottleneck dense layer; `features` is the growth rate.

  x: [B, H, W, C] -> [B, H, W, C + features] (x, then the layer's new features).
  """

  bn_size: int = 4  # the 1x1 conv's width is bn_size * growth rate

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='bn1')(x))
    h = _conv(self.bn_size * self.features, 1, dtype=self.dtype, name='conv1')(h)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='bn2')(h))
    h = _conv(self.features, 3, dtype=self.dtype, name='conv2')(h)
    return jnp.concatenate([x.astype(h.dtype), h], axis=-1)


class DenseStage(nn.Module):
  """`num_layers` `DenseLayer`s (`layer0`, ...), then, if `compression` > 0, a transition: BN -> ReLU
  -> 1x1 conv to int(C * compression) channels -> 2x2 average pool (stride 2, floor).

  x: [B, H, W, C_in] -> [B, H', W', out_features]; out_features must be what the layers give (it is
  the net's declared stage width, checked here because only the input fixes it).
  """

  num_layers: int
  growth_rate: int
  out_features: int
  compression: float = 0.0
  bn_size: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for j in range(self.num_layers):
      layer = DenseLayer(self.growth_rate, dtype=self.dtype, bn_size=self.bn_size, name=f'layer{j}')
      x = layer(x, train=train)
    if self.compression:
      width = int(x.shape[-1] * self.compression)
      x = nn.relu(batch_norm(train, dtype=self.dtype, name='transition_bn')(x))
      x = _conv(width, 1, dtype=self.dtype, name='transition_conv')(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    if x.shape[-1] != self.out_features:
      raise ValueError(
          f'DenseStage gives {x.shape[-1]} channels, but the net declares {self.out_features} for '
          'this stage (stage_widths follow from the stem, growth rate and stage_sizes: see '
          '`densenet`)'
      )
    return x


class DenseNet(StagedNet):
  """CIFAR DenseNet-BC: 3x3 conv stem (`stem_width`), `DenseStage`s (a transition after all but the
  last), final BN + ReLU, global average pooling, Dense(feature_dim -> C).

  Input [B, H, W, C] at any size >= 4 (32x32x3 CIFAR, 28x28x1 Fashion-MNIST). `stage_widths` are the
  stage output widths (see `densenet`); `stage_strides` is unused (the transitions downsample).
  """

  block: type[ResidualBlock] = DenseLayer
  growth_rate: int = 12
  stem_width: int = 24
  bn_size: int = 4
  compression: float = 0.5

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    return _conv(self.stem_width, 3, dtype=self.dtype, name='stem_conv')(x)

  def make_stage(self, i: int) -> nn.Module:
    return DenseStage(
        self.stage_sizes[i],
        self.growth_rate,
        self.stage_widths[i],
        compression=self.compression if i < self.num_stages - 1 else 0.0,
        bn_size=self.bn_size,
        dtype=self.dtype,
        name=f'stage{i}',
    )

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.relu(batch_norm(train, dtype=self.dtype, name='final_bn')(x))

  def make_classifier(self) -> nn.Module:
    # The authors zero the bias; the weight keeps torch's default U(+-1/sqrt(fan_in)).
    return nn.Dense(
        self.num_classes,
        dtype=self.head_dtype,
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'),
        bias_init=nn.initializers.zeros,
        name='classifier',
    )


def densenet(
    depth: int, growth_rate: int, *, compression: float = 0.5, bn_size: int = 4
) -> functools.partial:
  """Constructor of the CIFAR DenseNet-BC-`depth`-`growth_rate` (taking num_classes, dtype,
  first_stage as keywords): 3 blocks of (depth - 4) / 6 bottleneck layers, a 2 * growth stem."""
  if (depth - 4) % 6:
    raise ValueError(f'DenseNet-BC depth {depth} is not 6n + 4')
  n = (depth - 4) // 6
  stem_width = 2 * growth_rate
  widths, channels = [], stem_width
  for i in range(3):
    channels += n * growth_rate
    if i < 2:
      channels = int(channels * compression)
    widths.append(channels)
  return functools.partial(
      DenseNet,
      stage_sizes=(n, n, n),
      stage_widths=tuple(widths),
      growth_rate=growth_rate,
      stem_width=stem_width,
      bn_size=bn_size,
      compression=compression,
  )


CONSTRUCTORS = {
    'densenet40_12': densenet(40, 12),
}
