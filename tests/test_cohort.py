"""Every cohort strategy equals a plain Python loop over peers, forward and gradients."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcl_jax import cohort as cohort_lib


def make_cohort(strategy, archs):
  model_cfg = ml_collections.ConfigDict(dict(arch=archs[0], archs=tuple(archs), dtype='float32'))
  cohort_cfg = ml_collections.ConfigDict(dict(num_peers=len(archs), strategy=strategy))
  return cohort_lib.build_cohort(model_cfg, cohort_cfg, num_classes=10)


def loop_reference(cohort, params, batch_stats, images):
  """Applies each peer on its own with model.apply, outside any strategy code."""
  logits, stats = [], []
  for group, p, bs in zip(cohort.groups, params, batch_stats):
    for k in range(group.num_peers):
      variables = {
          'params': cohort_lib.peer_slice(p, k),
          'batch_stats': cohort_lib.peer_slice(bs, k),
      }
      out, upd = group.model.apply(variables, images, train=True, mutable=['batch_stats'])
      logits.append(out['logits'])
      stats.append(upd['batch_stats'])
  return jnp.stack(logits), stats


@pytest.mark.parametrize('archs', [('resnet8', 'resnet8', 'resnet8'), ('resnet8', 'wrn_16_2')])
def test_strategies_match_per_peer_loop(archs):
  images = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
  labels = jnp.array([0, 1, 2, 3])
  ref_cohort = make_cohort('unroll', archs)
  params, batch_stats = ref_cohort.init(jax.random.key(0), images)
  assert len(params) == len(set(archs))  # consecutive equal archs form one group

  def ref_loss(params):
    logits, _ = loop_reference(ref_cohort, params, batch_stats, images)
    return -jnp.mean(
        jax.nn.log_softmax(logits)[:, jnp.arange(4), labels]
        * jnp.arange(1.0, 1 + len(archs))[:, None]
    )

  ref_logits, ref_stats = loop_reference(ref_cohort, params, batch_stats, images)
  ref_grads = jax.grad(ref_loss)(params)

  for strategy in ('vmap', 'unroll'):
    cohort = make_cohort(strategy, archs)

    def loss(params):
      out, _ = cohort.apply(params, batch_stats, images, train=True)
      return -jnp.mean(
          jax.nn.log_softmax(out['logits'])[:, jnp.arange(4), labels]
          * jnp.arange(1.0, 1 + len(archs))[:, None]
      )

    out, new_stats = jax.jit(lambda p: cohort.apply(p, batch_stats, images, train=True))(params)
    chex.assert_trees_all_close(out['logits'], ref_logits, rtol=1e-5, atol=1e-5)
    flat_stats = [
        cohort_lib.peer_slice(s, k)
        for g, s in zip(cohort.groups, new_stats)
        for k in range(g.num_peers)
    ]
    chex.assert_trees_all_close(flat_stats, ref_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss))(params), ref_grads, rtol=1e-4, atol=1e-6)


def test_peers_are_initialised_independently():
  cohort = make_cohort('vmap', ('resnet8', 'resnet8'))
  params, _ = cohort.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  kernel = jax.tree.leaves(params[0])[0]
  assert kernel.shape[0] == 2
  assert not np.allclose(kernel[0], kernel[1])


def test_auto_strategy_and_bad_strategy():
  assert cohort_lib.resolve_strategy('auto', 'cpu') == 'unroll'
  assert cohort_lib.resolve_strategy('auto', 'gpu') == 'vmap'
  assert cohort_lib.resolve_strategy('vmap', 'cpu') == 'vmap'
  with pytest.raises(ValueError, match='cohort.strategy'):
    cohort_lib.resolve_strategy('pmap')
