"""Tests of mcl_jax.data (sources, batch sampling, ImageNet pipeline) and mcl_jax.augment."""

import gzip
import importlib.util
import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mcl_jax import augment
from mcl_jax import data

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load_script():
  path = REPO / 'scripts' / 'make_embedded_data.py'
  spec = importlib.util.spec_from_file_location('make_embedded_data', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SCRIPT = _load_script()
FMNIST_SOURCE = SCRIPT.default_source()
needs_fmnist_source = pytest.mark.skipif(
    not (FMNIST_SOURCE / 'train-images-idx3-ubyte.gz').is_file(),
    reason=f'Fashion-MNIST IDX files not in {FMNIST_SOURCE}',
)


# ----------------------------------------------------------------------------------------------
# Embedded Fashion-MNIST
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('split,per_class', [('train', 2000), ('test', 1000)])
def test_embedded_fashion_mnist(split, per_class):
  ds = data.load('fashion_mnist', split)
  assert ds.images.shape == (10 * per_class, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (10 * per_class,) and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.labels), [per_class] * 10)
  assert ds.num_classes == 10 and len(ds) == 10 * per_class
  assert (ds.mean, ds.std) == data.normalization('fashion_mnist')
  assert not ds.images.flags.writeable  # the cached arrays are shared
  assert ds.images.std() > 50  # real images, not blank
  assert data.load('fashion_mnist', split).images is ds.images
  assert len(ds.take(7)) == 7


def test_dataset_info_matches_loaded_data():
  info = data.dataset_info('fashion_mnist')
  ds = data.load('fashion_mnist', 'train')
  assert info == ((28, 28, 1), 10, 20_000)
  assert (info.image_shape, info.num_classes, info.num_train_examples) == (
      ds.images.shape[1:],
      ds.num_classes,
      len(ds),
  )
  assert data.num_examples('fashion_mnist', 'test') == 10_000
  assert data.dataset_info('cifar100') == ((32, 32, 3), 100, 50_000)
  assert data.dataset_info('imagenet2012') == ((224, 224, 3), 1000, 1_281_167)
  with pytest.raises(ValueError, match='Unknown data set'):
    data.dataset_info('cifar10')
  with pytest.raises(ValueError, match='Unknown split'):
    data.load('fashion_mnist', 'validation')


def test_fashion_mnist_constants_are_the_train_statistics():
  mean, std = SCRIPT.channel_stats(data.load('fashion_mnist', 'train').images)
  np.testing.assert_allclose(mean, data.FASHION_MNIST_MEAN, atol=5e-5)
  np.testing.assert_allclose(std, data.FASHION_MNIST_STD, atol=5e-5)


@needs_fmnist_source
def test_shipped_file_equals_script_output():
  built = SCRIPT.build_arrays(FMNIST_SOURCE)
  with np.load(REPO / 'mcl_jax' / 'data_files' / data.EMBEDDED_FILE) as shipped:
    shipped = {name: shipped[name] for name in shipped.files}
  assert SCRIPT.arrays_sha256(built) == SCRIPT.arrays_sha256(shipped)
  # The subset is what it claims to be: stratified rows of the original train split.
  full_images, full_labels = data.read_fashion_mnist_idx(FMNIST_SOURCE, 'train')
  rows = shipped['train_source_indices']
  assert np.all(np.diff(rows) > 0)
  np.testing.assert_array_equal(full_images[rows], shipped['train_images'])
  np.testing.assert_array_equal(full_labels[rows], shipped['train_labels'])
  licence = (REPO / 'mcl_jax' / 'data_files' / SCRIPT.LICENCE_NAME).read_text()
  assert 'Zalando SE' in licence and 'Permission is hereby granted' in licence


def test_stratified_subset_indices():
  labels = np.repeat(np.arange(4), 30)[np.random.default_rng(1).permutation(120)]
  chosen = data.stratified_subset_indices(labels, 5, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[chosen]), [5] * 4)
  assert np.all(np.diff(chosen) > 0)
  np.testing.assert_array_equal(chosen, data.stratified_subset_indices(labels, 5, seed=3))
  assert not np.array_equal(chosen, data.stratified_subset_indices(labels, 5, seed=4))


def test_read_idx(tmp_path):
  expected = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
  header = bytes([0, 0, 8, 3]) + np.array([3, 2, 2], '>u4').tobytes()
  with gzip.open(tmp_path / 'x-idx3-ubyte.gz', 'wb') as f:
    f.write(header + expected.tobytes())
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'x-idx3-ubyte.gz'), expected)
  (tmp_path / 'bad').write_bytes(bytes([0, 0, 9, 1, 0, 0, 0, 1, 5]))  # int8, not uint8
  with pytest.raises(ValueError, match='not an unsigned-byte IDX'):
    data.read_idx(tmp_path / 'bad')


def test_fashion_mnist_full_missing_names_the_package(tmp_path):
  for call in (
      lambda: data.load('fashion_mnist_full', 'train', str(tmp_path)),
      lambda: data.check_available('fashion_mnist_full', str(tmp_path)),
  ):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
      call()


