"""The data-source contract, and the in-memory split every in-memory source loads into.

A data source (:class:`DataSource`) is one small object that knows everything a run needs from a
data set. It is registered under a name (``mcl_jax.data.register(name, source)``); the config picks
it with ``data.name``. The built-in sources are registered the same way, in
``mcl_jax/data/sources.py``. See docs/data.md.

The contract
------------
Metadata, known without reading any file:

* ``name``: the data set's own name (tfds sources read the tfds data set of that name unless told
  otherwise; error messages and label caches use it).
* ``image_shape``: ``(H, W, C)`` of the images the model sees.
* ``num_classes``; ``num_train`` / ``num_test``: the sizes of the ``'train'`` and ``'test'`` splits.
* ``mean`` / ``std``: per-channel normalisation statistics in [0, 1] pixel units.
* ``crop_padding`` / ``flip``: the on-device training augmentation (zero-pad by ``crop_padding``
  and cut a random ``H x W`` window, 0: no crop; random horizontal flip). The source owns it: a
  streamed source that augments on the host (ImageNet's RandomResizedCrop + flip) has none on
  device, so nothing is applied twice.
* ``streamed``: False for a source whose splits fit in host memory, True for one read through a
  host input pipeline.

Behaviour:

* ``check_available(data_dir)``: returns if the data can be read, else raises FileNotFoundError
  whose message names the command that prepares it. Cheap; config validation calls it.
* ``load(split, data_dir) -> InMemoryDataset`` (in-memory sources): the whole split, cached per
  process. A subclass implements ``read(split, data_dir) -> (uint8 images, int labels)``.
* ``batches(split, data_dir, global_batch, seed, ...)`` (streamed sources): this process's rows of
  each global batch, deterministic and resumable (see ``mcl_jax/data/streaming.py``). A source
  that can also serve several augmented views per image (``views=transforms.HostViews(...)``,
  for self-supervised methods) accepts a ``views`` keyword (``StreamedTfdsSource`` does).
* ``train_labels(data_dir, cache_dir)``: int32 labels of the training split.

A data set made of numpy arrays is registered in a few lines with :class:`InMemorySource`::

    from mcl_jax import data
    data.register('toy', data.InMemorySource(
        'toy', train=(train_images, train_labels), test=(test_images, test_labels),
        crop_padding=2, flip=True))   # mean/std/num_classes are computed unless given

and a variant of a registered source with ``dataclasses.replace``::

    data.register('fashion_mnist_nocrop',
                  dataclasses.replace(data.get('fashion_mnist'), crop_padding=0))
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, ClassVar, Hashable, Iterator, NamedTuple

import numpy as np

SPLITS = ('train', 'test')


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


class DatasetInfo(NamedTuple):
  """What a model and a config need before any data is loaded."""

  image_shape: tuple[int, int, int]  # (H, W, C) of the images fed to the model
  num_classes: int
  num_train_examples: int


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryDataset:
  """A whole split in host memory.

  Attributes:
    images: uint8 ``[N, H, W, C]`` (read-only when it comes from a source's cache).
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
      raise ValueError(
          f'images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}'
      )
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(
          f'labels must be int32 [{len(self.images)}], got {self.labels.dtype} '
          f'{self.labels.shape}'
      )
    if not len(self.mean) == len(self.std) == self.images.shape[-1]:
      raise ValueError('mean/std need one value per channel')

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def take(self, count: int) -> InMemoryDataset:
    """The first ``count`` examples (e.g. a smaller eval set for smoke runs)."""
    return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count])


