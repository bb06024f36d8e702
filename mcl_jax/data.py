"""Data sources behind one function, batch-index sampling, and the ImageNet input pipeline.

Sources (``name``)
------------------
* ``fashion_mnist`` (default): a real data set shipped inside the package
  (``mcl_jax/data_files/fashion_mnist.npz``): a stratified subset of Fashion-MNIST,
  2,000 train images per class (20,000) + the full 10,000-image test split, 28x28x1.
  Built by ``scripts/make_embedded_data.py``; nothing is fetched at run time.
* ``fashion_mnist_full``: all 60,000 train images from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``, or ``data_dir``).
* ``cifar100``: tfds data PREPARED in ``array_record`` format under ``data_dir``
  (or ``$TFDS_DATA_DIR``, default ``~/tensorflow_datasets``), read fully into memory.
* ``imagenet2012``: same tfds preparation; too large for memory, so it is streamed by
  :func:`imagenet_iterator` (grain over ``tfds`` random access, sharded per process).

Nothing is ever downloaded. Missing data is a ``FileNotFoundError`` that names the fix;
:func:`check_available` raises it early (config validation), :func:`dataset_info` answers
shapes and sizes without touching any file.

Batch order
-----------
In-memory training draws batch indices on the host with :class:`BatchSampler`, a pure
function of ``(seed, step)`` so a resumed run sees exactly the batches an uninterrupted run
would have seen. :func:`batch_indices` is a one-shot convenience wrapper around it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import os
import pathlib
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Registry of sources
# ----------------------------------------------------------------------------------------------

SPLITS = ('train', 'test')

FASHION_MNIST_DEB_DIR = '/usr/share/datasets/fashion-mnist'
EMBEDDED_FILE = 'fashion_mnist.npz'
# How the embedded subset is drawn (scripts/make_embedded_data.py uses exactly these).
EMBEDDED_TRAIN_PER_CLASS = 2000
EMBEDDED_SUBSET_SEED = 20170825  # Fashion-MNIST's release date; any fixed value would do.

# Per-channel statistics in [0, 1] pixel units. Fashion-MNIST values are computed by
# scripts/make_embedded_data.py over the respective train sets (checked by tests/test_data.py).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2864,), (0.3532,)
FASHION_MNIST_FULL_MEAN, FASHION_MNIST_FULL_STD = (0.2860,), (0.3530,)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # mcl.md §4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetInfo(NamedTuple):
  """What a model and a config need before any data is loaded."""
  image_shape: tuple[int, int, int]  # (H, W, C) of the images fed to the model
  num_classes: int
  num_train_examples: int


@dataclasses.dataclass(frozen=True)
class _SourceSpec:
  info: DatasetInfo
  num_test_examples: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  tfds_splits: dict[str, str] | None = None  # our split -> tfds split; None: not a tfds source


_SOURCES: dict[str, _SourceSpec] = {
    'fashion_mnist': _SourceSpec(
        DatasetInfo((28, 28, 1), 10, 10 * EMBEDDED_TRAIN_PER_CLASS), 10_000,
        FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    'fashion_mnist_full': _SourceSpec(
        DatasetInfo((28, 28, 1), 10, 60_000), 10_000,
        FASHION_MNIST_FULL_MEAN, FASHION_MNIST_FULL_STD),
    'cifar100': _SourceSpec(
        DatasetInfo((32, 32, 3), 100, 50_000), 10_000, CIFAR100_MEAN, CIFAR100_STD,
        tfds_splits={'train': 'train', 'test': 'test'}),
    'imagenet2012': _SourceSpec(
        DatasetInfo((224, 224, 3), 1000, 1_281_167), 50_000, IMAGENET_MEAN, IMAGENET_STD,
        tfds_splits={'train': 'train', 'test': 'validation'}),
}
NAMES = tuple(_SOURCES)
IN_MEMORY_NAMES = ('fashion_mnist', 'fashion_mnist_full', 'cifar100')


def _spec(name: str) -> _SourceSpec:
  if name not in _SOURCES:
    raise ValueError(f'Unknown data set {name!r}; expected one of {NAMES}.')
  return _SOURCES[name]


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def dataset_info(name: str) -> DatasetInfo:
  """``(image_shape (H, W, C), num_classes, num_train_examples)`` of ``name``; reads no file.

  For ``imagenet2012`` the image shape is the default training crop (224, 224, 3).
  """
  return _spec(name).info


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel ``(mean, std)`` of ``name`` in [0, 1] pixel units (for ``augment``)."""
  spec = _spec(name)
  return spec.mean, spec.std


