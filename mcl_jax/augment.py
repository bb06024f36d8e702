"""On-device augmentation for in-memory (CIFAR-size) data: pad-and-crop, flip, normalise.

Everything is a pure, jit-able function of the uint8 batch and a PRNG key; the trainer passes
``fold_in(key, step)`` so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """float32 ``(images / 255 - mean) / std``, per channel; images ``[..., C]`` uint8."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def augment_params(
    rng: jax.Array, batch_size: int, *, pad: int = 4, flip: bool = True
) -> tuple[jax.Array, jax.Array]:
  """The random choices of :func:`augment_batch` for ``rng``.

  Returns:
    offsets: int32 ``[B, 2]`` (row, column) of the crop window in the padded image, each in
      ``[0, 2 * pad]``; ``(pad, pad)`` is the unshifted image.
    flips: bool ``[B]``, True where the crop is mirrored left-right.
  """
  crop_key, flip_key = jax.random.split(rng)
  offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  else:
    flips = jnp.zeros((batch_size,), bool)
  return offsets, flips


def augment_batch(
    images_uint8: jax.Array,
    rng: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pad: int = 4,
    flip: bool = True,
) -> jax.Array:
  """Random crop with zero padding + random horizontal flip, then :func:`normalize`.

  As torchvision's ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip()``: each image is
  padded with ``pad`` zero pixels on every side (in uint8 pixel space, so the padding is
  black, not the mean) and an ``H x W`` window is cut at a per-sample offset; the flip is
  applied to the crop. Choices come from :func:`augment_params` with the same ``rng``.

  Args:
    images_uint8: uint8 ``[B, H, W, C]``.
    rng: a PRNG key.
    mean, std: per-channel statistics in [0, 1] units (``C`` values each).
    pad: padding in pixels (0: no crop).
    flip: whether to flip at random.

  Returns:
    float32 ``[B, H, W, C]``.
  """
  batch_size, height, width, channels = images_uint8.shape
  offsets, flips = augment_params(rng, batch_size, pad=pad, flip=flip)
  padded = jnp.pad(images_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop_and_flip(image, offset, flipped):
    window = jax.lax.dynamic_slice(
        image, (offset[0], offset[1], jnp.zeros_like(offset[0])), (height, width, channels)
    )
    return jnp.where(flipped, window[:, ::-1], window)

  crops = jax.vmap(crop_and_flip)(padded, offsets, flips)
  return normalize(crops, mean, std)
