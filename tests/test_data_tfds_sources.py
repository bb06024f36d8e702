"""Tests of mcl_jax/data/tfds_sources.py: prepared tfds data, offline (nothing is downloaded)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mcl_jax import data

from support.fake_tfds import assert_missing_message, fake_records, patch_prepared_tfds


@pytest.mark.parametrize('name', ['cifar100', 'imagenet2012'])
def test_tfds_missing_data_is_a_clear_error(name, tmp_path):
  source = data.get(name)
  calls = [
      lambda: data.check_available(name, str(tmp_path)),
      lambda: data.load(name, 'train', str(tmp_path)),
      lambda: source.batches('train', str(tmp_path), 8, 0, shard_index=0, shard_count=1),
  ]
  for call in calls if source.streamed else calls[:2]:
    with pytest.raises(FileNotFoundError) as error:
      call()
    assert_missing_message(error, name, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was downloaded or prepared


def test_tfds_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    data.check_available('cifar100')
  assert_missing_message(error, 'cifar100', str(tmp_path))


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
  assert_missing_message(error, 'cifar100', str(tmp_path))
  assert error.value.__cause__ is tfds_error


def test_cifar100_is_read_into_memory(tmp_path, monkeypatch):
  records = fake_records(1030, (32, 32, 3))  # more than one read chunk
  requested = patch_prepared_tfds(monkeypatch, records)
  ds = data.load('cifar100', 'test', str(tmp_path))
  assert requested == [('cifar100', 'test')]
  assert ds.images.shape == (1030, 32, 32, 3) and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.images[1029], records[1029]['image'])
  np.testing.assert_array_equal(ds.labels, [r['label'] for r in records])
  assert ds.num_classes == 100 and ds.mean == (0.5071, 0.4867, 0.4408)


def test_a_streamed_source_is_not_loaded_into_memory(tmp_path, monkeypatch):
  patch_prepared_tfds(monkeypatch, fake_records(4, (8, 8, 3)))
  with pytest.raises(ValueError, match='imagenet2012 is streamed'):
    data.load('imagenet2012', 'train', str(tmp_path))


def test_streamed_labels_are_read_once_and_cached(tmp_path, monkeypatch):
  records = fake_records(9, (8, 8, 3))
  requested = patch_prepared_tfds(monkeypatch, records)
  labels = data.train_labels('imagenet2012', str(tmp_path), cache_dir=str(tmp_path / 'run'))
  np.testing.assert_array_equal(labels, [r['label'] for r in records])
  assert labels.dtype == np.int32 and requested == [('imagenet2012', 'train')]
  assert os.path.exists(tmp_path / 'run' / 'imagenet2012_train_labels.npy')
  again = data.train_labels('imagenet2012', str(tmp_path), cache_dir=str(tmp_path / 'run'))
  np.testing.assert_array_equal(again, labels)
  assert len(requested) == 1  # from the cache


def test_any_tfds_data_set_streams_under_its_own_name(tmp_path, monkeypatch):
  """The streamed pipeline takes the tfds name, splits and image size from the source."""
  requested = patch_prepared_tfds(monkeypatch, fake_records(12, (20, 24, 3)))
  source = data.StreamedTfdsSource(
      'imagenette',
      tfds_name='imagenette/160px',
      tfds_splits={'train': 'train', 'test': 'validation'},
      image_shape=(16, 16, 3),
      num_classes=10,
      num_train=12,
      num_test=12,
      mean=data.IMAGENET_MEAN,
      std=data.IMAGENET_STD,
  )
  assert (source.crop_padding, source.flip) == (0, False)  # augmented on the host
  batch = next(source.batches('train', str(tmp_path), 4, 0, shard_index=0, shard_count=1))
  eval_batch = next(
      source.batches('test', str(tmp_path), 4, 0, shard_index=0, shard_count=1, train=False)
  )
  assert batch['image'].shape == eval_batch['image'].shape == (4, 16, 16, 3)
  assert requested == [('imagenette', 'train'), ('imagenette', 'validation')]
