"""CIFAR ResNets (ResNet-8/20/32/56/110, ResNet8x4/32x4, CRD's ResNet50) and the building blocks
shared by all models.

The CIFAR ResNets follow the authors' `models/resnet.py` (winycg/MCL, identical to CRD's): a 3x3 stem,
three stages of post-activation blocks (strides 1, 2, 2), a projection shortcut (1x1 conv + BN) wherever
the shape changes, global average pooling and a linear classifier.

The shared pieces (`conv`, `batch_norm`, `classifier`, `ResidualBlock`, `BasicBlock`, `Bottleneck`,
`Stage`, `StagedNet`) live here and are reused by `wrn.py` and `imagenet_resnet.py`.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax import kernels

Dtype = Any

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'), as torchvision and the authors:
# an untruncated normal with variance 2 / (k_h * k_w * out_channels).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(
    features: int, kernel: int, strides: int = 1, *, dtype: Dtype, name: str | None = None
) -> nn.Conv:
  """Bias-free square convolution with PyTorch's symmetric `kernel // 2` padding.

  Symmetric padding (not 'SAME') keeps strided convs aligned exactly like the reference nets.
  """
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=strides,
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=KAIMING_FAN_OUT,
      dtype=dtype,
      name=name,
      # lax's convolution unless the train or eval step enables the CPU kernels (mcl_jax.kernels)
      conv_general_dilated=kernels.conv_general_dilated,
  )


def batch_norm(train: bool, *, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 in torch's convention == 0.9 here, eps 1e-5)."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


def classifier(num_classes: int, fan_in: int, dtype: Dtype = jnp.float32) -> nn.Dense:
  """Linear classifier with torch.nn.Linear's default init (U(+-1/sqrt(fan_in)) for weight and bias).

  Computed in `dtype`: float32 at least whatever the backbone dtype (`StagedNet.head_dtype`): it is
  tiny, and logits feed softmax/KL losses.
  """
  bound = fan_in**-0.5

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nn.Dense(
      num_classes,
      dtype=dtype,
      kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'),
      bias_init=bias_init,
      name='classifier',
  )


class ResidualBlock(nn.Module):
  """Fields shared by every residual block; subclasses define `__call__(x, *, train)`.

  x: [B, H, W, C_in] -> [B, H / strides, W / strides, features * expansion].
  """

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  expansion: ClassVar[int] = 1  # output channels / `features`


class BasicBlock(ResidualBlock):
  """Post-activation basic block: relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = conv(self.features, 3, self.strides, dtype=self.dtype, name='conv1')(x)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='bn1')(h))
    h = conv(self.features, 3, dtype=self.dtype, name='conv2')(h)
    h = batch_norm(train, dtype=self.dtype, name='bn2')(h)
    return nn.relu(h + _projection_shortcut(x, self.features, self.strides, train, self.dtype))


class Bottleneck(ResidualBlock):
  """Post-activation bottleneck block (1x1 -> 3x3 with the stride -> 1x1 x4), as torchvision v1.5."""

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out_features = self.features * self.expansion
    h = conv(self.features, 1, dtype=self.dtype, name='conv1')(x)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='bn1')(h))
    h = conv(self.features, 3, self.strides, dtype=self.dtype, name='conv2')(h)
    h = nn.relu(batch_norm(train, dtype=self.dtype, name='bn2')(h))
    h = conv(out_features, 1, dtype=self.dtype, name='conv3')(h)
    h = batch_norm(train, dtype=self.dtype, name='bn3')(h)
    return nn.relu(h + _projection_shortcut(x, out_features, self.strides, train, self.dtype))


def _projection_shortcut(
    x: jax.Array, features: int, strides: int, train: bool, dtype: Dtype
) -> jax.Array:
  """Identity, or 1x1 conv (stride `strides`) + BN when the block changes the shape of x.

  Must be called from inside a block's compact `__call__` (it creates the `proj_*` submodules there).
  """
  if strides == 1 and x.shape[-1] == features:
    return x
  x = conv(features, 1, strides, dtype=dtype, name='proj_conv')(x)
  return batch_norm(train, dtype=dtype, name='proj_bn')(x)


