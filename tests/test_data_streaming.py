"""Tests of mcl_jax/data/streaming.py (the grain pipeline of streamed sources) and of the host
transforms (mcl_jax/data/transforms.py), on injected fake records."""

import dataclasses

import numpy as np

from mcl_jax import data

from support.fake_tfds import fake_records, patch_prepared_tfds

_FAKE_IMAGENET = fake_records(37, lambda i: (20 + i % 13, 47 - i % 11, 3), seed=4)


def _stream(**kwargs):
  options = dict(
      records=_FAKE_IMAGENET,
      global_batch=8,
      seed=3,
      image_shape=(16, 16, 3),
      train_transform=data.imagenet_train_transform,
      eval_transform=data.imagenet_eval_transform,
      shard_index=0,
      shard_count=1,
      num_threads=2,
  )
  options.update(kwargs)
  return data.stream_batches(**options)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_train_stream_is_deterministic_resumable_and_sharded():
  batches = _take(_stream(), 10)
  assert batches[0]['image'].shape == (8, 16, 16, 3) and batches[0]['image'].dtype == np.uint8
  assert batches[0]['label'].dtype == np.int32
  stream = np.concatenate([b['label'] for b in batches])
  labels = np.array([r['label'] for r in _FAKE_IMAGENET])
  # Epoch 0 = the first 37 stream positions: every example once.
  for epoch in range(2):
    ids = stream[37 * epoch : 37 * (epoch + 1)]
    np.testing.assert_array_equal(np.sort(ids), np.sort(labels))
  # Each example carries its position in the split (memory banks are indexed by it).
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(labels[index], stream)
  np.testing.assert_array_equal(np.sort(index[:37]), np.arange(37))
  for step in (4, 7):
    resumed = next(_stream(start_step=step))
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(resumed[key], batches[step][key])
  for shard in range(2):
    part = next(_stream(start_step=2, shard_index=shard, shard_count=2))
    assert part['image'].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(part['image'], batches[2]['image'][shard::2])
  other_seed = next(_stream(seed=4))
  assert not np.array_equal(other_seed['image'], batches[0]['image'])


def test_eval_pass_is_padded_and_masked():
  shards = [list(_stream(train=False, shard_index=s, shard_count=2)) for s in range(2)]
  assert [len(s) for s in shards] == [5, 5]  # 37 padded to 40 = 5 global batches of 8
  mask = np.concatenate([b['mask'] for s in shards for b in s])
  assert mask.sum() == 37
  index = np.concatenate([b['label'] for b in shards[1]])[:-2]
  np.testing.assert_array_equal(index, [r['label'] for r in _FAKE_IMAGENET[1::2]])


def test_the_imagenet_source_streams_with_its_image_size_and_transforms():
  small = dataclasses.replace(data.get('imagenet2012'), image_shape=(16, 16, 3))
  for train in (True, False):
    ours = next(
        small.batches(
            'train',
            None,
            8,
            3,
            shard_index=0,
            shard_count=1,
            train=train,
            records=_FAKE_IMAGENET,
            num_threads=2,
        )
    )
    direct = next(_stream(train=train))
    assert ours.keys() == direct.keys()
    for key in ours:
      np.testing.assert_array_equal(ours[key], direct[key])


def test_imagenet_transforms():
  image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
  out = data.imagenet_eval_transform({'image': image, 'label': 5})
  np.testing.assert_array_equal(out['image'], image[16:240, 16:240])  # no resize at 256
  wide = data.imagenet_eval_transform({'image': np.zeros((100, 300, 1), np.uint8), 'label': 0})
  assert wide['image'].shape == (224, 224, 3)
  rng = np.random.default_rng(0)
  for height, width in [(50, 400), (300, 200), (64, 64)]:
    top, left, crop_h, crop_w = data.random_resized_crop_box(height, width, rng)
    assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
    assert 3 / 4 - 0.05 <= crop_w / crop_h <= 4 / 3 + 0.05 or (height, width) == (50, 400)


def test_imagenet_test_split_reads_validation(tmp_path, monkeypatch):
  requested = patch_prepared_tfds(monkeypatch, _FAKE_IMAGENET)
  small = dataclasses.replace(data.get('imagenet2012'), image_shape=(16, 16, 3))
  batch = next(
      small.batches(
          'test', str(tmp_path), 8, 0, shard_index=0, shard_count=1, train=False, num_threads=2
      )
  )
  assert requested == [('imagenet2012', 'validation')]
  assert batch['image'].shape == (8, 16, 16, 3)
