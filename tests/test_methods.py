"""Methods as the trainer sees them: DML and MCL terms against independent NumPy math, the
memory-bank index sampler, and memory updates inside the method."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import cohort as cohort_lib
from mcl_jax import config_lib, losses, methods
from mcl_jax.methods import mcl as mcl_lib
from mcl_jax.step import LossContext


def method_config(name, **kw):
  return methods.config(name, **kw)


def ctx(rng=None):
  return LossContext(rng=rng, step=jnp.zeros((), jnp.int32), peer_params=None)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dml_matches_numpy():
  rng = np.random.default_rng(0)
  K, B, C, T = 3, 5, 4, 2.0
  logits = rng.normal(size=(K, B, C))
  labels = rng.integers(0, C, B)
  with jax.enable_x64(True):
    loss, terms, _ = methods.build(method_config(name='dml', kd_T=T)).loss(
        {}, {}, {'logits': jnp.asarray(logits)}, {'label': jnp.asarray(labels)}, ctx()
    )
  ce = sum(-np.mean(np_log_softmax(logits[k])[np.arange(B), labels]) for k in range(K))
  kl = 0.0
  for k in range(K):
    for l in range(K):
      if k != l:
        pt = np.exp(np_log_softmax(logits[l] / T))
        kl += T * T * np.sum(pt * (np.log(pt) - np_log_softmax(logits[k] / T))) / B / (K - 1)
  np.testing.assert_allclose(terms['ce'], ce, rtol=1e-10)
  np.testing.assert_allclose(terms['dml'], kl, rtol=1e-10)
  np.testing.assert_allclose(loss, ce + kl, rtol=1e-10)


class FakeCohort:
  """Just what methods read from a cohort: groups of (single-branch) peers and their feature
  widths."""

  def __init__(self, sizes_and_dims):
    self.groups = tuple(
        cohort_lib.PeerGroup(None, k, f'fake{g}') for g, (k, _) in enumerate(sizes_and_dims)
    )
    self.feature_dims = tuple(d for _, d in sizes_and_dims)
    self.num_peers = sum(k for k, _ in sizes_and_dims)
    self.num_views = self.num_peers


def reference_mcl_loss(cfg, emb, logits, labels):
  """losses.mcl_loss with the method config's weights and temperatures, logit KD on."""
  return losses.mcl_loss(
      emb,
      logits,
      labels,
      tau=cfg.tau,
      T=cfg.kd_T,
      alpha=cfg.alpha,
      beta=cfg.beta,
      gamma=cfg.gamma,
      lam=cfg.lam,
      logit_kd=True,
  )


def test_mcl_method_equals_loss_function_on_head_embeddings():
  """Heterogeneous cohort (2 peers of width 8 + 1 of width 12): the method embeds each group's
  features with its own heads and hands [K, B, D] to losses.mcl_loss."""
  cfg = method_config(name='mcl', embed_dim=16, logit_kd=True)
  method = methods.build(cfg)
  cohort = FakeCohort([(2, 8), (1, 12)])
  params, state = method.init(jax.random.key(0), cohort, np.zeros(10, np.int32))
  assert state == {} and method.class_balanced
  rng = np.random.default_rng(1)
  feats = (
      jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32),
      jnp.asarray(rng.normal(size=(1, 6, 12)), jnp.float32),
  )
  logits = jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1, 2, 2])
  outputs = {'logits': logits, 'groups': ({'feature': feats[0]}, {'feature': feats[1]})}
  total, terms, _ = method.loss(params, state, outputs, {'label': labels}, ctx())

  emb = []
  for g, f in enumerate(feats):
    for k in range(f.shape[0]):
      p = jax.tree.map(lambda x: x[k], params['heads'][g])
      emb.append(method.head.apply({'params': p}, f[k]))
  emb = jnp.stack(emb)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  ref_total, ref_terms = reference_mcl_loss(cfg, emb, logits, labels)
  chex.assert_trees_all_close((total, terms), (ref_total, ref_terms), rtol=1e-5)
  assert set(terms) == {'ce', 'vcl', 'icl', 'soft_vcl', 'soft_icl', 'kd'}


