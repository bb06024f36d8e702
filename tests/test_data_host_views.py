"""Several augmented views per image from a streamed source's host pipeline
(`mcl_jax.data.HostViews`, what `moco_mcl` asks of streamed ImageNet): two independent
RandomResizedCrop + flip draws per image, deterministic in (seed, step), resumable, sharded; the
method then runs only the colour part of its views on device; a streamed MoCo run resumes exactly.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mcl_jax import contrastive_augment, data, methods, train
from mcl_jax import step as step_lib

from support import reproducible, restore_final_state, tiny_config
from support.fake_tfds import fake_records, patch_prepared_tfds

_RECORDS = fake_records(37, lambda i: (20 + i % 13, 47 - i % 11, 3), seed=4)
VIEWS = data.HostViews(count=2, crop_scale=(0.2, 1.0))
SMALL = dataclasses.replace(data.get('imagenet2012'), image_shape=(16, 16, 3))


def _stream(views=VIEWS, seed=3, **kwargs):
  options = dict(shard_index=0, shard_count=1, records=_RECORDS, num_threads=2)
  options.update(kwargs)
  return SMALL.batches('train', None, 8, seed, views=views, **options)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_two_views_differ_are_deterministic_resumable_and_sharded():
  batches = _take(_stream(), 8)
  first = batches[0]
  assert set(first) == {'image', 'image2', 'label', 'index'}
  assert first['image'].shape == first['image2'].shape == (8, 16, 16, 3)
  assert first['image2'].dtype == np.uint8
  for batch in batches:  # two independent draws: different crops of every image
    for n in range(8):
      assert not np.array_equal(batch['image'][n], batch['image2'][n])
  # The views are a function of (seed, step): the same again, different with another seed.
  again = _take(_stream(), 8)
  for a, b in zip(batches, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = next(_stream(seed=4))
  assert not np.array_equal(other['image2'], first['image2'])
  # Resumed at a step: exactly the uninterrupted batches from there on (across the epoch end).
  for step in (3, 5):
    resumed = _take(_stream(start_step=step), 8 - step)
    for a, b in zip(resumed, batches[step:]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{step} {key}')
  for shard in range(2):
    part = next(_stream(start_step=2, shard_index=shard, shard_count=2))
    for key in ('image', 'image2', 'index'):
      np.testing.assert_array_equal(part[key], batches[2][key][shard::2])
  # The same examples in the same order as the one-view stream: only the images change.
  plain = next(_stream(views=None))
  assert set(plain) == {'image', 'label', 'index'}
  np.testing.assert_array_equal(plain['index'], first['index'])


def test_views_transform_draws_each_view_from_the_example_generator():
  record = {'image': np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3), 'label': 2}
  three = data.imagenet_views_transform(
      record, np.random.default_rng(7), 16, views=data.HostViews(3)
  )
  assert list(three) == ['image', 'image2', 'image3', 'label'] == [*data.view_keys(3), 'label']
  # View v is the v-th crop + flip drawn from the generator: the first two views of a two-view
  # request from the same generator are the same images.
  two = data.imagenet_views_transform(record, np.random.default_rng(7), 16, views=VIEWS)
  np.testing.assert_array_equal(two['image'], three['image'])
  np.testing.assert_array_equal(two['image2'], three['image2'])
  # A view is RandomResizedCrop(scale) + flip, drawn in that order.
  rng = np.random.default_rng(7)
  top, left, crop_h, crop_w = data.random_resized_crop_box(40, 30, rng, VIEWS.crop_scale)
  box = (left, top, left + crop_w, top + crop_h)
  want = np.asarray(Image.fromarray(record['image']).resize((16, 16), Image.BILINEAR, box=box))
  if rng.random() < 0.5:
    want = want[:, ::-1]
  np.testing.assert_array_equal(two['image'], want)
  # The one-view ImageNet transform is unchanged: torchvision's scale 0.08-1, then the flip.
  rng = np.random.default_rng(1)
  single = data.imagenet_train_transform(record, rng, 16)
  top, left, crop_h, crop_w = data.random_resized_crop_box(40, 30, np.random.default_rng(1))
  box = (left, top, left + crop_w, top + crop_h)
  want = np.asarray(Image.fromarray(record['image']).resize((16, 16), Image.BILINEAR, box=box))
  flipped = np.random.default_rng(1)
  data.random_resized_crop_box(40, 30, flipped)
  np.testing.assert_array_equal(single['image'], want[:, ::-1] if flipped.random() < 0.5 else want)


def test_host_views_get_only_the_colour_part_on_device():
  """With 'image2' in the batch, moco_mcl does not crop or flip again: each view is the colour
  part of the recipe applied to its host view (the same colour draws as the on-device path)."""
  method = methods.build(methods.config('moco_mcl', augmentation='v1'))
  images = np.zeros((16, 12, 12, 3), np.uint8)
  images[:, :, 6:] = 200  # left half dark, right half bright: a crop or a flip would move it
  second = images[:, :, ::-1].copy()  # the host flipped the key view
  aug = data.augment_spec(tiny_config(**{'data.name': 'fashion_mnist'}))
  aug.mean, aug.std = (0.5,) * 3, (0.25,) * 3
  batch = {'image': jnp.asarray(images), 'image2': jnp.asarray(second)}
  rng = jax.random.key(5)
  views = jax.jit(lambda b, r: method.augment(b, r, aug))(batch, rng)
  query_key, key_key = jax.random.split(rng)
  kwargs = dict(mean=aug.mean, std=aug.std, crop_and_flip=False)
  chex.assert_trees_all_close(
      views['image'], contrastive_augment.view(batch['image'], query_key, 'v1', **kwargs), atol=1e-6
  )
  chex.assert_trees_all_close(
      views['key_image'],
      contrastive_augment.view(batch['image2'], key_key, 'v1', **kwargs),
      atol=1e-6,
  )

  def halves(view):  # mean of each image's left and right half
    view = np.asarray(view)
    return view[:, :, :6].mean(axis=(1, 2, 3)), view[:, :, 6:].mean(axis=(1, 2, 3))

  left, right = halves(views['image'])
  assert np.all(left < right)  # not flipped (or cropped) again
  left, right = halves(views['key_image'])
  assert np.all(left > right)
  # Without 'image2' (in-memory data): the on-device crop + flip, two views of one image.
  on_device = method.augment({'image': jnp.asarray(images)}, rng, aug)
  assert not np.allclose(on_device['image'], views['image'])


@pytest.fixture
def streamed_source(monkeypatch):
  rng = np.random.default_rng(0)
  records = [
      {'image': rng.integers(0, 256, (20, 18, 3), dtype=np.uint8), 'label': i % 10}
      for i in range(40)
  ]
  patch_prepared_tfds(monkeypatch, records)  # every tfds split reads `records`
  small = dataclasses.replace(
      data.get('imagenet2012'), image_shape=(16, 16, 3), num_classes=10, num_train=40, num_test=40
  )
  data.register('imagenet2012_16px_views', small, replace=True)
  return 'imagenet2012_16px_views'


def moco_streamed_config(name, tmp_path):
  return tiny_config(
      **{
          'data.name': name,
          'data.data_dir': str(tmp_path / 'tfds'),
          'data.train_examples': 0,
          'data.eval_batch_size': 16,
          'batch_size': 8,
          'total_steps': 4,
          'eval_every_steps': 4,
          'log_every_steps': 1,
          'method.name': 'moco_mcl',
          'method.queue_size': 16,
          'method.bn_groups': 2,
          'method.embed_dim': 8,
          'method.augmentation': 'v1',
          'method.knn_bank_examples': 0,
      }
  )


def test_streamed_moco_trains_on_host_views_and_resumes_exactly(streamed_source, tmp_path):
  config = moco_streamed_config(streamed_source, tmp_path)
  abstract = train.abstract_run(config)
  assert set(abstract.batch) == {'image', 'image2', 'label', 'index'}
  exp = train.Experiment(config)
  raw = exp.batch(1)
  assert set(raw) == {'image', 'image2', 'label', 'index'}
  local = next(exp.train_data.batches(8, config.seed, start_step=1, views=VIEWS))
  np.testing.assert_array_equal(np.asarray(raw['image2']), local['image2'])
  batch, _ = step_lib.augmented_batch(raw, jnp.int32(1), config.seed, exp.aug, exp.method)
  step_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  _, key_key = jax.random.split(jax.random.split(step_key)[0])
  expected = contrastive_augment.view(
      raw['image2'], key_key, 'v1', mean=exp.aug.mean, std=exp.aug.std, crop_and_flip=False
  )
  chex.assert_trees_all_close(batch['key_image'], expected, atol=1e-6)

  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  last = train.run(config, straight)
  assert 0.0 <= last['eval/best_peer/top1'] <= 1.0
  train.run(config, resumed, stop_after_steps=2)
  train.run(config, resumed)
  chex.assert_trees_all_equal(restore_final_state(straight), restore_final_state(resumed))
  from mcl_jax.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  assert reproducible(read_metrics(straight)) == reproducible(read_metrics(resumed))


def test_streamed_moco_needs_knn_off(streamed_source, tmp_path):
  config = moco_streamed_config(streamed_source, tmp_path)
  config.method.knn_bank_examples = 100
  with pytest.raises(ValueError, match='knn_bank_examples=0'):
    train.Experiment(config)
