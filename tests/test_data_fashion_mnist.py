"""Tests of mcl_jax/data/fashion_mnist.py: the embedded subset and the IDX files."""

import gzip
import importlib.util
import pathlib

import numpy as np
import pytest

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
  assert ds.image_shape == info.image_shape
  assert data.num_examples('fashion_mnist', 'test') == 10_000
  with pytest.raises(ValueError, match='Unknown split'):
    data.load('fashion_mnist', 'validation')


def test_fashion_mnist_constants_are_the_train_statistics():
  mean, std = SCRIPT.channel_stats(data.load('fashion_mnist', 'train').images)
  np.testing.assert_allclose(mean, data.FASHION_MNIST_MEAN, atol=5e-5)
  np.testing.assert_allclose(std, data.FASHION_MNIST_STD, atol=5e-5)
  np.testing.assert_allclose(
      data.channel_stats(data.load('fashion_mnist', 'train').images), (mean, std)
  )


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