def test_contrast_index_sampler():
  labels_all = np.array([2, 0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 0], np.int32)
  index = mcl_lib.class_index(labels_all)
  own = jnp.asarray([0, 4, 5, 7])
  idx = mcl_lib.sample_contrast_indices(
      jax.random.key(3), own, jnp.asarray(labels_all[own]), index, num_pos=3, num_neg=400
  )
  idx = np.asarray(idx)
  assert idx.shape == (4, 1 + 3 + 400)
  np.testing.assert_array_equal(idx[:, 0], own)
  for b, n in enumerate(np.asarray(own)):
    assert np.all(labels_all[idx[b, 1:4]] == labels_all[n])  # positives: same class
    assert np.all(labels_all[idx[b, 4:]] != labels_all[n])  # negatives: other classes
    # every other-class example is reachable (uniform over them; 400 draws of 8 candidates)
    assert set(idx[b, 4:]) == set(np.nonzero(labels_all != labels_all[n])[0])
  again = mcl_lib.sample_contrast_indices(
      jax.random.key(3), own, jnp.asarray(labels_all[own]), index, num_pos=3, num_neg=400
  )
  np.testing.assert_array_equal(idx, again)


def test_contrast_index_sampler_without_replacement():
  """MCL-OKD / CRCD draw a uniform subset of the other-class examples per row (no repeats)."""
  labels_all = np.array([2, 0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 0], np.int32)
  index = mcl_lib.class_index(labels_all)
  own = jnp.asarray([0, 4, 5, 7])
  sample = jax.jit(
      lambda key: mcl_lib.sample_contrast_indices(
          key, own, jnp.asarray(labels_all[own]), index, num_pos=1, num_neg=5, replace=False
      )
  )
  counts = np.zeros((4, len(labels_all)))
  draws = 2000
  for t in range(draws):
    idx = np.asarray(sample(jax.random.key(t)))
    for b, n in enumerate(np.asarray(own)):
      negatives = idx[b, 2:]
      assert len(set(negatives)) == 5  # without replacement
      assert np.all(labels_all[negatives] != labels_all[n])
      counts[b, negatives] += 1
  for b, n in enumerate(np.asarray(own)):
    pool = labels_all != labels_all[n]
    # each of the |pool| candidates is in the subset with probability 5/|pool| (binomial, 5 sigma)
    p = 5 / pool.sum()
    sigma = np.sqrt(draws * p * (1 - p))
    np.testing.assert_array_less(np.abs(counts[b, pool] - draws * p), 5 * sigma)
    assert np.all(counts[b, ~pool] == 0)
  mcl_lib.check_negative_pool(labels_all, 8)  # 12 examples, largest class 4 -> pool of 8
  with pytest.raises(ValueError, match='num_negatives=9 exceeds the 8'):
    mcl_lib.check_negative_pool(labels_all, 9)