def num_examples(name: str, split: str) -> int:
  """Number of examples of ``split`` (``'train'`` | ``'test'``); reads no file."""
  _check_split(split)
  spec = _spec(name)
  return spec.info.num_train_examples if split == 'train' else spec.num_test_examples


# ----------------------------------------------------------------------------------------------
# In-memory data sets
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryDataset:
  """A whole split in host memory.

  Attributes:
    images: uint8 ``[N, H, W, C]`` (read-only when it comes from :func:`load`'s cache).
    labels: int32 ``[N]`` in ``[0, num_classes)``.
    num_classes: number of classes of the data set (not only those present).
    mean, std: per-channel normalisation statistics in [0, 1] pixel units.
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'images must be uint8 [N,H,W,C], got {self.images.dtype} '
                       f'{self.images.shape}')
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(f'labels must be int32 [{len(self.images)}], got {self.labels.dtype} '
                       f'{self.labels.shape}')
    if not len(self.mean) == len(self.std) == self.images.shape[-1]:
      raise ValueError('mean/std need one value per channel')

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, count: int) -> InMemoryDataset:
    """The first ``count`` examples (e.g. a smaller eval set for smoke runs)."""
    return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count])


def load(name: str, split: str, data_dir: str | None = None) -> InMemoryDataset:
  """Loads a whole split of an in-memory data set.

  Args:
    name: ``'fashion_mnist'`` (embedded, default), ``'fashion_mnist_full'`` or ``'cifar100'``.
      (``'imagenet2012'`` is streamed: use :func:`imagenet_iterator`.)
    split: ``'train'`` or ``'test'``.
    data_dir: for ``cifar100`` the tfds data dir (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``); for ``fashion_mnist_full`` the folder with the IDX files
      (default ``/usr/share/datasets/fashion-mnist``); ignored for ``fashion_mnist``.

  Returns:
    An :class:`InMemoryDataset`. Results are cached per process; its arrays are read-only.

  Raises:
    FileNotFoundError: the data is not there; the message says how to get it.
  """
  spec = _spec(name)
  _check_split(split)
  if name == 'imagenet2012':
    check_available(name, data_dir)
    raise ValueError("imagenet2012 does not fit in memory; stream it with "
                     "mcl_jax.data.imagenet_iterator(...).")
  images, labels = _load_arrays(name, split, _resolve_data_dir(name, data_dir))
  return InMemoryDataset(images, labels, spec.info.num_classes, spec.mean, spec.std)


def check_available(name: str, data_dir: str | None = None) -> None:
  """Raises the clear ``FileNotFoundError`` now if ``name`` cannot be read; cheap otherwise."""
  _spec(name)
  directory = _resolve_data_dir(name, data_dir)
  if name == 'fashion_mnist':
    _embedded_path()
  elif name == 'fashion_mnist_full':
    for split in SPLITS:
      for path in _fashion_mnist_idx_paths(directory, split):
        if not path.is_file():
          raise FileNotFoundError(_fashion_mnist_full_missing(directory))
  else:
    for split in SPLITS:
      _tfds_data_source(name, split, directory)


def _resolve_data_dir(name: str, data_dir: str | None) -> str | None:
  if name == 'fashion_mnist':
    return None
  if name == 'fashion_mnist_full':
    return os.path.expanduser(data_dir or FASHION_MNIST_DEB_DIR)
  return resolve_tfds_data_dir(data_dir)


@functools.lru_cache(maxsize=None)
def _load_arrays(name: str, split: str, directory: str | None) -> tuple[np.ndarray, np.ndarray]:
  if name == 'fashion_mnist':
    with np.load(_embedded_path()) as arrays:
      images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
  elif name == 'fashion_mnist_full':
    images, labels = read_fashion_mnist_idx(directory, split)
  else:
    images, labels = source_to_arrays(_tfds_data_source(name, split, directory))
  images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels, np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def _embedded_path() -> pathlib.Path:
  path = pathlib.Path(str(importlib.resources.files('mcl_jax') / 'data_files' / EMBEDDED_FILE))
  if not path.is_file():
    raise FileNotFoundError(
        f'The embedded Fashion-MNIST file {path} is missing: the mcl_jax install is incomplete. '
        'Reinstall the package (pip install .), or regenerate it with '
        "'python scripts/make_embedded_data.py'.")
  return path


def source_to_arrays(source: Sequence[dict[str, Any]],
                     chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Reads a random-access source of ``{'image', 'label'}`` records into two arrays.

  Returns uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``.
  """
  count = len(source)
  if count == 0:
    raise ValueError('empty data source')
  images = labels = None
  for start in range(0, count, chunk):
    indices = list(range(start, min(count, start + chunk)))
    getitems = getattr(source, '__getitems__', None)
    records = getitems(indices) if getitems else [source[i] for i in indices]
    if images is None:
      images = np.empty((count,) + np.shape(records[0]['image']), np.uint8)
      labels = np.empty((count,), np.int32)
    for offset, record in enumerate(records):
      images[start + offset] = record['image']
      labels[start + offset] = record['label']
  return images, labels


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST IDX files
# ----------------------------------------------------------------------------------------------

