"""CIFAR HCGNet-A1 / A2 (Yang et al., "Gated Convolutional Networks with Hybrid Connectivity for
Image Classification", AAAI 2020), as the authors use them in MCL, L-MCL and MCL-OKD.

Reference: winycg/L-MCL `models/hcgnet_cifar.py` at commit 2c0901efbee5ef35e90bcae751183a616bf806fa
(`HCGNet`, `hcgnet_A1_cifar`, `hcgnet_A2_cifar`). Its modules are identical to winycg/MCL
`models/hcgnet.py` (236da2f), winycg/MCL-OKD `models/hcgnet.py` (5de042a) and winycg/HCGNet
`models/HCGNet_CIFAR.py` (229ad0b; there with a DropBlock of drop probability 0, an identity); the
copies differ only in what `forward` returns.

The net: a bias-free 3x3 conv stem to 2 k_0 channels, three hybrid blocks of 8 SMG modules (growth
rates k = (12, 24, 36) for A1, (24, 36, 64) for A2), a transition (compression 0.5, stride 2) after
blocks 1 and 2, then BN + ReLU, global average pooling and Dense(C_3 -> classes).

- Hybrid connectivity: every SMG module appends its k new channels to its input (dense, global
  connectivity); inside the module the gated output is a residual-style update of its own 3x3 conv
  output (local connectivity).
- SMG module (`SMG`): BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv (groups 4) to k, then the gates
  (`_gated_update`) on that k-channel map h:
    forget gate  g_f = sigmoid(fc2(tanh(BN1d(fc1(pool_f(h))))))            [B, k], fc1 to k / 2
    update gate  h3 = BN-ReLU-3x3 depthwise(h), h5 = BN-ReLU-3x3 depthwise dilation 2 (h);
                 p3 = pool_3(h3), p5 = pool_5(h5)                            [B, k]
                 a = tanh(BN1d(fcall([p3, p5])))                            [B, 2k / 2]
                 (w3, w5) = softmax over the two of (fc3x3(a), fc5x5(a))    [B, k] each
    output       h * g_f + (w3 p3 + w5 p5)
  where pool_*(x) = sum over positions of x weighted by a spatial softmax of a 1x1 conv of x to one
  channel (global context pooling). As in the reference code, the update is a per-channel vector
  (the pooled multi-scale context), broadcast over positions.
- Transition (`Transition`): BN-ReLU-1x1 conv to C - (C - C') // 2, BN-ReLU-3x3 conv stride 2 to
  C' = int(0.5 C), then the same gates with factors 4 instead of 2 (fc1 to C' / 4, fcall to
  2 C' / 4); no dense concatenation.

Stages (`StagedNet` contract), split where L-MCL's `models/lmcl_hcgnet_cifar.py` taps its features:
stem = the 3x3 conv; stage 0 = hybrid block 1 + transition 1; stage 1 = hybrid block 2 +
transition 2; stage 2 = hybrid block 3; `pre_pool` = the final BN + ReLU. Stage widths
(60, 126, 414) for A1 and (120, 204, 716) for A2; a 32x32 input gives stage maps 16, 8, 8 and a
28x28 input 14, 7, 7.
`first_stage=1` is exactly L-MCL's auxiliary branch on the transition-1 output (hybrid block 2 +
transition 2 + hybrid block 3 + BN + ReLU + classifier) and `first_stage=2` its branch on the
transition-2 output; MCL-OKD's multi-branch HCGNet-A1 shares the stem and stage 0 and gives each
branch a `first_stage=1` tail.

Differences from the reference code, none of which changes the forward pass for given variables:
- Initialisation copies the reference's, which is PyTorch's default everywhere (the HCGNet code has
  no init loop): conv and dense kernels and biases uniform in +-1/sqrt(fan_in), unlike the Kaiming
  fan-out convs of this package's other nets.
- The running variances follow the biased batch variance (Flax), where PyTorch's follow the
  unbiased one: a factor n / (n - 1) on the update, n = B x H x W for the maps' BatchNorm2d (as in
  every net here) and n = B for the gates' BatchNorm1d.
- The global context pooling (softmax and weighted sum) and the gate MLPs run in float32 at least
  (float64 in a float64 model), whatever the compute dtype; the gates are cast back to it.
- `stage_sizes` / `stage_widths` are fixed by the growth rates (dense widths depend on the number of
  modules), so a clone with other stage sizes (L-MCL's `branch_blocks`) is refused.

Published figures: winycg/HCGNet's README gives A1 1.1M parameters / 0.16G FLOPs and A2 3.1M /
0.50G (CIFAR); MCL-OKD's README A1 1.10M / 0.15G (CIFAR-100). The code above has 1,102,651 and
3,133,679 parameters at 100 classes and 154.3M / 488.7M multiply-accumulates of its convolutions and
linear layers on a 32x32 image (`models.count_macs`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models.cifar_resnet import ResidualBlock, StagedNet, batch_norm
from mcl_jax.models.flexible import Dtype

# PyTorch's default conv / linear weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _torch_default_bias(fan_in: int):
  """PyTorch's default bias init: U(+-1/sqrt(fan_in)), fan_in of the layer's kernel."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pointwise(features: int, fan_in: int, *, dtype: Dtype, name: str) -> nn.Dense:
  """A 1x1 conv with bias (torch `nn.Conv2d(fan_in, features, 1)`) as a Dense on the channel axis.

  [..., fan_in] -> [..., features]; PyTorch's default init.
  """
  return nn.Dense(
      features,
      dtype=dtype,
      kernel_init=TORCH_DEFAULT_KERNEL,
      bias_init=_torch_default_bias(fan_in),
      name=name,
  )


