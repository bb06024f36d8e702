"""Self-supervised MCL's loss and queue (mcl_jax.losses.moco) against an independent NumPy float64
reference written from the formulas (docs/methods.md#self-supervised-mcl), with explicit loops
over peers i, j and batch rows n.

The reference takes the queries twice: `q` (the side that is trained) and `q_target` (the side
the soft targets are computed from). Finite differences w.r.t. `q` with `q_target`, the keys and
the queue frozen give the gradient the stop-gradient placement demands.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import losses


def np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(row):
  shifted = row - np.max(row)
  return shifted - np.log(np.sum(np.exp(shifted)))


def ref_row(q_row, key_row, queue, tau):
  """One row of logits: [positive, negatives...] / tau."""
  return np.concatenate([[q_row @ key_row], queue @ q_row]) / tau


def ref_terms(q, k, queue, tau, T, q_target=None):
  q_target = q if q_target is None else q_target
  num_peers, batch, _ = q.shape
  terms = dict.fromkeys(('vcl', 'soft_vcl', 'icl', 'soft_icl'), 0.0)

  def kl(student, target):
    log_pt, log_ps = np_log_softmax(target / T), np_log_softmax(student / T)
    return T * T * np.sum(np.exp(log_pt) * (log_pt - log_ps)) / batch

  for i in range(num_peers):
    for n in range(batch):
      terms['vcl'] -= np_log_softmax(ref_row(q[i, n], k[i, n], queue[i], tau))[0] / batch
    for j in range(num_peers):
      if i == j:
        continue
      for n in range(batch):
        own = ref_row(q[i, n], k[i, n], queue[i], tau)
        cross = ref_row(q[i, n], k[j, n], queue[j], tau)
        terms['icl'] -= np_log_softmax(cross)[0] / batch
        terms['soft_vcl'] += kl(own, ref_row(q_target[j, n], k[j, n], queue[j], tau))
        terms['soft_icl'] += kl(cross, ref_row(q_target[j, n], k[i, n], queue[i], tau))
  return terms


def inputs(num_peers, batch=4, queue_size=6, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  return (
      np_unit(rng.normal(size=(num_peers, batch, dim))),
      np_unit(rng.normal(size=(num_peers, batch, dim))),
      np_unit(rng.normal(size=(num_peers, queue_size, dim))),
  )


@pytest.mark.parametrize('num_peers', [1, 2, 3])
def test_terms_match_numpy(num_peers):
  q, k, queue = inputs(num_peers)
  with jax.enable_x64(True):
    got = losses.moco_mcl_loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), 0.2, 3.0)
    got = {name: float(value) for name, value in got.items()}
  want = ref_terms(q, k, queue, 0.2, 3.0)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, err_msg=name)
  if num_peers == 1:  # plain MoCo
    assert got['vcl'] > 0 and got['soft_vcl'] == got['icl'] == got['soft_icl'] == 0.0
  else:
    assert min(got.values()) > 0


def fd_grad(f, x, h=1e-6):
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = h
    grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


@pytest.mark.parametrize('num_peers', [1, 2, 3])
@pytest.mark.parametrize('term', ['vcl', 'soft_vcl', 'icl', 'soft_icl'])
def test_gradient_wrt_queries_matches_finite_differences(num_peers, term):
  q, k, queue = inputs(num_peers, batch=3, queue_size=4, dim=3, seed=1)
  tau, T = 0.3, 2.0
  with jax.enable_x64(True):
    grads = jax.grad(
        lambda q_, k_, queue_: losses.moco_mcl_loss(q_, k_, queue_, tau, T)[term],
        argnums=(0, 1, 2),
    )(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue))
  # The soft targets, keys and queue are constants: perturb the trained queries only.
  want = fd_grad(lambda x: ref_terms(x, k, queue, tau, T, q_target=q)[term], q)
  np.testing.assert_allclose(np.asarray(grads[0]), want, rtol=1e-6, atol=1e-8)
  assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2]))


def test_float32_small_tau_is_finite():
  q, k, queue = inputs(2, batch=8, queue_size=16, dim=4)
  grad = jax.grad(lambda x: sum(losses.moco_mcl_loss(x, k, queue, 0.07, 3.0).values()))(
      jnp.asarray(q, jnp.float32)
  )
  assert np.all(np.isfinite(np.asarray(grad)))


def test_pretext_top1_counts_rows_whose_positive_wins():
  q, k, queue = inputs(2, batch=5, queue_size=7, dim=4, seed=2)
  got = losses.moco_pretext_top1(losses.moco_logits(q, k, queue, 0.1))
  for i in range(2):
    want = np.mean([np.argmax(ref_row(q[i, n], k[i, n], queue[i], 0.1)) == 0 for n in range(5)])
    np.testing.assert_allclose(got[i], want)
  # Keys equal to the queries with a queue of their negations: every positive wins.
  chex.assert_trees_all_close(losses.moco_pretext_top1(losses.moco_logits(q, q, -q, 0.1)), 1.0)


def test_enqueue_writes_the_same_rows_for_every_peer_and_wraps():
  num_peers, queue_size, batch, dim = 3, 6, 2, 4
  queue = jnp.zeros((num_peers, queue_size, dim))
  ptr = jnp.zeros((), jnp.int32)
  enqueue = jax.jit(losses.moco_enqueue)
  written = []
  for t in range(4):  # 4 writes of 2 rows into 6 slots: the 4th overwrites slots 0-1
    keys = jnp.full((num_peers, batch, dim), t + 1.0) * jnp.arange(1, num_peers + 1)[:, None, None]
    queue, ptr = enqueue(queue, ptr, keys)
    written.append(keys)
    assert ptr.dtype == jnp.int32 and int(ptr) == (t + 1) * batch % queue_size
  chex.assert_trees_all_equal(queue[:, 0:2], written[3])
  chex.assert_trees_all_equal(queue[:, 2:4], written[1])
  chex.assert_trees_all_equal(queue[:, 4:6], written[2])


def test_enqueue_refuses_a_queue_that_is_not_a_multiple_of_the_batch():
  with pytest.raises(ValueError, match='not a multiple of 4'):
    losses.moco_enqueue(jnp.zeros((1, 6, 2)), 0, jnp.zeros((1, 4, 2)))
