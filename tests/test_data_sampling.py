"""Tests of mcl_jax/data/sampling.py: batch indices as pure functions of (seed, step)."""

import numpy as np
import pytest

from mcl_jax import data
from mcl_jax.data import sampling


def test_steps_per_epoch_drops_the_remainder():
  assert data.steps_per_epoch(50_000, 128) == 390
  assert data.steps_per_epoch(256, 128) == 2


def test_uniform_batches_cover_each_example_once_per_epoch():
  labels = np.arange(103) % 10
  sampler = data.BatchSampler(labels, 10, seed=5)
  for epoch in range(2):
    seen = np.concatenate([sampler.indices(10 * epoch + i) for i in range(10)])
    assert seen.dtype == np.int32 and len(np.unique(seen)) == 100
    expected = np.random.default_rng([5, epoch]).permutation(103)[:100]
    np.testing.assert_array_equal(seen, expected)
  # A pure function of (seed, step): no hidden state from earlier calls.
  fresh = data.BatchSampler(labels, 10, seed=5)
  np.testing.assert_array_equal(fresh.indices(13), sampler.indices(13))
  np.testing.assert_array_equal(data.batch_indices(labels, 10, 5, 13), sampler.indices(13))
  assert not np.array_equal(data.batch_indices(labels, 10, 6, 13), sampler.indices(13))
  assert not np.array_equal(sampler.indices(3), sampler.indices(13))  # epochs differ


def test_class_balanced_with_fewer_classes_than_batch_over_m():
  labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
  sampler = data.BatchSampler(labels, 128, seed=1, class_balanced=True, samples_per_class=2)
  for step in range(20):
    batch = sampler.indices(step)
    assert batch.shape == (128,) and batch.dtype == np.int32
    assert len(np.unique(batch)) == 128
    # Every class, 12 = 128 // 10 consecutive rows each, then 8 filled from anywhere.
    np.testing.assert_array_equal(
        labels[batch[:120]].reshape(10, 12), np.repeat(labels[batch[:120:12]][:, None], 12, axis=1)
    )
    assert sorted(labels[batch[:120:12]]) == list(range(10))
    assert np.all(np.bincount(labels[batch], minlength=10) >= 12)
  fills = np.concatenate([sampler.indices(s)[120:] for s in range(50)])
  assert len(np.unique(labels[fills])) == 10  # the fill is not tied to a class


def test_class_balanced_with_enough_classes():
  labels = np.repeat(np.arange(100), 6)
  sampler = data.BatchSampler(labels, 128, seed=2, class_balanced=True, samples_per_class=2)
  classes_seen = set()
  for step in range(30):
    batch = sampler.indices(step)
    counts = np.bincount(labels[batch], minlength=100)
    assert sorted(set(counts.tolist())) == [0, 2] and (counts == 2).sum() == 64
    assert len(np.unique(batch)) == 128
    np.testing.assert_array_equal(labels[batch[0::2]], labels[batch[1::2]])
    classes_seen |= set(labels[batch].tolist())
  assert classes_seen == set(range(100))
  again = data.batch_indices(labels, 128, 2, 17, class_balanced=True, samples_per_class=2)
  np.testing.assert_array_equal(again, sampler.indices(17))
  assert not np.array_equal(sampler.indices(17), sampler.indices(18))
  with pytest.raises(ValueError, match='multiple of samples_per_class'):
    data.BatchSampler(labels, 127, seed=2, class_balanced=True, samples_per_class=2)


def test_class_balanced_within_class_draw_is_uniform():
  picks = sampling._random_subsets(np.random.default_rng(0), np.full(30_000, 4), 2)
  assert np.all(picks[:, 0] != picks[:, 1]) and picks.min() == 0 and picks.max() == 3
  pairs = np.bincount(np.sort(picks, axis=1) @ [4, 1], minlength=16)[[1, 2, 3, 6, 7, 11]]
  np.testing.assert_allclose(pairs / 30_000, 1 / 6, atol=0.015)
  tiny = sampling._random_subsets(np.random.default_rng(0), np.array([1, 5]), 3)
  np.testing.assert_array_equal(tiny[0], [0, 0, 0])  # too small: with replacement
  assert len(set(tiny[1].tolist())) == 3
