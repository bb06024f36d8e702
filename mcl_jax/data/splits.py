"""What a run trains and evaluates on, from its config: the two splits and the augmentation.

:func:`load_splits` gives the ``(train, test)`` splits of ``config.data``: in-memory
:class:`~mcl_jax.data.base.InMemoryDataset`s shrunk as ``data.train_examples`` /
``data.eval_examples`` say, or :class:`StreamedSplit`s for streamed sources. Both answer
``image_shape``, ``num_classes``, ``mean``, ``std`` and ``labels``. :func:`augment_spec` is the
on-device augmentation of the run, owned by the source. See docs/data.md.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mcl_jax.data import base, sources


def load_splits(config, workdir: str | None = None):
  """``(train, test)`` of ``config.data.name``; ``workdir`` caches a streamed source's labels."""
  name, data_dir = config.data.name, config.data.data_dir or None
  source = sources.get(name)
  if source.streamed:
    return (
        StreamedSplit(source, 'train', data_dir, workdir),
        StreamedSplit(source, 'test', data_dir),
    )
  train, test = source.load('train', data_dir), source.load('test', data_dir)
  if config.data.train_examples > 0:
    # A fixed, seed-independent subset so smoke runs and tests see the same images.
    keep = np.sort(
        np.random.default_rng(0).permutation(len(train.labels))[: config.data.train_examples]
    )
    train = dataclasses.replace(train, images=train.images[keep], labels=train.labels[keep])
  if config.data.eval_examples > 0:
    test = test.take(config.data.eval_examples)
  return train, test


def augment_spec(config) -> ml_collections.ConfigDict:
  """The run's on-device augmentation (``mcl_jax.augment``): the source's normalisation and
  random crop / flip. A streamed source that augments on the host has none here."""
  source = sources.get(config.data.name)
  return ml_collections.ConfigDict(
      dict(
          mean=tuple(source.mean),
          std=tuple(source.std),
          crop_padding=source.crop_padding,
          flip=source.flip,
      )
  )


class LazyLabels:
  """The labels of a streamed split: the length is known at once; the values (training split
  only) are read (one pass over the records, cached in the workdir) only if a method asks."""

  def __init__(self, source: base.DataSource, split: str, data_dir, cache_dir):
    self._source, self._split, self._args = source, split, (data_dir, cache_dir)
    self._length, self._labels = source.num_examples(split), None

  def __len__(self):
    return self._length

  def __array__(self, dtype=None, copy=None):
    if self._labels is None:
      if self._split != 'train':
        raise NotImplementedError(
            f'Only the training labels of the streamed {self._source.name} are read; its '
            f'{self._split} labels come with the batches.'
        )
      self._labels = self._source.train_labels(*self._args)
    return self._labels if dtype is None else self._labels.astype(dtype)


@dataclasses.dataclass
class StreamedSplit:
  """A split of a streamed source, read through its host pipeline, never held in memory."""

  source: base.DataSource
  split: str
  data_dir: str | None
  cache_dir: str | None = None

  def __post_init__(self):
    self.image_shape, self.num_classes = self.source.image_shape, self.source.num_classes
    self.mean, self.std = self.source.mean, self.source.std
    self.labels = LazyLabels(self.source, self.split, self.data_dir, self.cache_dir)

  def batches(
      self, global_batch: int, seed: int, start_step: int = 0, train: bool = True, views=None
  ):
    """This process's rows of each global batch (``DataSource.batches``); ``views``: a
    ``transforms.HostViews``, several host-augmented views per training image."""
    extra = {} if views is None else {'views': views}  # sources without views keep working
    return self.source.batches(
        self.split, self.data_dir, global_batch, seed, start_step=start_step, train=train, **extra
    )