class Stage(nn.Module):
  """`num_blocks` blocks of one width; only the first one strides.

  x: [B, H, W, C_in] -> [B, H / strides, W / strides, features * block.expansion].
  """

  block: type[ResidualBlock]
  num_blocks: int
  features: int
  strides: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      block = self.block(
          features=self.features,
          strides=self.strides if i == 0 else 1,
          dtype=self.dtype,
          name=f'block{i}',
      )
      x = block(x, train=train)
    return x


class StagedNet(nn.Module):
  """stem -> stages -> pre_pool -> global average pool -> linear classifier.

  Subclasses define `stem` (and optionally `pre_pool`). The first stage has stride 1, every later
  stage stride 2. Stage i's parameters live under `stage{i}`.

  `first_stage = s > 0` builds the tail of the network only: no stem and no stages before s; the input
  is then the output map of stage s - 1 ([B, H, W, C_{s-1}]). This is how L-MCL's auxiliary branches
  (a fresh copy of the later stages on top of an intermediate feature map) are made; their parameter
  tree is the matching subtree of the full network.

  `end_stage = e > 0` builds stages first_stage..e - 1 only (no pre_pool, pool or classifier) and
  returns {'stages': (...)} alone: the shared trunk of a multi-branch net (`okd.MultiBranchNet`).

  Called as `model.apply(variables, x, train=...)`, it returns a dict:
    'logits':  [B, num_classes] float32
    'feature': [B, feature_dim] float32, the pooled input of the classifier
    'stages':  tuple of the stage outputs [B, H_s, W_s, C_s] (compute dtype), stages first_stage..end
  """

  num_classes: int
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  block: type[ResidualBlock]
  first_stage: int = 0
  dtype: Dtype = jnp.float32
  # Stride of each stage (its first block's); empty means (1, 2, 2, ...), the CIFAR ResNet/WRN rule.
  stage_strides: Sequence[int] = ()
  end_stage: int = 0  # > 0: the trunk (stages first_stage..end_stage - 1) only

  @property
  def feature_dim(self) -> int:
    """Width d of the pooled feature, known without init."""
    return self.stage_widths[-1] * self.block.expansion

  @property
  def num_stages(self) -> int:
    return len(self.stage_sizes)

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    raise NotImplementedError

  def pre_pool(self, x: jax.Array, train: bool) -> jax.Array:
    """Applied to the last stage's output before pooling (WRN's final BN + ReLU); identity here."""
    return x

  def make_stage(self, i: int) -> nn.Module:
    """Stage i, named `stage{i}`: a `Stage` of `block`s by default (nets with mixed stages
    override this). [B, H, W, C_{i-1}] -> [B, H / s_i, W / s_i, C_i]."""
    strides = self.stage_strides[i] if self.stage_strides else (1 if i == 0 else 2)
    return Stage(
        self.block,
        self.stage_sizes[i],
        self.stage_widths[i],
        strides=strides,
        dtype=self.dtype,
        name=f'stage{i}',
    )

  @property
  def head_dtype(self) -> Dtype:
    """Dtype of the pooling and the classifier: float32 for float32 and bfloat16 backbones (a bf16
    sum over H*W positions loses precision), float64 for float64 ones (the strategy checks)."""
    return jnp.promote_types(self.dtype, jnp.float32)

  def make_classifier(self) -> nn.Module:
    """The classifier, named `classifier` ([B, feature_dim] head_dtype -> [B, num_classes]), with
    torch's default `nn.Linear` init; nets whose authors initialise it otherwise override this."""
    return classifier(self.num_classes, self.feature_dim, self.head_dtype)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, Any]:
    if (
        len(self.stage_widths) != self.num_stages
        or self.stage_strides
        and (len(self.stage_strides) != self.num_stages)
    ):
      raise ValueError(
          f'stage_sizes {tuple(self.stage_sizes)}, stage_widths {tuple(self.stage_widths)} and '
          f'stage_strides {tuple(self.stage_strides)} must have one entry per stage'
      )
    if not 0 <= self.first_stage < self.num_stages:
      raise ValueError(f'first_stage={self.first_stage} must be in [0, {self.num_stages})')
    if self.end_stage and not self.first_stage < self.end_stage <= self.num_stages:
      raise ValueError(
          f'end_stage={self.end_stage} must be in ({self.first_stage}, {self.num_stages}]'
      )
    if self.first_stage == 0:
      x = self.stem(x, train)
    stages = []
    for i in range(self.first_stage, self.end_stage or self.num_stages):
      x = self.make_stage(i)(x, train=train)
      stages.append(x)
    if self.end_stage:
      return {'stages': tuple(stages)}
    x = self.pre_pool(x, train)
    feature = jnp.mean(x.astype(self.head_dtype), axis=(1, 2))
    logits = self.make_classifier()(feature)
    return {'logits': logits, 'feature': feature, 'stages': tuple(stages)}


