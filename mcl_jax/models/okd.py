"""Multi-branch networks: MCL-OKD's (ONE/OKDDip style, ``docs/methods.md#mcl-okd``) and MCL's
shared-trunk MCL(x>2) nets (``docs/methods.md#mcl-multi-branch-networks``).

`MultiBranchNet` splits a registered stage-tails base net (a `StagedNet`) at a stage boundary: the
stem and the first `shared_stages` stages are shared (the base built with `end_stage=shared_stages`;
their parameters sit at the top of the tree: `stem_conv`, `stage0`, ...); each of the M branches
`branch<m>` owns the later stages, the pre-pool layers, the pool and the classifier (the base built
with `first_stage=shared_stages`). Arch names are `<base>_okd<M>`, e.g. `resnet32_okd4`. Outputs
carry a leading branch axis, which the cohort flattens into its peer axis, so the M branches are
evaluated and distilled like M peers (the methods' "views"):
  'logits'  [M, B, num_classes],  'feature' [M, B, feature_dim],
  'stages'  (the shared stage maps [B, H_s, W_s, C_s], then the per-branch later stage maps
             [M, B, H_s, W_s, C_s]).

`BASES` maps each base to its number of shared stages, following how the authors split each net:
MCL-OKD in `models/mcl_okd_*.py` (github.com/winycg/MCL-OKD, commit 5de042a), and MCL, whose
`--number-net 2` builds independent nets (`*_n`) but any other number the shared-trunk `*_b`
classes (github.com/winycg/MCL, commit 236da2f, `models/*.py`). Where both papers split a net they
split it identically, so one name serves both:
  resnet32, resnet56, resnet110 (MCL `resnet.py` `ResNet_b`; MCL-OKD `mcl_okd_resnet.py` splits
    resnet32 and resnet110): conv1 + bn1 + layer1 shared; layer2, layer3 and the classifier per
    branch -> 1 (resnet8/20, which the authors do not split, alike).
  wrn_16_2, wrn_40_2, wrn_28_4 (MCL `wrn.py` `WideResNet_b`): conv1 + block1 shared; block2, block3,
    the final BN and the classifier per branch -> 1.
  shufflenetv2_0_5, shufflenetv2_1_0 (MCL `shufflenetv2.py` `ShuffleNetV2_b`): conv1 + bn1 + layer1
    shared; layer2, layer3, conv2 + bn2 and the classifier per branch -> 1.
  densenet40_12 (MCL-OKD `mcl_okd_densenet.py`): conv0, denseblock1, transition1 shared;
    denseblock2, transition2, denseblock3, the final BN and the classifier per branch -> 1 (a stage
    of `densenet.DenseNet` is a dense block + its transition).
  vgg16 (MCL-OKD `mcl_okd_vgg.py`): conv1, conv2, layer1, layer2 shared; layer3, layer4 and the
    classifier per branch -> 3 (the max-pool closing layer2 opens stage 3 here, so it runs in the
    branches: parameter-free, the same computation).
  hcgnet_a1, hcgnet_a2 (MCL-OKD `mcl_okd_hcgnet.py`, MCL `hcgnet.py` `HCGNet_b`): conv0,
    HybridBlock1, Transition1 shared; the rest per branch -> 1.
  resnet18, resnet34 (ImageNet; MCL-OKD `mcl_okd_resnet_imagenet.py`'s ResNet-34, MCL
    `resnet_imagenet.py` `ResNet_b`): conv1 .. layer2 shared; layer3, layer4 and the classifier per
    branch -> 2 (resnet50, which the authors do not split, alike).
The parameter counts equal the authors' modules' exactly (tests/test_models_okd_nets.py,
tests/test_models_hcgnet.py pin them).
Adding a base is one line in `BASES` (`'<arch>': <shared stages>`; the arch must be registered with
`stage_tails=True`; it is looked up in the registry when a model is built). For other names,
`multi_branch(arch, num_branches, shared_stages)` is the constructor to pass to `models.register`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

BRANCH_COUNTS = (2, 3, 4)
# base arch -> number of shared stages (the authors' split, see the module docstring)
BASES = {
    'resnet8': 1,
    'resnet20': 1,
    'resnet32': 1,
    'resnet56': 1,
    'resnet110': 1,
    'wrn_16_2': 1,  # MCL(x4)
    'wrn_40_2': 1,  # MCL(x4)
    'wrn_28_4': 1,  # MCL(x4)
    'shufflenetv2_0_5': 1,  # MCL(x4)
    'shufflenetv2_1_0': 1,  # MCL(x4)
    'densenet40_12': 1,
    'vgg16': 3,
    'hcgnet_a1': 1,
    'hcgnet_a2': 1,  # MCL(x4)
    # ImageNet ResNets (MCL-OKD's ResNet-34, MCL's ResNet_b): conv1 .. layer2 shared, layer3,
    # layer4 and the classifier per branch -> 2.
    'resnet18': 2,
    'resnet34': 2,
    'resnet50': 2,
}


class MultiBranchNet(nn.Module):
  """The stem and stages 0..shared_stages - 1 of `base`, shared; then `num_branches` tails.

  base: a stage-tails constructor (a `functools.partial` of a `StagedNet` subclass): it takes
  num_classes, dtype, first_stage, end_stage and flax's name / parent as keywords.
  """

  base: Callable[..., nn.Module]
  num_classes: int
  num_branches: int
  shared_stages: int = 1
  dtype: Any = jnp.float32

  def _net(self, **kw) -> nn.Module:
    return self.base(num_classes=self.num_classes, dtype=self.dtype, **kw)

  @property
  def feature_dim(self) -> int:
    return self._net(parent=None).feature_dim  # unbound: never a child of the caller

  @nn.compact
  def __call__(self, x, *, train: bool):
    trunk = self._net(end_stage=self.shared_stages, name='trunk')
    # The trunk's parameters live in this module's scope (stem_conv, stage0, ...), not under
    # 'trunk': the tree is the base's own, minus the later stages, plus branch0..branch<M-1>.
    nn.share_scope(self, trunk)
    shared = trunk(x, train=train)['stages']
    outs = [
        self._net(first_stage=self.shared_stages, name=f'branch{m}')(shared[-1], train=train)
        for m in range(self.num_branches)
    ]
    stack = lambda key: jnp.stack([o[key] for o in outs])  # noqa: E731
    later = tuple(jnp.stack(maps) for maps in zip(*(o['stages'] for o in outs)))
    return {'logits': stack('logits'), 'feature': stack('feature'), 'stages': shared + later}


def multi_branch(arch: str, num_branches: int, shared_stages: int = 1) -> Callable[..., nn.Module]:
  """Constructor `(num_classes, dtype)` of the `num_branches`-branch net on the registered `arch`."""

  def make(num_classes: int, dtype=jnp.float32) -> MultiBranchNet:
    # Looked up when built: this module is imported while the registry is being filled.
    from mcl_jax import models  # pylint: disable=g-import-not-at-top

    spec = models.spec(arch)
    if not spec.stage_tails or spec.num_branches != 1:
      raise ValueError(
          f'A multi-branch net needs a single-branch base registered with stage_tails=True; '
          f'{arch!r} is not one.'
      )
    return MultiBranchNet(
        spec.constructor,
        num_classes=num_classes,
        num_branches=num_branches,
        shared_stages=shared_stages,
        dtype=dtype,
    )

  return make


# name -> (constructor, number of branches)
CONSTRUCTORS = {
    f'{base}_okd{m}': (multi_branch(base, m, shared), m)
    for base, shared in BASES.items()
    for m in BRANCH_COUNTS
}