_IDX_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
              'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


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


def _fashion_mnist_idx_paths(directory: str | os.PathLike, split: str) -> list[pathlib.Path]:
  return [pathlib.Path(directory) / f for f in _IDX_FILES[split]]


def _fashion_mnist_full_missing(directory: str | os.PathLike) -> str:
  return (f'Fashion-MNIST IDX files not found in {directory}. Install them with '
          "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu; files land in "
          f'{FASHION_MNIST_DEB_DIR}), or pass data.data_dir=<folder with '
          "train-images-idx3-ubyte.gz ...>, or use the embedded default (data.name=fashion_mnist).")


def read_fashion_mnist_idx(directory: str | os.PathLike,
                           split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a Fashion-MNIST split from its four IDX files: uint8 ``[N,28,28,1]``, int32 ``[N]``."""
  _check_split(split)
  image_path, label_path = _fashion_mnist_idx_paths(directory, split)
  if not (image_path.is_file() and label_path.is_file()):
    raise FileNotFoundError(_fashion_mnist_full_missing(directory))
  images, labels = read_idx(image_path)[..., None], read_idx(label_path).astype(np.int32)
  if images.shape[1:] != (28, 28, 1) or len(images) != len(labels):
    raise ValueError(f'unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}')
  return images, labels


def stratified_subset_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Sorted int64 indices of ``per_class`` examples of every class, drawn without replacement.

  Classes are visited in increasing order with one ``np.random.default_rng(seed)``, so the
  result is a pure function of ``(labels, per_class, seed)``.
  """
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in np.unique(labels)]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# tfds prepared data (never downloaded)
# ----------------------------------------------------------------------------------------------


def resolve_tfds_data_dir(data_dir: str | None = None) -> str:
  """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (user-expanded)."""
  chosen = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.expanduser(chosen)


def _tfds_missing(name: str, data_dir: str) -> str:
  return (f"tfds data set '{name}' is not prepared under {data_dir}. This machine has no "
          f"internet. Prepare it elsewhere with 'tfds build {name} --data_dir={data_dir} "
          f"--file_format=array_record' and copy {data_dir} here, or use the embedded default "
          "(data.name=fashion_mnist).")


# What tfds raises on missing or tfrecord-only data (see specs/data.md); all mean "not prepared".
_TFDS_MISSING_ERRORS = (NotImplementedError, KeyError, AssertionError, FileNotFoundError)