def test_memory_bank_method_updates_own_slots_only():
  cfg = method_config(
      name='mcl', embed_dim=8, memory_bank=True, num_positives=1, num_negatives=5, tau=0.07
  )
  method = methods.build(cfg)
  assert not method.class_balanced
  labels_all = np.arange(20, dtype=np.int32) % 4
  cohort = FakeCohort([(2, 6)])
  params, state = method.init(jax.random.key(0), cohort, labels_all)
  assert state['memory'].shape == (2, 20, 8)
  bound = 1 / np.sqrt(8 / 3)
  assert np.all(np.abs(state['memory']) <= bound)
  own = jnp.asarray([3, 8, 13])
  feats = jax.random.normal(jax.random.key(1), (2, 3, 6))
  outputs = {
      'logits': jax.random.normal(jax.random.key(2), (2, 3, 4)),
      'groups': ({'feature': feats},),
  }
  batch = {'label': jnp.asarray(labels_all[own]), 'index': own}
  loss_fn = lambda p: method.loss(p, state, outputs, batch, ctx(jax.random.key(4)))
  total, terms, new_state = loss_fn(params)
  assert np.isfinite(total) and set(terms) >= {'vcl', 'icl', 'soft_vcl', 'soft_icl', 'ce'}
  changed = np.any(np.asarray(new_state['memory'] != state['memory']), axis=(0, 2))
  np.testing.assert_array_equal(np.nonzero(changed)[0], [3, 8, 13])
  np.testing.assert_allclose(np.linalg.norm(new_state['memory'][:, own], axis=-1), 1.0, rtol=1e-5)
  grads = jax.grad(lambda p: loss_fn(p)[0])(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def _multi_branch_views(num_peers, images):
  """A cohort of `num_peers` resnet8_okd2 (shared stem + stage 0, two branches: the form of the
  authors' MCL(x4) nets), applied to `images`: (cohort, outputs, per-view features and logits
  in the order the views take on the peer axis: peer-major, branch-minor)."""
  from support import tiny_config

  config = tiny_config(**{'model.arch': 'resnet8_okd2', 'cohort.num_peers': num_peers})
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes=5)
  assert cohort.num_peers == num_peers and cohort.num_views == 2 * num_peers
  variables = cohort.init(jax.random.key(1), images)
  outputs, _ = cohort.apply(*variables, images, train=False)
  group = outputs['groups'][0]
  assert group['feature'].shape[:3] == (num_peers, 2, images.shape[0])
  views = [(k, m) for k in range(num_peers) for m in range(2)]
  features = [group['feature'][k, m] for k, m in views]
  logits = jnp.stack([group['logits'][k, m] for k, m in views])
  np.testing.assert_array_equal(outputs['logits'], logits)
  return cohort, outputs, features, logits


def _view_embeddings(method, head_params, features):
  """Each view's own head (index v of the stacked heads) on that view's feature."""
  emb = [
      method.head.apply({'params': jax.tree.map(lambda x: x[v], head_params)}, f)
      for v, f in enumerate(features)
  ]
  return jnp.stack(emb)


def test_mcl_on_a_multi_branch_net_contrasts_every_branch_as_a_peer():
  """MCL on shared-trunk multi-branch nets (the MCL(x4) rows): 2 peers of resnet8_okd2 are 4
  views, each with its own head; the method's loss is losses.mcl_loss (in-batch, with logit KD)
  on the 4 views' embeddings and logits."""
  images = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2])
  cohort, outputs, features, logits = _multi_branch_views(2, images)
  cfg = method_config(name='mcl', embed_dim=16, logit_kd=True)
  method = methods.build(cfg)
  params, state = method.init(jax.random.key(2), cohort, np.zeros(10, np.int32))
  assert state == {}
  assert {leaf.shape[0] for leaf in jax.tree.leaves(params['heads'])} == {4}
  total, terms, _ = method.loss(params, state, outputs, {'label': labels}, ctx())

  emb = _view_embeddings(method, params['heads'][0], features)
  assert not np.allclose(emb[0], emb[1], atol=1e-3)  # the branches of a peer differ
  ref_total, ref_terms = reference_mcl_loss(cfg, emb, logits, labels)
  chex.assert_trees_all_close((total, terms), (ref_total, ref_terms), rtol=1e-5)
  assert float(terms['icl']) > 0 and float(terms['kd']) > 0


