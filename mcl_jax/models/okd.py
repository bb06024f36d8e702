"""Multi-branch networks for MCL-OKD (ONE/OKDDip style, ``docs/methods.md#mcl-okd``).

`MultiBranchNet` splits a registered stage-tails base net (a `StagedNet`) at a stage boundary: the
stem and the first `shared_stages` stages are shared (the base built with `end_stage=shared_stages`;
their parameters sit at the top of the tree: `stem_conv`, `stage0`, ...); each of the M branches
`branch<m>` owns the later stages, the pre-pool layers, the pool and the classifier (the base built
with `first_stage=shared_stages`). Arch names are `<base>_okd<M>`, e.g. `resnet32_okd4`. Outputs
carry a leading branch axis, which the cohort flattens into its peer axis, so the M branches are
evaluated and distilled like M peers:
  'logits'  [M, B, num_classes],  'feature' [M, B, feature_dim],
  'stages'  (the shared stage maps [B, H_s, W_s, C_s], then the per-branch later stage maps
             [M, B, H_s, W_s, C_s]).

`BASES` maps each base to its number of shared stages, following how the authors'
`models/mcl_okd_*.py` (github.com/winycg/MCL-OKD, commit 5de042a) split each net:
  resnet32, resnet110 (`mcl_okd_resnet.py`): conv1 + bn1 + layer1 shared; layer2, layer3 and the
    classifier per branch -> 1 (resnet8/20/56, which the authors do not split, alike).
  densenet40_12 (`mcl_okd_densenet.py`): conv0, denseblock1, transition1 shared; denseblock2,
    transition2, denseblock3, the final BN and the classifier per branch -> 1 (a stage of
    `densenet.DenseNet` is a dense block + its transition).
  vgg16 (`mcl_okd_vgg.py`): conv1, conv2, layer1, layer2 shared; layer3, layer4 and the classifier
    per branch -> 3 (the max-pool closing layer2 opens stage 3 here, so it runs in the branches:
    parameter-free, the same computation).
  hcgnet_a1 (`mcl_okd_hcgnet.py`): conv0, HybridBlock1, Transition1 shared; the rest per branch -> 1.
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
    'densenet40_12': 1,
    'vgg16': 3,
    'hcgnet_a1': 1,
    # ImageNet ResNets (`mcl_okd_resnet_imagenet`'s ResNet-34): conv1 .. layer2 shared, layer3,
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