def _tfds_data_source(name: str, split: str, data_dir: str,
                      skip_image_decoding: bool = False) -> Sequence[dict[str, Any]]:
  """The random-access (array_record) tfds source of ``split``; FileNotFoundError if missing."""
  tfds_split = _spec(name).tfds_splits[split]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (slow-ish, optional)
  try:
    # is_prepared() first: without it tfds raises misleading errors (data.md).
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      raise FileNotFoundError(_tfds_missing(name, data_dir))
    decoders = {'image': tfds.decode.SkipDecoding()} if skip_image_decoding else None
    return builder.as_data_source(split=tfds_split, decoders=decoders)
  except _TFDS_MISSING_ERRORS as e:
    raise FileNotFoundError(_tfds_missing(name, data_dir)) from e


def train_labels(name: str, data_dir: str | None = None,
                 cache_dir: str | None = None) -> np.ndarray:
  """int32 ``[N]`` labels of the training split (memory banks sample positives by class).

  In-memory sets read them from the loaded split. For ``imagenet2012`` they are read once from
  the tfds records without decoding images (one pass over the data, minutes) and cached as
  ``<cache_dir>/imagenet2012_train_labels.npy`` (the run's workdir), so a resumed run starts fast.
  """
  if name in IN_MEMORY_NAMES:
    return load(name, 'train', data_dir).labels
  cache = os.path.join(cache_dir, f'{name}_train_labels.npy') if cache_dir else None
  if cache and os.path.exists(cache):
    return np.load(cache)
  source = _tfds_data_source(name, 'train', resolve_tfds_data_dir(data_dir),
                             skip_image_decoding=True)
  labels = np.fromiter((record['label'] for record in source), np.int32, count=len(source))
  if cache:
    os.makedirs(cache_dir, exist_ok=True)
    np.save(cache, labels)
  return labels


# ----------------------------------------------------------------------------------------------
# Batch index sampling (host side, pure functions of (seed, step))
# ----------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  return num_examples // batch_size


