"""Host-side image transforms of streamed sources (the standard ImageNet recipe).

A streamed source applies them per example inside the input pipeline (``streaming.py``):

* training: :func:`imagenet_train_transform`, RandomResizedCrop (as torchvision's, bilinear) +
  horizontal flip with probability 1/2. A source that augments here has no on-device augmentation
  (``crop_padding=0, flip=False``), so nothing is applied twice.
* evaluation: :func:`imagenet_eval_transform`, resize the shorter side to 256/224 of the output,
  then center crop.
* several views (:class:`HostViews`, what a self-supervised method asks of a streamed source):
  :func:`imagenet_views_transform`, ``count`` independent RandomResizedCrop + flip draws of every
  image, as ``'image'``, ``'image2'``, ... (:func:`view_keys`); the method augments the rest
  (colour) on device.

Each returns ``{'image': uint8 [size, size, 3], 'label': int32}`` (plus ``'mask'`` for eval).
See docs/data.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

IMAGENET_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default (area of the image)


@dataclasses.dataclass(frozen=True)
class HostViews:
  """A request for ``count`` independently augmented views of every training image, each a
  RandomResizedCrop (area ``crop_scale`` of the image) + flip drawn on the host, in the batch as
  :func:`view_keys` ``(count)``. A method declares it (``Method.host_views``: MoCo's two views);
  streamed sources produce it, since only the host has the full-resolution image to crop."""

  count: int = 2
  crop_scale: tuple[float, float] = (0.2, 1.0)


def view_keys(count: int) -> tuple[str, ...]:
  """The batch keys of ``count`` views: ``('image', 'image2', ...)`` (the first: the usual key)."""
  return ('image',) + tuple(f'image{v}' for v in range(2, count + 1))


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
  """``(top, left, crop_height, crop_width)`` as torchvision's ``RandomResizedCrop``."""
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    crop_w = int(round(np.sqrt(target_area * aspect)))
    crop_h = int(round(np.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  # Fallback: the largest central crop whose aspect ratio is inside `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_h, crop_w = height, int(round(height * max(ratio)))
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _to_pil_rgb(image: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image).convert('RGB')


def _crop_and_flip(image, rng: np.random.Generator, image_size: int, scale) -> np.ndarray:
  """RandomResizedCrop(image_size, scale) (bilinear) + flip with probability 1/2 of a PIL image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  top, left, crop_h, crop_w = random_resized_crop_box(image.height, image.width, rng, scale)
  image = image.resize(
      (image_size, image_size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h)
  )
  pixels = np.asarray(image, np.uint8)
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


def imagenet_train_transform(
    record: dict[str, Any], rng: np.random.Generator, image_size: int = 224
) -> dict[str, np.ndarray]:
  """RandomResizedCrop(image_size) (bilinear) + horizontal flip with probability 1/2."""
  image = _crop_and_flip(_to_pil_rgb(record['image']), rng, image_size, IMAGENET_CROP_SCALE)
  return {'image': image, 'label': np.int32(record['label'])}


def imagenet_views_transform(
    record: dict[str, Any], rng: np.random.Generator, image_size: int = 224, *, views: HostViews
) -> dict[str, np.ndarray]:
  """``views.count`` independent RandomResizedCrop(image_size, ``views.crop_scale``) + flip draws
  of the record's image, one after another from ``rng`` (the stream's per-example generator, so
  the views are a function of the seed and the stream position), as :func:`view_keys`."""
  image = _to_pil_rgb(record['image'])
  out = {
      key: _crop_and_flip(image, rng, image_size, views.crop_scale)
      for key in view_keys(views.count)
  }
  return {**out, 'label': np.int32(record['label'])}


def imagenet_eval_transform(
    record: dict[str, Any], image_size: int = 224, resize_size: int | None = None
) -> dict[str, np.ndarray]:
  """Resize the shorter side to ``resize_size`` (default 256/224 * image_size), center crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  resize_size = resize_size or int(round(image_size * 256 / 224))
  image = _to_pil_rgb(record['image'])
  width, height = image.size
  if width <= height:  # as torchvision's Resize(int): the longer side is truncated
    new_w, new_h = resize_size, int(resize_size * height / width)
  else:
    new_w, new_h = int(resize_size * width / height), resize_size
  image = image.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - image_size) / 2))
  left = int(round((new_w - image_size) / 2))
  pixels = np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)
  return {'image': pixels, 'label': np.int32(record['label']), 'mask': np.bool_(True)}
