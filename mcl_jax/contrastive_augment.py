"""On-device augmentation of self-supervised contrastive learning: random views of in-memory
images as the MoCo recipes draw them (two independent draws per image give the query and the key).

Recipes (`RECIPES`), each a pure, jit-able function of a uint8 batch and a PRNG key:

- 'v1' (MoCo v1): random resized crop (area 0.2-1 of the image, aspect ratio 3/4-4/3), greyscale
  with probability 0.2, colour jitter (brightness, contrast, saturation 0.4, hue 0.4), flip.
- 'v2' (MoCo v2, "aug-plus"): random resized crop, colour jitter (0.4, 0.4, 0.4, hue 0.1) with
  probability 0.8, greyscale with probability 0.2, Gaussian blur (sigma in [0.1, 2]) with
  probability 0.5, flip.
- 'grey' (grey images such as Fashion-MNIST, any channel count): random resized crop, brightness
  and contrast jitter 0.4 with probability 0.8, flip; nothing that needs colour.

As torchvision's transforms, with two simplifications: a crop box larger than the image is
clipped to it (torchvision redraws it up to 10 times), and the jitter runs in a fixed order
(brightness, contrast, saturation, hue) where torchvision shuffles it per image.

Streamed data (ImageNet) holds the full-resolution image only on the host: there the two views'
crop and flip are drawn by the input pipeline (`mcl_jax.data.HostViews`, scale 0.2-1 as here) and
only the colour part runs here (`crop_and_flip=False`), so nothing is cropped twice.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

RECIPES = ('v1', 'v2', 'grey')
CROP_AREA = (0.2, 1.0)  # MoCo's RandomResizedCrop(scale=(0.2, 1.0))
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])  # taps beyond 3 sigma weigh < 1%
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert('L')


def random_resized_crop(images, rng):
  """Per image, a box of random area (`CROP_AREA` of the image) and aspect ratio, resized
  bilinearly back to the image size. `[B, H, W, C]` float -> same shape."""
  batch, height, width, _ = images.shape
  area_key, ratio_key, y_key, x_key = jax.random.split(rng, 4)
  area = jax.random.uniform(area_key, (batch,), minval=CROP_AREA[0], maxval=CROP_AREA[1])
  ratio = jnp.exp(
      jax.random.uniform(ratio_key, (batch,), minval=CROP_LOG_RATIO[0], maxval=CROP_LOG_RATIO[1])
  )
  crop_h = jnp.minimum(jnp.sqrt(area * height * width / ratio), height)
  crop_w = jnp.minimum(jnp.sqrt(area * height * width * ratio), width)
  top = jax.random.uniform(y_key, (batch,)) * (height - crop_h)
  left = jax.random.uniform(x_key, (batch,)) * (width - crop_w)

  def resize(image, top, left, crop_h, crop_w):
    scale = jnp.stack([height / crop_h, width / crop_w])
    return jax.image.scale_and_translate(
        image,
        image.shape,
        spatial_dims=(0, 1),
        scale=scale,
        translation=-jnp.stack([top, left]) * scale,
        method='linear',
        antialias=False,  # always an enlargement
    )

  return jax.vmap(resize)(images, top, left, crop_h, crop_w)


def grey(images):
  """Luma `[B, H, W, 1]` of RGB images (a single channel is returned as is)."""
  if images.shape[-1] == 1:
    return images
  return jnp.sum(images * jnp.asarray(LUMA, images.dtype), axis=-1, keepdims=True)


def _blend(images, other, factor):
  """`factor * images + (1 - factor) * other`, clipped to [0, 1]; factor `[B]`."""
  factor = factor[:, None, None, None]
  return jnp.clip(factor * images + (1 - factor) * other, 0.0, 1.0)


def _rgb_to_hsv(rgb):
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = jnp.max(rgb, axis=-1), jnp.min(rgb, axis=-1)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1.0)
  hue = jnp.where(
      maxc == r, (g - b) / safe, jnp.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
  )
  hue = jnp.where(delta > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
  saturation = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  return hue, saturation, maxc


def _hsv_to_rgb(hue, saturation, value):
  sector = jnp.floor(hue * 6.0)
  frac = hue * 6.0 - sector
  p = value * (1 - saturation)
  q = value * (1 - saturation * frac)
  t = value * (1 - saturation * (1 - frac))
  sector = sector.astype(jnp.int32) % 6
  choices = [
      (value, t, p),
      (q, value, p),
      (p, value, t),
      (p, q, value),
      (t, p, value),
      (value, p, q),
  ]
  channels = [
      jnp.select([sector == s for s in range(6)], [c[ch] for c in choices]) for ch in range(3)
  ]
  return jnp.stack(channels, axis=-1)


def shift_hue(images, shift):
  """Rotates the hue of RGB images by `shift` `[B]` (in turns, torchvision's hue factor)."""
  hue, saturation, value = _rgb_to_hsv(images)
  return _hsv_to_rgb(jnp.mod(hue + shift[:, None, None], 1.0), saturation, value)


def color_jitter(images, rng, strengths: Sequence[float], prob: float = 1.0):
  """torchvision's ColorJitter(brightness, contrast, saturation, hue) = `strengths`, applied to
  each image with probability `prob`; a strength of 0 skips that part (saturation and hue need
  RGB). Factors are uniform in [1 - s, 1 + s] (hue shift in [-s, s])."""
  brightness, contrast, saturation, hue = strengths
  batch = images.shape[0]
  apply_key, *keys = jax.random.split(rng, 5)
  applied = jax.random.bernoulli(apply_key, prob, (batch,))

  def factor(key, strength):
    draw = jax.random.uniform(key, (batch,), minval=1 - strength, maxval=1 + strength)
    return jnp.where(applied, draw, 1.0)

  if brightness:
    images = _blend(images, 0.0, factor(keys[0], brightness))
  if contrast:
    mean = jnp.mean(grey(images), axis=(1, 2, 3), keepdims=True)
    images = _blend(images, mean, factor(keys[1], contrast))
  if saturation:
    images = _blend(images, grey(images), factor(keys[2], saturation))
  if hue:
    shift = jax.random.uniform(keys[3], (batch,), minval=-hue, maxval=hue)
    images = shift_hue(images, jnp.where(applied, shift, 0.0))
  return images


def random_grayscale(images, rng, prob: float):
  """Each RGB image replaced by its luma (in all 3 channels) with probability `prob`."""
  chosen = jax.random.bernoulli(rng, prob, (images.shape[0],))[:, None, None, None]
  return jnp.where(chosen, jnp.broadcast_to(grey(images), images.shape), images)


def gaussian_blur(images, rng, prob: float):
  """Separable Gaussian blur with sigma uniform in `BLUR_SIGMA`, per image with probability
  `prob`; borders extended by their edge pixels."""
  batch, height, width, _ = images.shape
  sigma_key, apply_key = jax.random.split(rng)
  sigma = jax.random.uniform(sigma_key, (batch,), minval=BLUR_SIGMA[0], maxval=BLUR_SIGMA[1])
  taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=images.dtype)
  weights = jnp.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
  weights = weights / jnp.sum(weights, axis=1, keepdims=True)  # [B, 2R + 1]
  r = BLUR_RADIUS
  padded = jnp.pad(images, ((0, 0), (r, r), (0, 0), (0, 0)), mode='edge')
  blurred = sum(
      weights[:, t, None, None, None] * padded[:, t : t + height] for t in range(2 * r + 1)
  )
  padded = jnp.pad(blurred, ((0, 0), (0, 0), (r, r), (0, 0)), mode='edge')
  blurred = sum(
      weights[:, t, None, None, None] * padded[:, :, t : t + width] for t in range(2 * r + 1)
  )
  chosen = jax.random.bernoulli(apply_key, prob, (batch,))[:, None, None, None]
  return jnp.where(chosen, blurred, images)


