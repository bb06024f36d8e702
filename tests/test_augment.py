"""Tests of mcl_jax/augment.py: on-device pad-and-crop, flip and normalisation."""

import jax
import numpy as np

from mcl_jax import augment

MEAN, STD = (0.2, 0.5, 0.7), (0.3, 0.25, 0.2)


def _numpy_augment(images, offsets, flips, pad):
  height, width = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.stack([p[r : r + height, c : c + width] for p, (r, c) in zip(padded, offsets)])
  out = np.where(np.asarray(flips)[:, None, None, None], out[:, :, ::-1], out)
  return (out.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)


def test_augment_matches_numpy_reference():
  images = np.random.default_rng(0).integers(1, 256, (64, 8, 6, 3), np.uint8)
  key = jax.random.key(3)
  run = jax.jit(lambda x, k: augment.augment_batch(x, k, mean=MEAN, std=STD, pad=2))
  out = run(images, key)
  assert out.shape == images.shape and out.dtype == np.float32
  offsets, flips = (np.asarray(a) for a in augment.augment_params(key, 64, pad=2))
  assert offsets.min() == 0 and offsets.max() == 4 and 0 < flips.sum() < 64
  np.testing.assert_allclose(out, _numpy_augment(images, offsets, flips, 2), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out, run(images, key))  # same key, same output
  assert not np.array_equal(out, run(images, jax.random.key(4)))


def test_augment_pads_with_black_pixels():
  images = np.full((32, 5, 5, 3), 255, np.uint8)
  out = np.asarray(augment.augment_batch(images, jax.random.key(0), mean=MEAN, std=STD, pad=4))
  offsets, _ = (np.asarray(a) for a in augment.augment_params(jax.random.key(0), 32, pad=4))
  black = (0 - np.float32(MEAN)) / np.float32(STD)
  is_black = np.all(np.isclose(out, black), axis=-1)
  # Each crop is the 5x5 window at `offset` of the 13x13 padded image: rows/columns outside
  # [4, 9) of the padded image are black (the flip mirrors columns, not their count).
  rows = np.arange(5)[None, :] + offsets[:, :1]
  cols = np.arange(5)[None, :] + offsets[:, 1:]
  black_rows = (rows < 4) | (rows >= 9)
  black_cols = (cols < 4) | (cols >= 9)
  np.testing.assert_array_equal(is_black.all(axis=2), black_rows | black_cols.all(1)[:, None])
  np.testing.assert_array_equal(
      is_black.sum(axis=(1, 2)), 25 - (~black_rows).sum(1) * (~black_cols).sum(1)
  )


def test_augment_without_crop_or_flip_is_normalize():
  images = np.random.default_rng(1).integers(0, 256, (4, 7, 7, 1), np.uint8)
  out = augment.augment_batch(images, jax.random.key(0), mean=(0.3,), std=(0.4,), pad=0, flip=False)
  np.testing.assert_allclose(out, augment.normalize(images, (0.3,), (0.4,)), rtol=1e-6)
  np.testing.assert_allclose(out, (images / 255 - 0.3) / 0.4, rtol=1e-5, atol=1e-6)
