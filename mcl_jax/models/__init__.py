"""Model zoo: `get_model(arch, num_classes)` returns a flax.linen Module.

Every model maps NHWC images [B, H, W, C] to a dict with
  'logits'  [B, num_classes] float32,
  'feature' [B, model.feature_dim] float32 (the pooled input of the classifier),
  'stages'  tuple of per-stage feature maps [B, H_s, W_s, C_s],
and keeps BatchNorm statistics in the `batch_stats` collection:

    model = get_model('resnet32', num_classes=100)
    variables = model.init(rng, x, train=False)
    out, new_state = model.apply(variables, x, train=True, mutable=['batch_stats'])
"""

from __future__ import annotations

import jax.numpy as jnp

from mcl_jax.models import cifar_resnet, imagenet_resnet, mobilenet, shufflenet, vgg, wrn
from mcl_jax.models import okd  # multi-branch nets (MCL-OKD); needs cifar_resnet first
from mcl_jax.models.cifar_resnet import StagedNet

_CONSTRUCTORS = {
    **cifar_resnet.CONSTRUCTORS,
    **wrn.CONSTRUCTORS,
    **shufflenet.CONSTRUCTORS,
    **vgg.CONSTRUCTORS,
    **mobilenet.CONSTRUCTORS,
    **imagenet_resnet.CONSTRUCTORS,
    **okd.CONSTRUCTORS,
}

ARCHS = tuple(_CONSTRUCTORS)


def get_model(arch: str, num_classes: int, dtype=jnp.float32, *, first_stage: int = 0) -> StagedNet:
    """Builds the network `arch` (one of `ARCHS`) with a `num_classes`-way classifier.

    Args:
      arch: architecture name, e.g. 'resnet32', 'wrn_16_2', 'resnet50'.
      num_classes: classifier width.
      dtype: compute dtype of convolutions and BatchNorm (params, feature and logits stay float32).
      first_stage: > 0 builds only stages first_stage.. + pool + classifier, applied to the output map
        of stage first_stage - 1 (L-MCL auxiliary branches); see `StagedNet`.
    """
    if arch not in _CONSTRUCTORS:
        raise ValueError(f"Unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    return _CONSTRUCTORS[arch](num_classes=num_classes, dtype=dtype, first_stage=first_stage)


__all__ = ["ARCHS", "StagedNet", "get_model"]