class BatchSampler:
  """Indices of the training batch at any step, a pure function of ``(seed, step)``.

  Uniform mode: epoch ``e = step // steps_per_epoch`` visits
  ``np.random.default_rng([seed, e]).permutation(N)`` in consecutive slices of
  ``batch_size``; the last ``N % batch_size`` examples of each permutation are skipped.

  Class-balanced mode (interface.md, the m-per-class sampler of MCL on CIFAR): each step uses
  ``rng = np.random.default_rng([seed, step, 1])``. With ``C >= B / m`` classes it draws
  ``B // m`` classes without replacement and ``m`` images of each without replacement
  (``B % m`` must be 0). With fewer classes it takes every class with ``m' = B // C`` images
  each and fills the remaining ``B - C m'`` slots uniformly from the examples not yet in the
  batch. The batch is ordered class by class (``m`` consecutive rows per class), then the
  fill. A class with fewer than ``m`` images (tiny subsets only) is sampled with replacement.

  ``C`` counts the classes present in ``labels``. Per-class index lists are built once here,
  so :meth:`indices` costs well under a millisecond.
  """

  def __init__(self, labels: np.ndarray, batch_size: int, seed: int,
               class_balanced: bool = False, samples_per_class: int = 2):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
      raise ValueError('labels must be a 1-D array of non-negative integers')
    if not 0 < batch_size <= len(labels):
      raise ValueError(f'batch_size {batch_size} must be in [1, {len(labels)}]')
    self.num_examples = len(labels)
    self.batch_size = batch_size
    self.seed = seed
    self.class_balanced = class_balanced
    self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)
    self._cached_epoch, self._cached_perm = None, None
    if not class_balanced:
      return
    if samples_per_class <= 0:
      raise ValueError(f'samples_per_class must be positive, got {samples_per_class}')
    # Examples grouped by class: class c owns by_class[starts[c] : starts[c] + counts[c]].
    self._by_class = np.argsort(labels, kind='stable').astype(np.int64)
    classes, self._counts = np.unique(labels, return_counts=True)
    self._starts = np.searchsorted(labels[self._by_class], classes)
    num_classes = self._num_classes = len(classes)
    if num_classes * samples_per_class >= batch_size:
      if batch_size % samples_per_class:
        raise ValueError(f'batch_size {batch_size} is not a multiple of samples_per_class '
                         f'{samples_per_class}')
      self._classes_per_batch, self._per_class = batch_size // samples_per_class, samples_per_class
    else:
      self._classes_per_batch, self._per_class = num_classes, batch_size // num_classes
    self._num_fill = batch_size - self._classes_per_batch * self._per_class

  def indices(self, step: int) -> np.ndarray:
    """int32 ``[batch_size]`` example indices of the batch at ``step``."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    if self.class_balanced:
      return self._class_balanced(step)
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._cached_epoch:
      self._cached_perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      self._cached_epoch = epoch
    start = position * self.batch_size
    return self._cached_perm[start:start + self.batch_size].astype(np.int32)

  def _class_balanced(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step, 1])
    num_classes, k, m = self._num_classes, self._classes_per_batch, self._per_class
    chosen = rng.choice(num_classes, k, replace=False) if k < num_classes else np.arange(k)
    within = _random_subsets(rng, self._counts[chosen], m)  # [k, m] positions inside classes
    batch = self._by_class[self._starts[chosen][:, None] + within].reshape(-1)
    if self._num_fill:
      # A uniform draw from the examples not in the batch yet: the first `num_fill` of B
      # distinct random candidates that are not in it.
      candidates = rng.choice(self.num_examples, min(self.num_examples, self.batch_size),
                              replace=False)
      in_batch = np.zeros(self.num_examples, bool)
      in_batch[batch] = True
      fresh = candidates[~in_batch[candidates]]  # at least num_fill: B distinct candidates
      batch = np.concatenate([batch, fresh[:self._num_fill]])
    return batch.astype(np.int32)


def _random_subsets(rng: np.random.Generator, sizes: np.ndarray, m: int) -> np.ndarray:
  """``[len(sizes), m]`` ints; row i is a uniform m-subset of ``range(sizes[i])``.

  Floyd's algorithm, vectorised over rows: draw j picks t uniform in ``[0, n - m + j]`` and
  takes ``n - m + j`` instead when t was already picked. Rows with ``sizes[i] < m`` are drawn
  with replacement instead.
  """
  uniforms = rng.random((len(sizes), m))
  too_small = sizes < m
  picks = np.empty((len(sizes), m), np.int64)
  for j in range(m):
    last = np.maximum(sizes - m + j, 0)
    draw = np.floor(uniforms[:, j] * (last + 1)).astype(np.int64)
    seen = (picks[:, :j] == draw[:, None]).any(axis=1)
    picks[:, j] = np.where(seen, last, draw)
  if np.any(too_small):
    with_replacement = np.floor(uniforms * sizes[:, None]).astype(np.int64)
    picks = np.where(too_small[:, None], with_replacement, picks)
  return picks


def batch_indices(labels: np.ndarray, batch_size: int, seed: int, step: int,
                  class_balanced: bool = False, samples_per_class: int = 2) -> np.ndarray:
  """int32 ``[batch_size]`` indices of the batch at ``step``: ``BatchSampler(...).indices(step)``.

  One-shot convenience; a training loop should build one :class:`BatchSampler` and reuse it
  (it precomputes the per-class index lists).
  """
  return BatchSampler(labels, batch_size, seed, class_balanced,
                      samples_per_class).indices(step)


# ----------------------------------------------------------------------------------------------
# ImageNet: grain over tfds random access, sharded per process
# ----------------------------------------------------------------------------------------------


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
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


def imagenet_train_transform(record: dict[str, Any], rng: np.random.Generator,
                             image_size: int = 224) -> dict[str, np.ndarray]:
  """RandomResizedCrop(image_size) (bilinear) + horizontal flip with probability 1/2."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _to_pil_rgb(record['image'])
  top, left, crop_h, crop_w = random_resized_crop_box(image.height, image.width, rng)
  image = image.resize((image_size, image_size), Image.BILINEAR,
                       box=(left, top, left + crop_w, top + crop_h))
  pixels = np.asarray(image, np.uint8)
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return {'image': np.ascontiguousarray(pixels), 'label': np.int32(record['label'])}


def _indexed_train_example(index: int, rng: np.random.Generator, *, source,
                           image_size: int) -> dict[str, np.ndarray]:
  return {**imagenet_train_transform(source[index], rng, image_size), 'index': np.int32(index)}


