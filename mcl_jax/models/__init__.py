"""Model zoo: `get_model(arch, num_classes)` returns a flax.linen Module.

Every model maps NHWC images [B, H, W, C] to a dict with
  'logits'  [B, num_classes] float32 (float64 in a float64 model),
  'feature' [B, model.feature_dim] same dtype as the logits (the pooled input of the classifier),
  'stages'  tuple of per-stage feature maps [B, H_s, W_s, C_s],
and keeps BatchNorm statistics in the `batch_stats` collection:

    model = get_model('resnet32', num_classes=100)
    variables = model.init(rng, x, train=False)
    out, new_state = model.apply(variables, x, train=True, mutable=['batch_stats'])
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from mcl_jax import registry
from mcl_jax.models import cifar_resnet, hcgnet, imagenet_resnet, mobilenet, shufflenet, vgg, wrn
from mcl_jax.models import densenet, mobilenet_v1, shufflenet_v1
from mcl_jax.models import okd  # multi-branch nets (MCL-OKD); bases looked up here when built
from mcl_jax.models.cifar_resnet import StagedNet
from mcl_jax.models.flops import count_macs


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """A registered architecture and what it offers beyond the basic contract.

  constructor(num_classes=, dtype=) -> nn.Module, whose `__call__(x, *, train)` returns
  {'logits' [B, C], 'feature' [B, D], 'stages' (tuple of maps; may be empty)}, with attributes
  `num_classes` and `feature_dim` (= D).
  num_branches: > 1 for a multi-branch model (MCL-OKD, MCL(x4)): its 'logits' and 'feature' carry
    a leading branch axis [M, B, ...] and each branch counts as a peer in evaluation.
  stage_tails: the constructor also takes `first_stage=s` and then builds only stages s.. + pool +
    classifier on the output map of stage s - 1 (L-MCL's auxiliary branches); the module is a
    `StagedNet` (attributes num_stages, stage_widths, block, stage_sizes).
  """

  constructor: Callable[..., nn.Module]
  num_branches: int = 1
  stage_tails: bool = False


_REGISTRY: registry.Registry[ArchSpec] = registry.Registry('model', 'model.arch')


def register(
    name: str,
    constructor: Callable[..., nn.Module],
    *,
    num_branches: int = 1,
    stage_tails: bool = False,
    replace: bool = False,
) -> Callable[..., nn.Module]:
  """Makes `name` usable as `model.arch` / in `model.archs` (see `ArchSpec` for the contract)."""
  if not callable(constructor):
    raise TypeError(f'models.register({name!r}, ...): the constructor must be callable.')
  if num_branches < 1:
    raise ValueError(f'models.register({name!r}, ...): num_branches must be >= 1.')
  spec = ArchSpec(constructor, num_branches, stage_tails)
  _REGISTRY.register(name, spec, replace=replace)
  return constructor


def spec(arch: str) -> ArchSpec:
  """The registered `ArchSpec` of `arch` (KeyError naming the registered ones)."""
  return _REGISTRY.get(arch)


def names() -> tuple[str, ...]:
  return _REGISTRY.names()


def origin(arch: str) -> registry.Origin:
  return _REGISTRY.origin(arch)


def get_model(arch: str, num_classes: int, dtype=jnp.float32, *, first_stage: int = 0) -> nn.Module:
  """Builds the network `arch` (a registered name) with a `num_classes`-way classifier.

  Args:
    arch: architecture name, e.g. 'resnet32', 'wrn_16_2', 'resnet50'.
    num_classes: classifier width.
    dtype: compute dtype of convolutions and BatchNorm (params stay float32; feature and logits are
      float32, float64 in a float64 model).
    first_stage: > 0 builds only stages first_stage.. + pool + classifier, applied to the output map
      of stage first_stage - 1 (L-MCL auxiliary branches; archs registered with stage_tails).
  """
  arch_spec = spec(arch)
  if first_stage:
    if not arch_spec.stage_tails:
      raise ValueError(
          f'model.arch={arch!r} does not build stage tails (first_stage={first_stage}); it was '
          'registered without stage_tails=True.'
      )
    return arch_spec.constructor(num_classes=num_classes, dtype=dtype, first_stage=first_stage)
  return arch_spec.constructor(num_classes=num_classes, dtype=dtype)


for _module in (
    cifar_resnet,
    wrn,
    shufflenet,
    shufflenet_v1,
    vgg,
    mobilenet,
    mobilenet_v1,
    hcgnet,
    densenet,
    imagenet_resnet,
):
  for _name, _constructor in _module.CONSTRUCTORS.items():
    register(_name, _constructor, stage_tails=True)
for _name, (_constructor, _branches) in okd.CONSTRUCTORS.items():
  register(_name, _constructor, num_branches=_branches)

__all__ = ['ArchSpec', 'StagedNet', 'count_macs', 'get_model', 'names', 'register', 'spec']