class BasicConv(nn.Module):
  """Pre-activation conv: BN -> ReLU -> bias-free conv (`kernel` x `kernel`, `groups`, `dilation`,
  padding dilation * (kernel // 2), as the reference's explicit paddings).

  x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features]; BN under `norm`,
  conv under `conv` (the reference's names).
  """

  features: int
  kernel: int
  strides: int = 1
  groups: int = 1
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='norm')(x))
    pad = self.dilation * (self.kernel // 2)
    return nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=self.strides,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=self.dilation,
        feature_group_count=self.groups,
        use_bias=False,
        kernel_init=TORCH_DEFAULT_KERNEL,
        dtype=self.dtype,
        name='conv',
    )(x)


def _context_pool(x: jax.Array, context_logits: jax.Array, dtype: Dtype) -> jax.Array:
  """Global context pooling: sum over positions of x weighted by a spatial softmax, in `dtype`.

  x: [B, H, W, C], context_logits: [B, H, W, 1] -> [B, C]. (The reference computes
  avg_pool(x * softmax) * H * W, the same sum.)
  """
  batch = x.shape[0]
  weights = jax.nn.softmax(context_logits.astype(dtype).reshape(batch, -1), axis=-1)
  # A product and a sum, not a contraction: like the reference's mul + pool, no multiply-accumulate
  # counted as a conv / linear one (XLA fuses them).
  return jnp.sum(x.astype(dtype).reshape(batch, -1, x.shape[-1]) * weights[..., None], axis=1)


