"""Schedules from epochs, weight-decay masks, and the SGD update against torch.optim.SGD's formula."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mcl_jax import config_lib, optim


def optim_config(**kw):
  c = config_lib.base_config().optim
  c.update(kw)
  return c


def test_cosine_per_epoch_is_constant_within_epoch():
  sched = optim.make_schedule(optim_config(schedule='cosine', per_epoch=True), 300 * 10, 10)
  assert float(sched(0)) == pytest.approx(0.1)
  assert float(sched(9)) == pytest.approx(0.1)
  assert float(sched(10)) == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi / 300)))
  assert float(sched(299 * 10)) == pytest.approx(
      0.1 * 0.5 * (1 + np.cos(np.pi * 299 / 300)), rel=1e-3
  )


def test_cosine_per_step_and_multistep_and_warmup():
  sched = optim.make_schedule(optim_config(schedule='cosine', per_epoch=False), 100, 10)
  assert float(sched(50)) == pytest.approx(0.05)
  ms = optim.make_schedule(
      optim_config(schedule='multistep', milestones=(30, 60), decay_factor=0.1), 900, 10
  )
  assert [float(ms(s)) for s in (0, 299, 300, 599, 600)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001]
  )
  warm = optim.make_schedule(optim_config(schedule='constant', warmup_epochs=1.0), 100, 10)
  assert [float(warm(s)) for s in (0, 4, 9, 10)] == pytest.approx([0.01, 0.05, 0.1, 0.1])
  with pytest.raises(ValueError, match='optim.schedule'):
    optim.make_schedule(optim_config(schedule='poly'), 100, 10)


def test_weight_decay_mask_modes():
  params = {
      'conv': {'kernel': jnp.ones((2, 3, 3))},
      'bn': {'scale': jnp.ones((2, 3)), 'bias': jnp.ones((2, 3))},
  }
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, 'all')))
  mask = optim.weight_decay_mask(params, 'no_bn_bias')
  assert mask == {'conv': {'kernel': True}, 'bn': {'scale': False, 'bias': False}}


def test_sgd_nesterov_matches_torch_formula():
  """torch.optim.SGD(lr, momentum=mu, nesterov=True, weight_decay=wd), written out by hand."""
  lr, mu, wd = 0.1, 0.9, 5e-4
  tx, _ = optim.make_optimizer(
      optim_config(lr=lr, momentum=mu, weight_decay=wd, schedule='constant'), 100, 10
  )
  theta = {'w': jnp.array([1.0, -2.0, 3.0])}
  grads = [np.array([0.5, 0.1, -0.2]), np.array([-0.3, 0.4, 0.0]), np.array([0.1, 0.1, 0.1])]
  state = tx.init(theta)
  ref, buf = np.array([1.0, -2.0, 3.0]), None
  for g in grads:
    updates, state = tx.update({'w': jnp.asarray(g)}, state, theta)
    theta = optax.apply_updates(theta, updates)
    d = g + wd * ref
    buf = d if buf is None else mu * buf + d
    ref = ref - lr * (d + mu * buf)
  np.testing.assert_allclose(theta['w'], ref, rtol=1e-6)