@needs_fmnist_source
def test_fashion_mnist_full_from_idx_folder():
  ds = data.load('fashion_mnist_full', 'train', str(FMNIST_SOURCE))
  assert ds.images.shape == (60_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.labels), [6000] * 10)
  mean, std = SCRIPT.channel_stats(ds.images)
  np.testing.assert_allclose(mean, data.FASHION_MNIST_FULL_MEAN, atol=5e-5)
  np.testing.assert_allclose(std, data.FASHION_MNIST_FULL_STD, atol=5e-5)


# ----------------------------------------------------------------------------------------------
# tfds prepared data (offline)
# ----------------------------------------------------------------------------------------------


def _assert_missing_message(error, name, data_dir):
  message = str(error.value)
  assert f"tfds data set '{name}' is not prepared under {data_dir}." in message
  assert f"'tfds build {name} --data_dir={data_dir} --file_format=array_record'" in message
  assert 'data.name=fashion_mnist' in message


@pytest.mark.parametrize('name', ['cifar100', 'imagenet2012'])
def test_tfds_missing_data_is_a_clear_error(name, tmp_path):
  calls = [
      lambda: data.check_available(name, str(tmp_path)),
      lambda: data.load(name, 'train', str(tmp_path)),
      lambda: data.imagenet_iterator('train', str(tmp_path), 8, 0, shard_index=0, shard_count=1),
  ]
  for call in calls if name == 'imagenet2012' else calls[:2]:
    with pytest.raises(FileNotFoundError) as error:
      call()
    _assert_missing_message(error, name, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was downloaded or prepared


def test_tfds_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    data.check_available('cifar100')
  _assert_missing_message(error, 'cifar100', str(tmp_path))


@pytest.mark.parametrize(
    'tfds_error',
    [
        NotImplementedError('Random access data source for file format tfrecord is not supported.'),
        KeyError("Trying to access `splits['train']` but `splits` is empty."),
    ],
)
def test_confusing_tfds_errors_are_rewritten(tfds_error, tmp_path, monkeypatch):
  def as_data_source(self, split, **kwargs):
    raise tfds_error

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'as_data_source', as_data_source)
  with pytest.raises(FileNotFoundError) as error:
    data.load('cifar100', 'test', str(tmp_path))
  _assert_missing_message(error, 'cifar100', str(tmp_path))
  assert error.value.__cause__ is tfds_error


def _fake_records(count, shape, seed=0):
  rng = np.random.default_rng(seed)
  return [
      {
          'image': rng.integers(0, 256, shape(i) if callable(shape) else shape, np.uint8),
          'label': np.int64(i % 7),
          'id': f'ex{i}',
      }
      for i in range(count)
  ]


def _patch_prepared_tfds(monkeypatch, records):
  requested = []

  def as_data_source(self, split, **kwargs):
    requested.append((self.name, split))
    return records

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'as_data_source', as_data_source)
  return requested


def test_cifar100_is_read_into_memory(tmp_path, monkeypatch):
  records = _fake_records(1030, (32, 32, 3))  # more than one read chunk
  requested = _patch_prepared_tfds(monkeypatch, records)
  ds = data.load('cifar100', 'test', str(tmp_path))
  assert requested == [('cifar100', 'test')]
  assert ds.images.shape == (1030, 32, 32, 3) and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.images[1029], records[1029]['image'])
  np.testing.assert_array_equal(ds.labels, [r['label'] for r in records])
  assert ds.num_classes == 100 and ds.mean == (0.5071, 0.4867, 0.4408)


# ----------------------------------------------------------------------------------------------
# Batch index sampling
# ----------------------------------------------------------------------------------------------


def test_steps_per_epoch_drops_the_remainder():
  assert data.steps_per_epoch(50_000, 128) == 390
  assert data.steps_per_epoch(256, 128) == 2


def test_uniform_batches_cover_each_example_once_per_epoch():
  labels = np.arange(103) % 10
  sampler = data.BatchSampler(labels, 10, seed=5)
  for epoch in range(2):
    seen = np.concatenate([sampler.indices(10 * epoch + i) for i in range(10)])
    assert seen.dtype == np.int32 and len(np.unique(seen)) == 100
    expected = np.random.default_rng([5, epoch]).permutation(103)[:100]
    np.testing.assert_array_equal(seen, expected)
  # A pure function of (seed, step): no hidden state from earlier calls.
  fresh = data.BatchSampler(labels, 10, seed=5)
  np.testing.assert_array_equal(fresh.indices(13), sampler.indices(13))
  np.testing.assert_array_equal(data.batch_indices(labels, 10, 5, 13), sampler.indices(13))
  assert not np.array_equal(data.batch_indices(labels, 10, 6, 13), sampler.indices(13))
  assert not np.array_equal(sampler.indices(3), sampler.indices(13))  # epochs differ