def random_flip(images, rng):
  """Each image mirrored left-right with probability 1/2."""
  flips = jax.random.bernoulli(rng, 0.5, (images.shape[0],))[:, None, None, None]
  return jnp.where(flips, images[:, :, ::-1], images)


def view(
    images_uint8,
    rng,
    recipe: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_and_flip: bool = True,
) -> jax.Array:
  """One random view of every image with `recipe` (one of `RECIPES`), normalised as
  `(x / 255 - mean) / std`. uint8 `[B, H, W, C]` -> float32 `[B, H, W, C]`.

  `crop_and_flip=False`: the images are views already cropped and flipped on the host (streamed
  ImageNet, `mcl_jax.data.HostViews`); only the colour part of the recipe runs here. It commutes
  with the flip, so the distribution of views is the recipe's. The keys are split as with the
  crop, so the colour draws of one `rng` are the same either way."""
  channels = images_uint8.shape[-1]
  if recipe not in RECIPES:
    raise ValueError(f'augmentation {recipe!r}: must be one of {RECIPES}')
  if recipe != 'grey' and channels != 3:
    raise ValueError(
        f"augmentation {recipe!r} needs RGB images, got {channels} channel(s): use 'grey'."
    )
  crop_key, jitter_key, grey_key, blur_key, flip_key = jax.random.split(rng, 5)
  images = images_uint8.astype(jnp.float32) / 255.0
  if crop_and_flip:
    images = random_resized_crop(images, crop_key)
  if recipe == 'v1':
    images = random_grayscale(images, grey_key, 0.2)
    images = color_jitter(images, jitter_key, (0.4, 0.4, 0.4, 0.4))
  elif recipe == 'v2':
    images = color_jitter(images, jitter_key, (0.4, 0.4, 0.4, 0.1), prob=0.8)
    images = random_grayscale(images, grey_key, 0.2)
    images = gaussian_blur(images, blur_key, 0.5)
  else:
    images = color_jitter(images, jitter_key, (0.4, 0.4, 0.0, 0.0), prob=0.8)
  if crop_and_flip:
    images = random_flip(images, flip_key)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images - mean) / std


def two_views(
    images_uint8, rng, recipe: str, *, mean, std, key_images_uint8=None
) -> tuple[jax.Array, jax.Array]:
  """(query view, key view): two independent draws of :func:`view` for every image.

  With `key_images_uint8`, `images_uint8` and it are two views of every image already cropped and
  flipped on the host (`mcl_jax.data.HostViews`): each gets the colour part of the recipe only."""
  query_key, key_key = jax.random.split(rng)
  if key_images_uint8 is None:
    key_images_uint8, crop_and_flip = images_uint8, True
  else:
    crop_and_flip = False
  return (
      view(images_uint8, query_key, recipe, mean=mean, std=std, crop_and_flip=crop_and_flip),
      view(key_images_uint8, key_key, recipe, mean=mean, std=std, crop_and_flip=crop_and_flip),
  )