def _batch_norm_1d(train: bool, *, dtype: Dtype, name: str) -> nn.BatchNorm:
  """`batch_norm` for the gates' [B, C] vectors, with the two-pass batch variance.

  These vectors' means are large next to their spread across the batch, and Flax's default
  E[x^2] - E[x]^2 cancels: in training mode it moved HCGNet-A1's logits by 1.4e-4 from the
  reference's float64 forward, against 5e-6 with the two-pass variance (and 9e-6 for the
  reference's own float32 forward).
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      use_fast_variance=False,
      name=name,
  )


def _gated_update(
    h: jax.Array,
    *,
    forget_factor: int,
    reduction_factor: int,
    train: bool,
    dtype: Dtype,
) -> jax.Array:
  """The SMG gates on h [B, H, W, C] -> [B, H, W, C]: h * forget gate + multi-scale update.

  Must be called from inside a module's compact `__call__` (it creates the gate submodules there,
  under the reference's names).
  """
  c = h.shape[-1]
  squeeze, attention = c // forget_factor, 2 * c // reduction_factor
  # The pooling and the gate MLPs (on [B, C] vectors: tiny) in float32 at least; BatchNorm1d over
  # the batch.
  precise = jnp.promote_types(dtype, jnp.float32)
  vector = functools.partial(_pointwise, dtype=precise)
  bn1d = functools.partial(_batch_norm_1d, train, dtype=precise)
  pool = functools.partial(_context_pool, dtype=precise)

  # Forget gate (the paper's cell "forget" gate; squeeze-excitation with context pooling).
  pooled = pool(h, _pointwise(1, c, dtype=dtype, name='global_forget_context')(h))
  squeezed = jnp.tanh(bn1d(name='bn_forget')(vector(squeeze, c, name='fc1')(pooled)))
  forget = jax.nn.sigmoid(vector(c, squeeze, name='fc2')(squeezed))  # [B, C]

  # Update gate: 3x3 and dilated 3x3 depthwise views, pooled, mixed by a softmax over the two.
  h3 = BasicConv(c, 3, groups=c, dtype=dtype, name='conv_3x3')(h, train=train)
  h5 = BasicConv(c, 3, groups=c, dilation=2, dtype=dtype, name='conv_5x5')(h, train=train)
  p3 = pool(h3, _pointwise(1, c, dtype=dtype, name='global_context3x3')(h3))
  p5 = pool(h5, _pointwise(1, c, dtype=dtype, name='global_context5x5')(h5))
  a = vector(attention, 2 * c, name='fcall')(jnp.concatenate([p3, p5], axis=-1))
  a = jnp.tanh(bn1d(name='bn_attention')(a))
  mix = jax.nn.softmax(
      jnp.stack([vector(c, attention, name='fc3x3')(a), vector(c, attention, name='fc5x5')(a)]),
      axis=0,
  )  # [2, B, C]
  update = mix[0] * p3 + mix[1] * p5  # [B, C]

  forget, update = (v[:, None, None, :].astype(dtype) for v in (forget, update))
  return h * forget + update


class SMG(ResidualBlock):
  """SMG module of growth rate k = `features`: appends k gated channels to its input.

  x: [B, H, W, C_in] -> [B, H, W, C_in + features] (strides must be 1: the hybrid blocks keep the
  size). Bottleneck width `bn_size` * k, 3x3 conv groups `groups`.
  """

  bn_size: int = 4
  groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.strides != 1:
      raise ValueError(f'SMG modules keep the map size (strides 1), got strides={self.strides}')
    conv = functools.partial(BasicConv, dtype=self.dtype)
    h = conv(self.bn_size * self.features, 1, name='conv1_1x1')(x, train=train)
    h = conv(self.features, 3, groups=self.groups, name='conv2_3x3')(h, train=train)
    h = _gated_update(h, forget_factor=2, reduction_factor=2, train=train, dtype=self.dtype)
    return jnp.concatenate([x, h], axis=-1)


class Transition(nn.Module):
  """Transition: [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), features] (features = int(theta C)).

  BN-ReLU-1x1 conv to C - (C - features) // 2, BN-ReLU-3x3 conv stride 2 to `features`, then the
  SMG gates with forget and reduction factors 4.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(BasicConv, dtype=self.dtype)
    mid = x.shape[-1] - (x.shape[-1] - self.features) // 2
    h = conv(mid, 1, name='conv1_1x1')(x, train=train)
    h = conv(self.features, 3, strides=2, name='conv2_3x3')(h, train=train)
    return _gated_update(h, forget_factor=4, reduction_factor=4, train=train, dtype=self.dtype)


