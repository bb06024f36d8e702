"""Batch indices of in-memory training, on the host: pure functions of ``(seed, step)``.

In-memory training draws the indices of each batch with :class:`BatchSampler`, so a resumed run
sees exactly the batches an uninterrupted run would have seen; the devices then gather the rows
from the training set they hold. :func:`batch_indices` is a one-shot convenience wrapper.
See docs/data.md.
"""

from __future__ import annotations

import numpy as np


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

  Class-balanced mode (the m-per-class sampler of MCL on CIFAR): each step uses
  ``rng = np.random.default_rng([seed, step, 1])``. With ``C >= B / m`` classes it draws
  ``B // m`` classes without replacement and ``m`` images of each without replacement
  (``B % m`` must be 0). With fewer classes it takes every class with ``m' = B // C`` images
  each and fills the remaining ``B - C m'`` slots uniformly from the examples not yet in the
  batch. The batch is ordered class by class (``m`` consecutive rows per class), then the
  fill. A class with fewer than ``m`` images (tiny subsets only) is sampled with replacement.

  ``C`` counts the classes present in ``labels``. Per-class index lists are built once here,
  so :meth:`indices` costs well under a millisecond.
  """

  def __init__(
      self,
      labels: np.ndarray,
      batch_size: int,
      seed: int,
      class_balanced: bool = False,
      samples_per_class: int = 2,
  ):
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
        raise ValueError(
            f'batch_size {batch_size} is not a multiple of samples_per_class '
            f'{samples_per_class}'
        )
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
    return self._cached_perm[start : start + self.batch_size].astype(np.int32)

  def _class_balanced(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step, 1])
    num_classes, k, m = self._num_classes, self._classes_per_batch, self._per_class
    chosen = rng.choice(num_classes, k, replace=False) if k < num_classes else np.arange(k)
    within = _random_subsets(rng, self._counts[chosen], m)  # [k, m] positions inside classes
    batch = self._by_class[self._starts[chosen][:, None] + within].reshape(-1)
    if self._num_fill:
      # A uniform draw from the examples not in the batch yet: the first `num_fill` of B
      # distinct random candidates that are not in it.
      candidates = rng.choice(
          self.num_examples, min(self.num_examples, self.batch_size), replace=False
      )
      in_batch = np.zeros(self.num_examples, bool)
      in_batch[batch] = True
      fresh = candidates[~in_batch[candidates]]  # at least num_fill: B distinct candidates
      batch = np.concatenate([batch, fresh[: self._num_fill]])
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


def batch_indices(
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    step: int,
    class_balanced: bool = False,
    samples_per_class: int = 2,
) -> np.ndarray:
  """int32 ``[batch_size]`` indices of the batch at ``step``: ``BatchSampler(...).indices(step)``.

  One-shot convenience; a training loop should build one :class:`BatchSampler` and reuse it
  (it precomputes the per-class index lists).
  """
  return BatchSampler(labels, batch_size, seed, class_balanced, samples_per_class).indices(step)