class CifarResNet(StagedNet):
  """CIFAR ResNet: 3x3 conv (`stem_width`) + BN + ReLU stem, then three stages (strides 1, 2, 2; CRD's
  ResNet50, `resnet50_cifar`, has four: 1, 2, 2, 2).

  Input [B, H, W, C] at any size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST).
  """

  stem_width: int = 16

  def stem(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.stem_width, 3, dtype=self.dtype, name='stem_conv')(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))


def cifar_resnet(
    depth: int,
    *,
    bottleneck: bool = False,
    stem_width: int = 16,
    stage_widths: Sequence[int] = (16, 32, 64),
) -> functools.partial:
  """Constructor of a CIFAR ResNet-`depth` (taking num_classes, dtype, first_stage as keywords).

  Basic blocks: depth = 6n + 2; bottleneck blocks: depth = 9n + 2 (n blocks per stage).
  """
  layers_per_block = 9 if bottleneck else 6
  if (depth - 2) % layers_per_block:
    raise ValueError(f'CIFAR ResNet depth {depth} is not {layers_per_block}n + 2')
  n = (depth - 2) // layers_per_block
  return functools.partial(
      CifarResNet,
      stage_sizes=(n, n, n),
      stage_widths=tuple(stage_widths),
      block=Bottleneck if bottleneck else BasicBlock,
      stem_width=stem_width,
  )


# CRD's "x4" nets: a 32-channel stem and 4x wider stages.
_X4 = dict(stem_width=32, stage_widths=(64, 128, 256))

CONSTRUCTORS = {
    'resnet8': cifar_resnet(8),
    'resnet20': cifar_resnet(20),
    'resnet32': cifar_resnet(32),
    'resnet56': cifar_resnet(56),
    # MCL's ResNet-110 is the bottleneck variant (12 blocks per stage, 256-d feature), as in the
    # authors' code (docs/methods.md#initialisation).
    'resnet110': cifar_resnet(110, bottleneck=True),
    'resnet8x4': cifar_resnet(8, **_X4),
    'resnet32x4': cifar_resnet(32, **_X4),
    # CRD's `models/resnetv2.py` ResNet50 (RepDistiller), the CIFAR teacher of ResNet50 -> MobileNetV2:
    # torchvision's ResNet-50 stages on a 3x3/1 stem (64 ch, no max-pool); stage strides 1, 2, 2, 2, so
    # a 32x32 input gives stage maps 32, 16, 8, 4. ('resnet50' is the ImageNet net.)
    'resnet50_cifar': functools.partial(
        CifarResNet,
        stage_sizes=(3, 4, 6, 3),
        stage_widths=(64, 128, 256, 512),
        block=Bottleneck,
        stem_width=64,
    ),
}