# Loaded splits, shared by every source whose `cache_key` is equal (a variant made with
# dataclasses.replace reads the same file once).
_CACHE: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class DataSource:
  """A registered data set: its metadata, its augmentation, and how to read it.

  Subclass it for a new kind of storage: in-memory sources implement :meth:`read` (and
  :meth:`check_available`), streamed ones set ``streamed = True`` and implement :meth:`batches`
  and :meth:`train_labels`. The module docstring states the whole contract.
  """

  name: str = dataclasses.field(kw_only=False)
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int = 0
  flip: bool = False

  streamed: ClassVar[bool] = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'A data source needs a non-empty name, got {self.name!r}.')
    shape = tuple(int(s) for s in self.image_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f'{self.name}: image_shape must be (H, W, C), got {self.image_shape!r}.')
    object.__setattr__(self, 'image_shape', shape)
    object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))
    object.__setattr__(self, 'std', tuple(float(s) for s in self.std))
    if not len(self.mean) == len(self.std) == shape[-1]:
      raise ValueError(
          f'{self.name}: mean {self.mean} and std {self.std} need one value per channel '
          f'({shape[-1]}).'
      )
    if min(self.std) <= 0:
      raise ValueError(f'{self.name}: std must be > 0, got {self.std}.')
    if self.num_classes < 1 or self.num_train < 1 or self.num_test < 0:
      raise ValueError(
          f'{self.name}: num_classes ({self.num_classes}) and num_train ({self.num_train}) '
          f'must be >= 1, num_test ({self.num_test}) >= 0.'
      )
    if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
      raise ValueError(
          f'{self.name}: crop_padding must be an int >= 0 (0: no random crop), got '
          f'{self.crop_padding!r}.'
      )
    object.__setattr__(self, 'crop_padding', int(self.crop_padding))
    object.__setattr__(self, 'flip', bool(self.flip))

  # ---- Metadata ------------------------------------------------------------------------------
  @property
  def info(self) -> DatasetInfo:
    return DatasetInfo(self.image_shape, self.num_classes, self.num_train)

  def num_examples(self, split: str) -> int:
    """Number of examples of ``split`` (``'train'`` | ``'test'``); reads no file."""
    check_split(split)
    return self.num_train if split == 'train' else self.num_test

  # ---- Reading -------------------------------------------------------------------------------
  def check_available(self, data_dir: str | None = None) -> None:
    """Raises FileNotFoundError naming the preparing command if the data cannot be read."""

  def read(self, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, H, W, C]`` and integer labels ``[N]`` of ``split`` (in-memory sources)."""
    raise NotImplementedError(f'{type(self).__name__} does not implement read().')

  def cache_key(self, split: str, data_dir: str | None) -> Hashable | None:
    """What identifies the arrays :meth:`read` returns: sources reading the same files share
    one cached copy. None: not cached."""
    return (self, split, data_dir)

  def load(self, split: str, data_dir: str | None = None) -> InMemoryDataset:
    """The whole split in memory. Cached per process; its arrays are read-only.

    Raises:
      FileNotFoundError: the data is not there; the message says how to get it.
      ValueError: a streamed source (use :meth:`batches`) or an unknown split.
    """
    check_split(split)
    if self.streamed:
      self.check_available(data_dir)
      raise ValueError(
          f'{self.name} is streamed, not held in memory; read it with '
          f'mcl_jax.data.get(name).batches(...).'
      )
    key = self.cache_key(split, data_dir)
    with _CACHE_LOCK:
      arrays = None if key is None else _CACHE.get(key)
    if arrays is None:
      images, labels = self.read(split, data_dir)
      images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels, np.int32)
      images.setflags(write=False)
      labels.setflags(write=False)
      arrays = (images, labels)
      if key is not None:
        with _CACHE_LOCK:
          arrays = _CACHE.setdefault(key, arrays)
    images, labels = arrays
    if images.shape[1:] != self.image_shape:
      raise ValueError(
          f'{self.name} {split}: images are {images.shape[1:]}, the source says image_shape='
          f'{self.image_shape}.'
      )
    return InMemoryDataset(images, labels, self.num_classes, self.mean, self.std)

  def batches(
      self,
      split: str,
      data_dir: str | None,
      global_batch: int,
      seed: int,
      start_step: int = 0,
      shard_index: int | None = None,
      shard_count: int | None = None,
      train: bool = True,
      **kwargs,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch (streamed sources; see streaming.py)."""
    raise NotImplementedError(
        f'{self.name} is an in-memory source: use load(split, data_dir); the trainer draws its '
        f'batches with mcl_jax.data.BatchSampler.'
    )

  def train_labels(self, data_dir: str | None = None, cache_dir: str | None = None) -> np.ndarray:
    """int32 ``[num_train]`` labels of the training split (memory banks sample by class)."""
    return self.load('train', data_dir).labels


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 ``[N, H, W, C]`` images in [0, 1] units."""
  values = np.arange(256) / 255.0
  means, stds = [], []
  for channel in range(images.shape[-1]):  # exact, from the histogram of pixel values
    histogram = np.bincount(images[..., channel].ravel(), minlength=256) / images[..., 0].size
    mean = float(histogram @ values)
    means.append(mean)
    stds.append(float(np.sqrt(histogram @ (values - mean) ** 2)))
  return tuple(means), tuple(stds)


def _as_split(name: str, split: str, arrays: Any) -> tuple[np.ndarray, np.ndarray]:
  try:
    images, labels = arrays
  except (TypeError, ValueError):
    raise ValueError(f'{name}: {split} must be a pair (images, labels).') from None
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:  # [N, H, W]: one channel
    images = images[..., None]
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f'{name}: {split} images must be uint8 [N, H, W, C] (or [N, H, W]) in 0..255, got '
        f'{images.dtype} {images.shape}.'
    )
  if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
    raise ValueError(
        f'{name}: {split} labels must be integers [{len(images)}], got {labels.dtype} '
        f'{labels.shape}.'
    )
  if len(labels) and labels.min() < 0:
    raise ValueError(f'{name}: {split} labels must be >= 0.')
  images, labels = np.array(images), labels.astype(np.int32)  # own, read-only copies
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class InMemorySource(DataSource):
  """A data set given as numpy arrays: ``train=(images, labels)``, ``test=(images, labels)``.

  Images are uint8 ``[N, H, W, C]`` (or ``[N, H, W]``); labels integers in
  ``[0, num_classes)``. Everything else defaults from the arrays: ``image_shape``,
  ``num_classes`` (largest label + 1), the split sizes, and ``mean`` / ``std`` (per-channel
  statistics of the training images). The augmentation defaults to none: pass
  ``crop_padding`` / ``flip``.
  """

  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  image_shape: tuple[int, int, int] | None = None
  num_classes: int | None = None
  num_train: int | None = None
  num_test: int | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    train = _as_split(self.name, 'train', self.train)
    test = _as_split(self.name, 'test', self.test)
    if train[0].shape[1:] != test[0].shape[1:]:
      raise ValueError(
          f'{self.name}: train images are {train[0].shape[1:]} but test images '
          f'{test[0].shape[1:]}.'
      )
    if not len(train[1]):
      raise ValueError(f'{self.name}: the training split is empty.')
    object.__setattr__(self, 'train', train)
    object.__setattr__(self, 'test', test)
    sizes = dict(image_shape=train[0].shape[1:], num_train=len(train[1]), num_test=len(test[1]))
    for key, value in sizes.items():
      given = getattr(self, key)
      if given is not None and (tuple(given) if key == 'image_shape' else given) != value:
        raise ValueError(f'{self.name}: {key}={given!r} does not match the arrays ({value!r}).')
      object.__setattr__(self, key, value)
    if self.num_classes is None:
      largest = max(train[1].max(), test[1].max(initial=0))
      object.__setattr__(self, 'num_classes', int(largest) + 1)
    if self.mean is None or self.std is None:
      mean, std = channel_stats(train[0])
      object.__setattr__(self, 'mean', mean if self.mean is None else self.mean)
      object.__setattr__(self, 'std', std if self.std is None else self.std)
    super().__post_init__()
    for split, (_, labels) in (('train', train), ('test', test)):
      if len(labels) and labels.max() >= self.num_classes:
        raise ValueError(
            f'{self.name}: {split} labels go up to {labels.max()}, but num_classes='
            f'{self.num_classes}.'
        )

  def read(self, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    return self.train if split == 'train' else self.test

  def cache_key(self, split: str, data_dir: str | None) -> Hashable | None:
    return None  # the arrays are held here already
