"""tfds data sets PREPARED in ``array_record`` format: read into memory, or streamed.

Nothing is ever downloaded. The data lives under ``data_dir`` (else ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets``); missing data is a FileNotFoundError naming the ``tfds build`` command
that prepares it (see docs/data.md for the offline recipe).

* :class:`TfdsSource`: a split small enough for host memory (CIFAR-100), read once into arrays.
* :class:`StreamedTfdsSource`: a split too large for memory (ImageNet), read through grain
  (``streaming.py``) with host-side transforms, sharded per process. Any tfds image
  classification data set works: the source names it and gives its image size and transforms.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np

from mcl_jax.data import base, streaming, transforms

_DEFAULT_SPLITS = (('train', 'train'), ('test', 'test'))


def resolve_tfds_data_dir(data_dir: str | None = None) -> str:
  """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (user-expanded)."""
  chosen = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.expanduser(chosen)


def missing_message(tfds_name: str, data_dir: str) -> str:
  return (
      f"tfds data set '{tfds_name}' is not prepared under {data_dir}. This machine has no "
      f"internet. Prepare it elsewhere with 'tfds build {tfds_name} --data_dir={data_dir} "
      f"--file_format=array_record' and copy {data_dir} here, or use the embedded default "
      '(data.name=fashion_mnist).'
  )


# What tfds raises on missing or tfrecord-only data (docs/data.md); all mean "not prepared".
_TFDS_MISSING_ERRORS = (NotImplementedError, KeyError, AssertionError, FileNotFoundError)


def tfds_records(
    tfds_name: str, tfds_split: str, data_dir: str, skip_image_decoding: bool = False
) -> Sequence[dict[str, Any]]:
  """The random-access (array_record) tfds source of a split; FileNotFoundError if missing."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (slow-ish, optional)

  try:
    # is_prepared() first: without it tfds raises misleading errors (docs/data.md).
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      raise FileNotFoundError(missing_message(tfds_name, data_dir))
    decoders = {'image': tfds.decode.SkipDecoding()} if skip_image_decoding else None
    return builder.as_data_source(split=tfds_split, decoders=decoders)
  except _TFDS_MISSING_ERRORS as e:
    raise FileNotFoundError(missing_message(tfds_name, data_dir)) from e


def source_to_arrays(
    source: Sequence[dict[str, Any]], chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
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


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class TfdsSource(base.DataSource):
  """A prepared tfds data set read fully into memory.

  Attributes:
    tfds_name: the tfds data set (default: ``name``), e.g. ``'cifar100'`` or
      ``'imagenette/320px'``.
    tfds_splits: our split (``'train'`` / ``'test'``) -> the tfds split read for it.
  """

  tfds_name: str | None = None
  tfds_splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_DEFAULT_SPLITS))

  def __post_init__(self):
    super().__post_init__()
    if self.tfds_name is None:
      object.__setattr__(self, 'tfds_name', self.name)
    if set(self.tfds_splits) != set(base.SPLITS):
      raise ValueError(f'{self.name}: tfds_splits must map {base.SPLITS}, got {self.tfds_splits}.')

  def records(
      self, split: str, data_dir: str | None = None, skip_image_decoding: bool = False
  ) -> Sequence[dict[str, Any]]:
    """The random-access tfds records of ``split``; FileNotFoundError naming the fix if missing."""
    base.check_split(split)
    return tfds_records(
        self.tfds_name,
        self.tfds_splits[split],
        resolve_tfds_data_dir(data_dir),
        skip_image_decoding,
    )

  def check_available(self, data_dir: str | None = None) -> None:
    for split in base.SPLITS:
      self.records(split, data_dir)

  def cache_key(self, split: str, data_dir: str | None) -> Hashable:
    return ('tfds', self.tfds_name, self.tfds_splits[split], resolve_tfds_data_dir(data_dir))

  def read(self, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    return source_to_arrays(self.records(split, data_dir))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class StreamedTfdsSource(TfdsSource):
  """A prepared tfds data set streamed through grain, never held in memory.

  Its training augmentation runs on the host (``train_transform``, by default RandomResizedCrop
  + flip), so ``crop_padding`` / ``flip`` (on device) default to none. ``image_shape`` is the
  (square) output of the transforms.

  Attributes:
    train_transform: ``(record, rng, size) -> {'image', 'label'}``.
    eval_transform: ``(record, size) -> {'image', 'label', 'mask'}``.
    views_transform: ``(record, rng, size, *, views) -> {'image', 'image2', ..., 'label'}``, the
      training transform when a method asks for several views (``transforms.HostViews``).
  """

  streamed = True
  train_transform: Callable[..., dict[str, np.ndarray]] = transforms.imagenet_train_transform
  eval_transform: Callable[..., dict[str, np.ndarray]] = transforms.imagenet_eval_transform
  views_transform: Callable[..., dict[str, np.ndarray]] = transforms.imagenet_views_transform

  def __post_init__(self):
    super().__post_init__()
    if self.image_shape[0] != self.image_shape[1]:
      raise ValueError(f'{self.name}: streamed images are square, got {self.image_shape}.')

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
      *,
      records: Sequence[dict[str, Any]] | None = None,
      num_threads: int = 16,
      views: transforms.HostViews | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch (:func:`streaming.stream_batches`).

    ``records`` replaces the tfds records of ``split`` (tests, custom data). ``views``: training
    batches carry that many host-augmented views (``views_transform``) instead of one image.
    """
    base.check_split(split)
    streaming.process_shard(global_batch, shard_index, shard_count)  # bad sharding: fail first
    if records is None:
      records = self.records(split, data_dir)
    return streaming.stream_batches(
        records,
        global_batch=global_batch,
        seed=seed,
        image_shape=self.image_shape,
        train_transform=(
            self.train_transform
            if views is None
            else functools.partial(self.views_transform, views=views)
        ),
        eval_transform=self.eval_transform,
        train=train,
        start_step=start_step,
        shard_index=shard_index,
        shard_count=shard_count,
        num_threads=num_threads,
    )

  def train_labels(self, data_dir: str | None = None, cache_dir: str | None = None) -> np.ndarray:
    """Read once from the tfds records without decoding images (one pass over the data,
    minutes) and cached as ``<cache_dir>/<name>_train_labels.npy`` (the run's workdir), so a
    resumed run starts fast."""
    cache = os.path.join(cache_dir, f'{self.name}_train_labels.npy') if cache_dir else None
    if cache and os.path.exists(cache):
      return np.load(cache)
    records = self.records('train', data_dir, skip_image_decoding=True)
    labels = np.fromiter((record['label'] for record in records), np.int32, count=len(records))
    if cache:
      os.makedirs(cache_dir, exist_ok=True)
      np.save(cache, labels)
    return labels
