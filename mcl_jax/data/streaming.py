"""The host input pipeline of streamed sources: grain over a random-access record source.

:func:`stream_batches` turns any random-access sequence of ``{'image', 'label'}`` records into
this process's rows of each global batch, deterministic and resumable, sharded per process. It
knows nothing about a particular data set: the streamed source (``tfds_sources.StreamedTfdsSource``
or a user's) hands it its records, its image shape and its host transforms. See docs/data.md.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# Mixed into the seed of every stream; changing it changes every stream (and so every resumed run).
_STREAM_SALT = 2012

TrainTransform = Callable[[dict[str, Any], np.random.Generator, int], dict[str, np.ndarray]]
EvalTransform = Callable[[dict[str, Any], int], dict[str, np.ndarray]]


def _indexed_train_example(
    index: int, rng: np.random.Generator, *, records, transform: TrainTransform, image_size: int
) -> dict[str, np.ndarray]:
  return {**transform(records[index], rng, image_size), 'index': np.int32(index)}


class _PaddedEvalSource:
  """The eval records, transformed, padded to ``length`` with masked-out blank examples."""

  def __init__(self, records, length: int, transform: EvalTransform, image_shape):
    self._records, self._length = records, length
    self._transform, self._image_shape = transform, tuple(image_shape)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if index < len(self._records):
      return self._transform(self._records[index], self._image_shape[0])
    return {
        'image': np.zeros(self._image_shape, np.uint8),
        'label': np.int32(0),
        'mask': np.bool_(False),
    }


def process_shard(
    global_batch: int, shard_index: int | None, shard_count: int | None
) -> tuple[int, int, int]:
  """``(shard_index, shard_count, local_batch)``; defaults: this JAX process of all of them."""
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if global_batch % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(
        f'global_batch {global_batch} must split evenly over {shard_count} '
        f'processes (shard_index {shard_index})'
    )
  return shard_index, shard_count, global_batch // shard_count


def stream_batches(
    records: Sequence[dict[str, Any]],
    *,
    global_batch: int,
    seed: int,
    image_shape: tuple[int, int, int],
    train_transform: TrainTransform,
    eval_transform: EvalTransform,
    train: bool = True,
    start_step: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 16,
) -> Iterator[dict[str, np.ndarray]]:
  """Host-side batches for this process, deterministic and resumable.

  The global stream (all processes together) is fixed by ``seed`` alone: with ``train=True``
  an endless sequence of epochs, each a different permutation of the records (grain's
  index shuffle seeded from ``seed`` and the epoch), each example transformed with a
  generator seeded from ``seed`` and its position in the stream. Global batch ``s`` is
  stream positions ``[s G, (s+1) G)``; batches run across epoch boundaries, so
  ``steps_per_epoch(N, G)`` is only used for the schedule. Process ``p`` of ``P`` gets
  positions ``s G + p + P i``, ``i < G / P``, so the union over processes is the global
  batch whatever ``P`` is. Starting at ``start_step`` gives exactly the batches an
  uninterrupted run sees from that step on.

  With ``train=False``: one ordered pass over the records (``eval_transform``), padded to a
  multiple of ``global_batch`` with blank examples whose ``'mask'`` is False.

  Args:
    records: random-access ``{'image': uint8 [H, W, C], 'label': int}`` records.
    global_batch: batch over all processes; must be divisible by ``shard_count``.
    seed: decides the order and the augmentation.
    image_shape: ``(size, size, C)`` of the output images.
    train_transform: ``(record, rng, size) -> {'image', 'label'}``, the training augmentation.
    eval_transform: ``(record, size) -> {'image', 'label', 'mask'}``.
    train: training stream (shuffled endless epochs) or one eval pass.
    start_step: first global step to produce.
    shard_index, shard_count: this process and the number of processes (default:
      ``jax.process_index()``, ``jax.process_count()``).
    num_threads: host threads decoding and transforming examples.

  Yields:
    ``{'image': uint8 [b, *image_shape], 'label': int32 [b]}`` with
    ``b = global_batch // shard_count``, plus ``'index': int32 [b]`` (position in the records)
    when ``train=True`` and ``'mask': bool [b]`` when ``train=False``.
  """
  import grain  # pylint: disable=g-import-not-at-top

  shard_index, shard_count, local_batch = process_shard(global_batch, shard_index, shard_count)
  shuffle_seed, augment_seed = map(
      int, np.random.SeedSequence([seed, _STREAM_SALT]).generate_state(2)
  )
  if train:
    # Shuffle example *indices* so every batch also carries each example's position in the
    # training set (memory banks are indexed by it).
    stream = grain.MapDataset.range(len(records)).shuffle(seed=shuffle_seed).repeat()
    stream = stream.random_map(
        functools.partial(
            _indexed_train_example,
            records=records,
            transform=train_transform,
            image_size=image_shape[0],
        ),
        seed=augment_seed,
    )
  else:
    padded_length = -(-len(records) // global_batch) * global_batch
    stream = grain.MapDataset.source(
        _PaddedEvalSource(records, padded_length, eval_transform, image_shape)
    )
  stream = stream[shard_index::shard_count][start_step * local_batch :]
  read_options = grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2 * local_batch, num_threads)
  )
  batches = stream.to_iter_dataset(read_options).batch(local_batch, drop_remainder=True)
  return iter(batches)
