"""`FlexibleStagedNet`: the `StagedNet` contract for nets whose stages are not (1, 2, 2, ...)-strided
uniform residual `Stage`s (VGG, ShuffleNetV2, MobileNetV2), and the depthwise conv they share.

`StagedNet` fixes the stage strides to (1, 2, 2, ...) and builds every stage as a `Stage` of one block
type. The nets here need per-stage strides (`stage_strides`: VGG's un-pooled last block, ShuffleNetV2's
downsampling first stage) and, for MobileNetV2, stages of mixed widths (`make_stage`). Everything else
is `StagedNet`'s: stem -> stages -> pre_pool -> global average pool -> linear classifier, stage i's
parameters under `stage{i}`, `first_stage` slicing, and the same output dict.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models.cifar_resnet import KAIMING_FAN_OUT, Stage, StagedNet, classifier

Dtype = Any


def depthwise_conv(channels: int, strides: int = 1, *, dtype: Dtype, name: str | None = None) -> nn.Conv:
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


class FlexibleStagedNet(StagedNet):
    """`StagedNet` with per-stage strides and an overridable stage builder.

    `stage_strides[i]` is the stride of stage i (its first block's); `make_stage(i)` builds stage i (a
    `Stage` of `block`s by default). Subclasses define `stem` (and optionally `pre_pool`, and
    `feature_dim` when `pre_pool` changes the width). As in `StagedNet`, the output map of stage i has
    `stage_widths[i] * block.expansion` channels, which L-MCL's auxiliary branches rely on.
    """

    stage_strides: Sequence[int] = ()

    def make_stage(self, i: int) -> nn.Module:
        """Stage i, named `stage{i}`: [B, H, W, C_{i-1}] -> [B, H / s_i, W / s_i, C_i]."""
        return Stage(
            self.block,
            self.stage_sizes[i],
            self.stage_widths[i],
            strides=self.stage_strides[i],
            dtype=self.dtype,
            name=f"stage{i}",
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, Any]:
        if len(self.stage_strides) != self.num_stages or len(self.stage_widths) != self.num_stages:
            raise ValueError(
                f"stage_sizes {tuple(self.stage_sizes)}, stage_widths {tuple(self.stage_widths)} and "
                f"stage_strides {tuple(self.stage_strides)} must have one entry per stage"
            )
        if not 0 <= self.first_stage < self.num_stages:
            raise ValueError(f"first_stage={self.first_stage} must be in [0, {self.num_stages})")
        if self.first_stage == 0:
            x = self.stem(x, train)
        stages = []
        for i in range(self.first_stage, self.num_stages):
            x = self.make_stage(i)(x, train=train)
            stages.append(x)
        x = self.pre_pool(x, train)
        # Pool in float32: a bf16 sum over H*W positions loses precision.
        feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = classifier(self.num_classes, self.feature_dim)(feature)
        return {"logits": logits, "feature": feature, "stages": tuple(stages)}