def test_class_balanced_with_fewer_classes_than_batch_over_m():
  labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
  sampler = data.BatchSampler(labels, 128, seed=1, class_balanced=True, samples_per_class=2)
  for step in range(20):
    batch = sampler.indices(step)
    assert batch.shape == (128,) and batch.dtype == np.int32
    assert len(np.unique(batch)) == 128
    # Every class, 12 = 128 // 10 consecutive rows each, then 8 filled from anywhere.
    np.testing.assert_array_equal(
        labels[batch[:120]].reshape(10, 12), np.repeat(labels[batch[:120:12]][:, None], 12, axis=1)
    )
    assert sorted(labels[batch[:120:12]]) == list(range(10))
    assert np.all(np.bincount(labels[batch], minlength=10) >= 12)
  fills = np.concatenate([sampler.indices(s)[120:] for s in range(50)])
  assert len(np.unique(labels[fills])) == 10  # the fill is not tied to a class


def test_class_balanced_with_enough_classes():
  labels = np.repeat(np.arange(100), 6)
  sampler = data.BatchSampler(labels, 128, seed=2, class_balanced=True, samples_per_class=2)
  classes_seen = set()
  for step in range(30):
    batch = sampler.indices(step)
    counts = np.bincount(labels[batch], minlength=100)
    assert sorted(set(counts.tolist())) == [0, 2] and (counts == 2).sum() == 64
    assert len(np.unique(batch)) == 128
    np.testing.assert_array_equal(labels[batch[0::2]], labels[batch[1::2]])
    classes_seen |= set(labels[batch].tolist())
  assert classes_seen == set(range(100))
  again = data.batch_indices(labels, 128, 2, 17, class_balanced=True, samples_per_class=2)
  np.testing.assert_array_equal(again, sampler.indices(17))
  assert not np.array_equal(sampler.indices(17), sampler.indices(18))
  with pytest.raises(ValueError, match='multiple of samples_per_class'):
    data.BatchSampler(labels, 127, seed=2, class_balanced=True, samples_per_class=2)


def test_class_balanced_within_class_draw_is_uniform():
  picks = data._random_subsets(np.random.default_rng(0), np.full(30_000, 4), 2)
  assert np.all(picks[:, 0] != picks[:, 1]) and picks.min() == 0 and picks.max() == 3
  pairs = np.bincount(np.sort(picks, axis=1) @ [4, 1], minlength=16)[[1, 2, 3, 6, 7, 11]]
  np.testing.assert_allclose(pairs / 30_000, 1 / 6, atol=0.015)
  tiny = data._random_subsets(np.random.default_rng(0), np.array([1, 5]), 3)
  np.testing.assert_array_equal(tiny[0], [0, 0, 0])  # too small: with replacement
  assert len(set(tiny[1].tolist())) == 3


# ----------------------------------------------------------------------------------------------
# On-device augmentation
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# ImageNet pipeline (grain) on an injected fake source
# ----------------------------------------------------------------------------------------------

_FAKE_IMAGENET = _fake_records(37, lambda i: (20 + i % 13, 47 - i % 11, 3), seed=4)


def _imagenet(**kwargs):
  options = dict(
      split='train',
      data_dir=None,
      global_batch=8,
      seed=3,
      image_size=16,
      shard_index=0,
      shard_count=1,
      source=_FAKE_IMAGENET,
      num_threads=2,
  )
  options.update(kwargs)
  return data.imagenet_iterator(**options)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_imagenet_train_stream_is_deterministic_resumable_and_sharded():
  batches = _take(_imagenet(), 10)
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
    resumed = next(_imagenet(start_step=step))
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(resumed[key], batches[step][key])
  for shard in range(2):
    part = next(_imagenet(start_step=2, shard_index=shard, shard_count=2))
    assert part['image'].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(part['image'], batches[2]['image'][shard::2])
  other_seed = next(_imagenet(seed=4))
  assert not np.array_equal(other_seed['image'], batches[0]['image'])


def test_imagenet_eval_pass_is_padded_and_masked():
  shards = [
      list(_imagenet(split='test', train=False, shard_index=s, shard_count=2)) for s in range(2)
  ]
  assert [len(s) for s in shards] == [5, 5]  # 37 padded to 40 = 5 global batches of 8
  mask = np.concatenate([b['mask'] for s in shards for b in s])
  assert mask.sum() == 37
  index = np.concatenate([b['label'] for b in shards[1]])[:-2]
  np.testing.assert_array_equal(index, [r['label'] for r in _FAKE_IMAGENET[1::2]])


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
  requested = _patch_prepared_tfds(monkeypatch, _FAKE_IMAGENET)
  batch = next(
      data.imagenet_iterator(
          'test',
          str(tmp_path),
          8,
          0,
          image_size=16,
          shard_index=0,
          shard_count=1,
          train=False,
          num_threads=2,
      )
  )
  assert requested == [('imagenet2012', 'validation')]
  assert batch['image'].shape == (8, 16, 16, 3)
