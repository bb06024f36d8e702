"""MoCo's on-device views (mcl_jax.contrastive_augment) against colorsys / direct computation."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import contrastive_augment as ca


def test_hue_shift_matches_colorsys():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(size=(3, 4, 5, 3)).astype(np.float32)
  shift = np.asarray([0.0, 0.25, -0.4], np.float32)
  got = np.asarray(ca.shift_hue(jnp.asarray(rgb), jnp.asarray(shift)))
  for b in range(3):
    for idx in np.ndindex(4, 5):
      h, s, v = colorsys.rgb_to_hsv(*rgb[b][idx])
      want = colorsys.hsv_to_rgb((h + shift[b]) % 1.0, s, v)
      np.testing.assert_allclose(got[b][idx], want, atol=1e-5)


def test_jitter_factors_of_one_and_no_blur_change_nothing():
  images = jax.random.uniform(jax.random.key(0), (4, 6, 6, 3))
  same = ca.color_jitter(images, jax.random.key(1), (0.4, 0.4, 0.4, 0.1), prob=0.0)
  np.testing.assert_allclose(same, images, atol=1e-6)
  np.testing.assert_array_equal(ca.gaussian_blur(images, jax.random.key(2), 0.0), images)


def test_blur_and_crop_keep_a_constant_image_constant():
  images = jnp.full((3, 10, 10, 3), 0.3)
  np.testing.assert_allclose(ca.gaussian_blur(images, jax.random.key(0), 1.0), 0.3, atol=1e-6)
  np.testing.assert_allclose(ca.random_resized_crop(images, jax.random.key(0)), 0.3, atol=1e-6)


def test_blur_lowers_the_variance_of_noise():
  noise = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  blurred = ca.gaussian_blur(noise, jax.random.key(1), 1.0)
  assert np.all(np.var(blurred, axis=(1, 2, 3)) < np.var(noise, axis=(1, 2, 3)))


def test_crop_zooms_into_the_image():
  """A crop is a part of the image enlarged: a centred bright square covers more of the view
  on average than of the image."""
  images = jnp.zeros((64, 20, 20, 1)).at[:, 6:14, 6:14].set(1.0)
  views = ca.random_resized_crop(images, jax.random.key(0))
  assert views.shape == images.shape
  assert float(jnp.mean(views)) > float(jnp.mean(images))


@pytest.mark.parametrize('recipe,channels', [('v1', 3), ('v2', 3), ('grey', 1)])
def test_two_views_differ_and_are_reproducible(recipe, channels):
  images = jax.random.randint(jax.random.key(0), (4, 16, 16, channels), 0, 256).astype(jnp.uint8)
  kwargs = dict(mean=(0.5,) * channels, std=(0.25,) * channels)
  q, k = jax.jit(lambda x, r: ca.two_views(x, r, recipe, **kwargs))(images, jax.random.key(3))
  assert q.shape == k.shape == images.shape and q.dtype == jnp.float32
  assert not np.allclose(q, k)
  q2, _ = ca.two_views(images, jax.random.key(3), recipe, **kwargs)
  np.testing.assert_allclose(q, q2, atol=1e-5)
  assert np.all(np.abs(q) <= 2.0 + 1e-5)  # inside [0, 1] before normalising


def test_colour_recipes_refuse_grey_images():
  with pytest.raises(ValueError, match="needs RGB images, got 1 channel.*use 'grey'"):
    ca.view(jnp.zeros((2, 8, 8, 1), jnp.uint8), jax.random.key(0), 'v2', mean=(0.5,), std=(1.0,))