def stage_widths(
    growth_rates: Sequence[int], stage_sizes: Sequence[int], theta: float = 0.5
) -> tuple[int, ...]:
  """Output widths of the stages: dense growth, then int(theta C) at each transition.

  The stem is 2 k_0 wide; stage i adds stage_sizes[i] * growth_rates[i] channels.
  """
  width, widths = 2 * growth_rates[0], []
  for i, (k, n) in enumerate(zip(growth_rates, stage_sizes)):
    width += k * n
    if i < len(stage_sizes) - 1:
      width = int(width * theta)
    widths.append(width)
  return tuple(widths)


class HybridStage(nn.Module):
  """One stage: `num_layers` SMG modules (`smg0`, `smg1`, ...) of growth `growth_rate`, then a
  `transition` to `features` channels unless `last`.

  x: [B, H, W, C_in] -> [B, H', W', features] with H' = ceil(H / 2) (H if `last`);
  `features` must be what the input width implies (it checks).
  """

  num_layers: int
  growth_rate: int
  features: int
  last: bool
  theta: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dense_width = x.shape[-1] + self.num_layers * self.growth_rate
    width = dense_width if self.last else int(dense_width * self.theta)
    if width != self.features:
      raise ValueError(
          f'HCGNet stage {self.name}: a {x.shape[-1]}-channel input with {self.num_layers} SMG '
          f'modules of growth {self.growth_rate} gives {width} channels, but the stage width is '
          f'{self.features} (the growth rates fix stage_sizes and stage_widths together)'
      )
    for j in range(self.num_layers):
      x = SMG(self.growth_rate, dtype=self.dtype, name=f'smg{j}')(x, train=train)
    if not self.last:
      x = Transition(width, dtype=self.dtype, name='transition')(x, train=train)
    return x


class HCGNet(StagedNet):
  """CIFAR HCGNet: 3x3 conv stem (2 k_0 channels, no BN), three `HybridStage`s (transitions after
  stages 0 and 1), final BN + ReLU before pooling.

  Input [B, H, W, C] at any size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST); feature dim
  stage_widths[-1]. Build it with `hcgnet` (which derives the stage widths from the growth rates).
  """

  block: type[ResidualBlock] = SMG
  growth_rates: Sequence[int] = ()
  theta: float = 0.5

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.Conv(
        2 * self.growth_rates[0],
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        kernel_init=TORCH_DEFAULT_KERNEL,
        dtype=self.dtype,
        name='stem_conv',
    )(x)

  def make_stage(self, i: int) -> nn.Module:
    if len(self.growth_rates) != self.num_stages:
      raise ValueError(
          f'HCGNet needs one growth rate per stage: {tuple(self.growth_rates)} for '
          f'{self.num_stages} stages'
      )
    return HybridStage(
        self.stage_sizes[i],
        self.growth_rates[i],
        self.stage_widths[i],
        last=i == self.num_stages - 1,
        theta=self.theta,
        dtype=self.dtype,
        name=f'stage{i}',
    )

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.relu(batch_norm(train, dtype=self.dtype, name='final_bn')(x))


def hcgnet(growth_rates: Sequence[int], stage_sizes: Sequence[int]) -> functools.partial:
  """Constructor of a CIFAR HCGNet (taking num_classes, dtype, first_stage as keywords)."""
  return functools.partial(
      HCGNet,
      growth_rates=tuple(growth_rates),
      stage_sizes=tuple(stage_sizes),
      stage_widths=stage_widths(growth_rates, stage_sizes),
  )


CONSTRUCTORS = {
    'hcgnet_a1': hcgnet((12, 24, 36), (8, 8, 8)),  # 1,102,651 params at 100 classes
    'hcgnet_a2': hcgnet((24, 36, 64), (8, 8, 8)),  # 3,133,679
}