def test_mcl_memory_bank_on_a_multi_branch_net_keeps_one_memory_per_view():
  """The memory-bank variant on one resnet8_okd2 (as an MCL(x4) row: one net, its branches the
  peers): one head and one memory `[N, D]` per branch, the terms of
  losses.memory_vcl_icl_losses on the branches' embeddings, each branch's memory updated with its
  own embeddings."""
  own = jnp.asarray([3, 8, 13])
  labels_all = np.arange(20, dtype=np.int32) % 4
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  cohort, outputs, features, logits = _multi_branch_views(1, images)
  cfg = method_config(
      name='mcl', embed_dim=8, memory_bank=True, num_positives=1, num_negatives=5, logit_kd=True
  )
  method = methods.build(cfg)
  params, state = method.init(jax.random.key(2), cohort, labels_all)
  assert state['memory'].shape == (2, 20, 8)
  assert {leaf.shape[0] for leaf in jax.tree.leaves(params['heads'])} == {2}
  batch = {'label': jnp.asarray(labels_all[own]), 'index': own}
  total, terms, new_state = method.loss(params, state, outputs, batch, ctx(jax.random.key(4)))

  emb = _view_embeddings(method, params['heads'][0], features)
  idx = mcl_lib.sample_contrast_indices(
      jax.random.key(4), own, batch['label'], state, cfg.num_positives, cfg.num_negatives
  )
  ref = losses.memory_vcl_icl_losses(
      emb, state['memory'], idx, cfg.num_positives, cfg.tau, cfg.kd_T
  )
  ref['ce'] = losses.ce_loss(logits, batch['label'])
  ref['kd'] = losses.logit_kd_loss(logits, cfg.kd_T)
  chex.assert_trees_all_close(terms, ref, rtol=1e-5)
  ref_total = (
      ref['ce']
      + ref['kd']
      + cfg.alpha * ref['vcl']
      + cfg.gamma * ref['soft_vcl']
      + cfg.beta * ref['icl']
      + cfg.lam * ref['soft_icl']
  )
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  chex.assert_trees_all_close(
      new_state['memory'],
      losses.memory_update(state['memory'], emb, own, cfg.memory_momentum),
      rtol=1e-5,
  )


def test_methods_own_their_keys_and_validate_them():
  """Each method declares its keys; a wrong type, a bad value, a foreign or a missing key is one
  clear line of the config error, from the method's own validation."""
  assert set(methods.config('kd')) == {'name', 'ce_weight', 'kd_weight', 'kd_T'}
  assert 'alpha' in methods.config('mcl') and 'alpha' not in methods.config('crcd')
  assert methods.problems(methods.config('mcl'), None) == []
  found = methods.problems(methods.config('mcl', tau='hot', alpha=-1.0), None)
  assert "method.tau='hot': must be a float (like the default 0.1)" in found
  assert 'method.alpha=-1.0: must be >= 0' in found
  foreign = methods.config('dml')
  foreign.alpha = 0.1
  assert "has no keys ['alpha']" in methods.problems(foreign, None)[0]
  missing = methods.config('dml')
  del missing['dml_weight']
  assert "needs the keys ['dml_weight']" in methods.problems(missing, None)[0]
  with pytest.raises(KeyError, match="no hyper-parameter \\['alhpa'\\]"):
    methods.config('mcl', alhpa=0.1)
  unknown = methods.problems({'name': 'mlc'}, None)
  assert "method.name='mlc' is not a registered method" in unknown[0]


def test_register_rejects_a_name_taken_elsewhere_and_non_methods():
  class Mine(methods.Method):
    pass

  with pytest.raises(ValueError, match="method 'mcl' is already registered"):
    methods.register('mcl', Mine)
  with pytest.raises(TypeError, match='not a mcl_jax Method subclass'):
    methods.register('mine', object)
  methods.register('test_mine', Mine)
  methods.register('test_mine', Mine)  # the same module again: allowed
  assert methods.build(methods.config('test_mine')).config.name == 'test_mine'


def test_saved_flat_method_sections_upgrade_to_the_methods_own_keys():
  old_kd = {'name': 'kd', 'gamma': 0.1, 'alpha': 0.9, 'kd_T': 4.0, 'beta': 0.1, 'tau': 0.1}
  assert methods.upgrade(old_kd) == {'name': 'kd', 'ce_weight': 0.1, 'kd_weight': 0.9, 'kd_T': 4.0}
  assert methods.upgrade(dict(methods.config('mcl'))) == dict(methods.config('mcl'))
  # A section saved before a method gained keys (L-MCL's ablation switches): at their defaults.
  lmcl = dict(methods.config('lmcl', alpha=0.2))
  saved = {k: v for k, v in lmcl.items() if k not in ('branch_ce', 'stage_pairs')}
  assert methods.upgrade(saved) == lmcl
