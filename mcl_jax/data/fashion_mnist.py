"""Fashion-MNIST: the subset embedded in the package, and the full set from its IDX files.

* :class:`EmbeddedFashionMnist` reads ``mcl_jax/data_files/fashion_mnist.npz``: a stratified
  subset of Fashion-MNIST, 2,000 train images per class (20,000) + the full 10,000-image test
  split, 28x28x1, built by ``scripts/make_embedded_data.py``. Nothing is fetched at run time.
* :class:`FashionMnistIdx` reads the four original IDX files, e.g. all 60,000 train images from
  the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).

See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
import pathlib
from typing import Hashable

import numpy as np

from mcl_jax.data import base

FASHION_MNIST_DEB_DIR = '/usr/share/datasets/fashion-mnist'
EMBEDDED_FILE = 'fashion_mnist.npz'
# How the embedded subset is drawn (scripts/make_embedded_data.py uses exactly these).
EMBEDDED_TRAIN_PER_CLASS = 2000
EMBEDDED_SUBSET_SEED = 20170825  # Fashion-MNIST's release date; any fixed value would do.

# Per-channel statistics in [0, 1] pixel units, computed by scripts/make_embedded_data.py over the
# respective train sets (checked by tests/test_data_fashion_mnist.py).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2864,), (0.3532,)
FASHION_MNIST_FULL_MEAN, FASHION_MNIST_FULL_STD = (0.2860,), (0.3530,)


# ---- The embedded subset ------------------------------------------------------------------------
def embedded_path() -> pathlib.Path:
  """The shipped ``.npz``; FileNotFoundError naming the fix if the install lacks it."""
  path = pathlib.Path(str(importlib.resources.files('mcl_jax') / 'data_files' / EMBEDDED_FILE))
  if not path.is_file():
    raise FileNotFoundError(
        f'The embedded Fashion-MNIST file {path} is missing: the mcl_jax install is incomplete. '
        'Reinstall the package (pip install .), or regenerate it with '
        "'python scripts/make_embedded_data.py'."
    )
  return path


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class EmbeddedFashionMnist(base.DataSource):
  """The Fashion-MNIST subset shipped inside the package; ``data_dir`` is ignored."""

  def check_available(self, data_dir: str | None = None) -> None:
    embedded_path()

  def cache_key(self, split: str, data_dir: str | None) -> Hashable:
    return ('embedded_fashion_mnist', split)

  def read(self, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(embedded_path()) as arrays:
      return arrays[f'{split}_images'], arrays[f'{split}_labels']


# ---- The IDX files ------------------------------------------------------------------------------
_IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parses an (optionally gzipped) unsigned-byte IDX file into a uint8 array.

  IDX layout: two zero bytes, the type code 0x08 (uint8), the number of dimensions n, then n
  big-endian uint32 sizes, then the raw data.
  """
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[:3] != b'\x00\x00\x08':
    raise ValueError(f'{path} is not an unsigned-byte IDX file')
  ndim = raw[3]
  shape = tuple(int(s) for s in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != np.prod(shape):
    raise ValueError(f'{path}: header says {shape} but holds {data.size} bytes')
  return data.reshape(shape)


def _idx_paths(directory: str | os.PathLike, split: str) -> list[pathlib.Path]:
  return [pathlib.Path(directory) / f for f in _IDX_FILES[split]]


def _idx_missing(directory: str | os.PathLike) -> str:
  return (
      f'Fashion-MNIST IDX files not found in {directory}. Install them with '
      "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu; files land in "
      f'{FASHION_MNIST_DEB_DIR}), or pass data.data_dir=<folder with '
      'train-images-idx3-ubyte.gz ...>, or use the embedded default (data.name=fashion_mnist).'
  )


def read_fashion_mnist_idx(
    directory: str | os.PathLike, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a Fashion-MNIST split from its four IDX files: uint8 ``[N,28,28,1]``, int32 ``[N]``."""
  base.check_split(split)
  image_path, label_path = _idx_paths(directory, split)
  if not (image_path.is_file() and label_path.is_file()):
    raise FileNotFoundError(_idx_missing(directory))
  images, labels = read_idx(image_path)[..., None], read_idx(label_path).astype(np.int32)
  if images.shape[1:] != (28, 28, 1) or len(images) != len(labels):
    raise ValueError(f'unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}')
  return images, labels


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class FashionMnistIdx(base.DataSource):
  """Fashion-MNIST read from its IDX files in ``data_dir`` (default ``default_dir``)."""

  default_dir: str = FASHION_MNIST_DEB_DIR

  def _directory(self, data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or self.default_dir)

  def check_available(self, data_dir: str | None = None) -> None:
    directory = self._directory(data_dir)
    for split in base.SPLITS:
      if not all(path.is_file() for path in _idx_paths(directory, split)):
        raise FileNotFoundError(_idx_missing(directory))

  def cache_key(self, split: str, data_dir: str | None) -> Hashable:
    return ('fashion_mnist_idx', split, self._directory(data_dir))

  def read(self, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    return read_fashion_mnist_idx(self._directory(data_dir), split)


def stratified_subset_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Sorted int64 indices of ``per_class`` examples of every class, drawn without replacement.

  Classes are visited in increasing order with one ``np.random.default_rng(seed)``, so the
  result is a pure function of ``(labels, per_class, seed)``.
  """
  rng = np.random.default_rng(seed)
  chosen = [
      rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)
  ]
  return np.sort(np.concatenate(chosen)).astype(np.int64)
