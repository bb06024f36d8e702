"""Tests of mcl_jax/data/splits.py: what a run trains and evaluates on, from its config."""

import numpy as np
import pytest

from mcl_jax import data

from support import tiny_config
from support.fake_tfds import fake_records, patch_prepared_tfds


def test_in_memory_splits_are_shrunk_as_the_config_says():
  config = tiny_config(**{'data.train_examples': 100, 'data.eval_examples': 30})
  train, test = data.load_splits(config)
  full_train, full_test = data.load('fashion_mnist', 'train'), data.load('fashion_mnist', 'test')
  # A fixed, seed-independent subset of the training set, in its original order.
  keep = np.sort(np.random.default_rng(0).permutation(len(full_train))[:100])
  np.testing.assert_array_equal(train.images, full_train.images[keep])
  np.testing.assert_array_equal(train.labels, full_train.labels[keep])
  np.testing.assert_array_equal(test.labels, full_test.labels[:30])
  assert train.image_shape == (28, 28, 1) and train.num_classes == 10
  unshrunk = tiny_config(**{'data.train_examples': -1, 'data.eval_examples': -1})
  assert [len(s) for s in data.load_splits(unshrunk)] == [20_000, 10_000]


def test_streamed_splits_know_their_sizes_and_read_labels_lazily(tmp_path, monkeypatch):
  records = fake_records(11, (8, 8, 3))
  requested = patch_prepared_tfds(monkeypatch, records)
  config = tiny_config(**{'data.name': 'imagenet2012', 'data.data_dir': str(tmp_path)})
  train, test = data.load_splits(config, workdir=str(tmp_path / 'run'))
  assert isinstance(train, data.StreamedSplit) and isinstance(test, data.StreamedSplit)
  assert (len(train.labels), len(test.labels)) == (1_281_167, 50_000)  # no record read yet
  assert train.image_shape == (224, 224, 3) and train.num_classes == 1000
  assert (train.mean, train.std) == data.normalization('imagenet2012') and not requested
  np.testing.assert_array_equal(np.asarray(train.labels), [r['label'] for r in records])
  assert requested == [('imagenet2012', 'train')]
  with pytest.raises(NotImplementedError, match='come with the batches'):
    np.asarray(test.labels)