def imagenet_eval_transform(record: dict[str, Any], image_size: int = 224,
                            resize_size: int | None = None) -> dict[str, np.ndarray]:
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


class _PaddedEvalSource:
  """The eval source padded to ``length`` with masked-out blank examples."""

  def __init__(self, source, length: int, image_size: int):
    self._source, self._length, self._image_size = source, length, image_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if index < len(self._source):
      return imagenet_eval_transform(self._source[index], self._image_size)
    return {'image': np.zeros((self._image_size, self._image_size, 3), np.uint8),
            'label': np.int32(0), 'mask': np.bool_(False)}


def imagenet_iterator(split: str, data_dir: str | None, global_batch: int, seed: int,
                      start_step: int = 0, image_size: int = 224,
                      shard_index: int | None = None, shard_count: int | None = None,
                      train: bool = True, *, source: Sequence[dict[str, Any]] | None = None,
                      num_threads: int = 16) -> Iterator[dict[str, np.ndarray]]:
  """Host-side ImageNet batches for this process, deterministic and resumable.

  The global stream (all processes together) is fixed by ``seed`` alone: with ``train=True``
  an endless sequence of epochs, each a different permutation of the split (grain's
  index shuffle seeded from ``seed`` and the epoch), each example augmented with a
  generator seeded from ``seed`` and its position in the stream. Global batch ``s`` is
  stream positions ``[s G, (s+1) G)``; batches run across epoch boundaries, so
  ``steps_per_epoch(N, G)`` is only used for the schedule. Process ``p`` of ``P`` gets
  positions ``s G + p + P i``, ``i < G / P``, so the union over processes is the global
  batch whatever ``P`` is. Starting at ``start_step`` gives exactly the batches an
  uninterrupted run sees from that step on.

  With ``train=False``: one ordered pass over the split (resize + center crop), padded to a
  multiple of ``global_batch`` with blank examples whose ``'mask'`` is False.

  Args:
    split: ``'train'`` or ``'test'`` (tfds ``validation``).
    data_dir: tfds data dir (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    global_batch: batch over all processes; must be divisible by ``shard_count``.
    seed: decides the order and the augmentation.
    start_step: first global step to produce.
    image_size: output height and width.
    shard_index, shard_count: this process and the number of processes (default:
      ``jax.process_index()``, ``jax.process_count()``).
    train: random crop + flip and endless shuffled epochs, or eval preprocessing.
    source: a random-access sequence of ``{'image': uint8 [H,W,3], 'label': int}`` records
      to use instead of tfds (tests, custom data).
    num_threads: host threads decoding and augmenting examples.

  Yields:
    ``{'image': uint8 [b, image_size, image_size, 3], 'label': int32 [b]}`` with
    ``b = global_batch // shard_count``, plus ``'index': int32 [b]`` (position in the split) when
    ``train=True`` and ``'mask': bool [b]`` when ``train=False``.
  """
  import grain  # pylint: disable=g-import-not-at-top
  _check_split(split)
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if global_batch % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(f'global_batch {global_batch} must split evenly over {shard_count} '
                     f'processes (shard_index {shard_index})')
  local_batch = global_batch // shard_count
  if source is None:
    source = _tfds_data_source('imagenet2012', split, resolve_tfds_data_dir(data_dir))
  shuffle_seed, augment_seed = map(int, np.random.SeedSequence([seed, 2012]).generate_state(2))

  if train:
    # Shuffle example *indices* so every batch also carries each example's position in the
    # training set (memory banks are indexed by it).
    stream = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat()
    stream = stream.random_map(functools.partial(_indexed_train_example, source=source,
                                                 image_size=image_size), seed=augment_seed)
  else:
    padded_length = -(-len(source) // global_batch) * global_batch
    stream = grain.MapDataset.source(_PaddedEvalSource(source, padded_length, image_size))
  stream = stream[shard_index::shard_count][start_step * local_batch:]
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=max(2 * local_batch, num_threads))
  batches = stream.to_iter_dataset(read_options).batch(local_batch, drop_remainder=True)
  return iter(batches)
