"""Self-supervised MCL (`moco_mcl`) in the training step: grouped (shuffle) BatchNorm, the order
of one step (queries, key-encoder EMA with the pre-update queries, keys, loss, enqueue), labels
never read, one peer (MoCo), validation, kNN evaluation, and resume == uninterrupted."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import losses, methods, train
from mcl_jax import step as step_lib
from mcl_jax.methods import moco_mcl
from mcl_jax.metrics import read_metrics

from support import REPO, reproducible, restore_final_state, tiny_config

BATCH, QUEUE, GROUPS, MOMENTUM = 16, 32, 4, 0.9


def moco_config(**overrides):
  return tiny_config(
      **{
          'method.name': 'moco_mcl',
          'method.queue_size': QUEUE,
          'method.bn_groups': GROUPS,
          'method.key_momentum': MOMENTUM,  # far from 1: the EMA's effect is visible in one step
          'method.augmentation': 'grey',
          'method.embed_dim': 16,
          'method.knn_k': 5,
          'batch_size': BATCH,
          **overrides,
      }
  )


@pytest.fixture(scope='module')
def run():
  """An experiment and its states 0, 1, 2 (host copies: the step donates its input)."""
  exp = train.Experiment(moco_config())
  state = exp.init_state()
  states, metrics = [jax.device_get(state)], []
  for step in range(2):
    state, m = exp.train_step(state, exp.batch(step), exp.frozen)
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return exp, states, metrics


def step_inputs(exp, state, step):
  """The batch (views, no labels) and loss context the train step builds at `step`."""
  batch, rng = step_lib.augmented_batch(
      exp.batch(step), jnp.int32(step), exp.config.seed, exp.aug, exp.method
  )
  ctx = step_lib.LossContext(
      rng=rng, step=jnp.int32(step), peer_params=state.params['peers'], cohort=exp.cohort
  )
  return batch, ctx


def test_grouped_batchnorm_equals_separate_batchnorm_per_sub_batch(run):
  exp, states, _ = run
  params, stats = states[0].params['peers'], states[0].batch_stats
  images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  features, new_stats = moco_mcl.grouped_apply(exp.cohort, params, stats, images, 2)
  halves = [exp.cohort.apply(params, stats, images[i : i + 4], train=True) for i in (0, 4)]
  separate = jnp.concatenate([h[0]['groups'][0]['feature'] for h in halves], axis=1)
  chex.assert_trees_all_close(features[0], separate, atol=1e-5, rtol=1e-5)
  mean_stats = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  chex.assert_trees_all_close(new_stats, mean_stats, atol=1e-6, rtol=1e-5)
  whole, _ = exp.cohort.apply(params, stats, images, train=True)  # one BatchNorm: different
  assert not np.allclose(whole['groups'][0]['feature'], separate, atol=1e-3)


def test_shuffle_gives_a_query_and_its_key_different_sub_batches(run):
  exp, states, _ = run
  size = BATCH // GROUPS
  for step in range(5):
    _, ctx = step_inputs(exp, states[0], step)
    permutation, inverse = (np.asarray(a) for a in moco_mcl.shuffle_permutation(ctx.rng, BATCH))
    assert sorted(permutation) == list(range(BATCH))
    np.testing.assert_array_equal(permutation[inverse], np.arange(BATCH))
    for n in range(BATCH):
      query_companions = set(range(n // size * size, n // size * size + size))
      slot = inverse[n]  # where image n's key view sits in the key encoder's batch
      assert permutation[slot] == n
      key_companions = set(permutation[slot // size * size : slot // size * size + size])
      assert n in key_companions and key_companions != query_companions, (step, n)


def test_keys_come_back_in_the_rows_order(run):
  """With one BatchNorm group the statistics ignore the order, so shuffled-then-unshuffled keys
  equal keys computed without any shuffle."""
  exp, states, _ = run
  section = exp.method.config.copy_and_resolve_references()
  section.bn_groups = 1
  one_group = methods.build(section)
  state = states[0]
  batch, ctx = step_inputs(exp, state, 0)
  key_encoder, key_stats = state.method_state['key_encoder'], state.method_state['key_batch_stats']
  keys, _ = one_group.keys(key_encoder, key_stats, batch['key_image'], ctx)
  features, _ = moco_mcl.grouped_apply(
      exp.cohort, key_encoder['peers'], key_stats, batch['key_image'], 1
  )
  chex.assert_trees_all_close(keys, one_group.embed(key_encoder['heads'], features), atol=1e-5)


def test_initial_state(run):
  exp, states, _ = run
  state = states[0]
  chex.assert_trees_all_equal(
      state.method_state['key_encoder'],
      {'peers': state.params['peers'], 'heads': state.params['method']['heads']},
  )
  chex.assert_trees_all_equal(state.method_state['key_batch_stats'], state.batch_stats)
  queue = state.method_state['queue']
  assert queue.shape == (2, QUEUE, 16) and int(state.method_state['queue_ptr']) == 0
  np.testing.assert_allclose(np.linalg.norm(queue, axis=-1), 1.0, rtol=1e-5)


def test_step_order_ema_keys_loss_enqueue(run):
  """Step 1 recomputed from state 1: the key encoders move towards the query encoders as they
  are BEFORE the update (not after), the keys come from the moved key encoders, the loss terms
  are `moco_mcl_loss` of those queries and keys, and the keys fill the next queue rows."""
  exp, states, metrics = run
  c = exp.method.config
  before, after = states[1], states[2]
  batch, ctx = step_inputs(exp, before, 1)
  assert 'label' not in batch and batch['key_image'].shape == batch['image'].shape

  query_encoder = {'peers': before.params['peers'], 'heads': before.params['method']['heads']}
  key_encoder = jax.tree.map(
      lambda k, q: MOMENTUM * k + (1 - MOMENTUM) * q,
      before.method_state['key_encoder'],
      query_encoder,
  )
  chex.assert_trees_all_close(after.method_state['key_encoder'], key_encoder, rtol=1e-6, atol=1e-7)
  updated = {'peers': after.params['peers'], 'heads': after.params['method']['heads']}
  too_late = jax.tree.map(
      lambda k, q: MOMENTUM * k + (1 - MOMENTUM) * q, before.method_state['key_encoder'], updated
  )
  assert not np.allclose(
      jax.tree.leaves(after.method_state['key_encoder'])[0], jax.tree.leaves(too_late)[0]
  )

  features, stats = moco_mcl.grouped_apply(
      exp.cohort, before.params['peers'], before.batch_stats, batch['image'], GROUPS
  )
  chex.assert_trees_all_close(after.batch_stats, stats, rtol=1e-5, atol=1e-6)
  queries = exp.method.embed(before.params['method']['heads'], features)
  keys, _ = exp.method.keys(
      key_encoder, before.method_state['key_batch_stats'], batch['key_image'], ctx
  )
  terms = losses.moco_mcl_loss(queries, keys, before.method_state['queue'], c.tau, c.kd_T)
  for name, value in terms.items():
    np.testing.assert_allclose(metrics[1][name], value, rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(metrics[1]['loss'], sum(terms.values()), rtol=2e-5)
  stale_keys, _ = exp.method.keys(
      before.method_state['key_encoder'],
      before.method_state['key_batch_stats'],
      batch['key_image'],
      ctx,
  )
  stale = losses.moco_mcl_loss(queries, stale_keys, before.method_state['queue'], c.tau, c.kd_T)
  assert abs(float(stale['vcl']) - float(metrics[1]['vcl'])) > 1e-4

  # Step 0 wrote rows [0, 16), step 1 rows [16, 32); the pointer wrapped to 0.
  assert int(before.method_state['queue_ptr']) == BATCH
  assert int(after.method_state['queue_ptr']) == 0
  chex.assert_trees_all_equal(
      after.method_state['queue'][:, :BATCH], before.method_state['queue'][:, :BATCH]
  )
  chex.assert_trees_all_close(after.method_state['queue'][:, BATCH:], keys, atol=1e-5)
  assert 0.0 <= metrics[1]['pretext_top1'] <= 1.0 and 'peer_1/pretext_top1' in metrics[1]


def test_labels_are_never_read(run):
  exp, states, _ = run
  raw = exp.batch(1)
  garbage = {**raw, 'label': jnp.full_like(raw['label'], 12345)}
  outputs = [
      jax.device_get(exp.train_step(jax.device_put(states[1], exp.state_sharding), b, exp.frozen))
      for b in (raw, garbage)
  ]
  chex.assert_trees_all_equal(outputs[0], outputs[1])
  assert exp.method.uses_labels is False and not exp.method.class_balanced


def test_knn_evaluation(run):
  exp, states, _ = run
  state = jax.device_put(states[2], exp.state_sharding)
  bank = exp.knn_bank(state)
  assert bank['features'][0].shape[:2] == (2, len(exp.train_data.labels))
  np.testing.assert_allclose(np.linalg.norm(bank['features'][0], axis=-1), 1.0, rtol=1e-5)
  # The bank's own images are classified by a bank with themselves at similarity 1: with
  # k = 1 every one is right.
  one = dataclasses.replace(exp.knn, k=1)
  step = step_lib.make_knn_eval_step(exp.cohort, exp.aug, 10, one.k, one.temperature)
  batch = {
      'image': exp.train_data.images[:8],
      'label': exp.train_data.labels[:8],
      'mask': np.ones(8, bool),
  }
  counts = step(state.params['peers'], state.batch_stats, batch, bank)
  np.testing.assert_array_equal(counts['top1'], [8, 8])
  result = exp.evaluate_all(state)
  assert 0.0 <= result['eval/best_peer/top1'] <= 1.0


def test_one_peer_is_moco():
  exp = train.Experiment(moco_config(**{'cohort.num_peers': 1, 'method.knn_bank_examples': 0}))
  assert exp.knn is None  # knn_bank_examples = 0: the classifier evaluation, as other methods
  _, m = exp.train_step(exp.init_state(), exp.batch(0), exp.frozen)
  m = jax.device_get(m)
  assert m['vcl'] > 0 and m['soft_vcl'] == m['icl'] == m['soft_icl'] == 0.0
  np.testing.assert_allclose(m['loss'], m['vcl'], rtol=1e-6)


@pytest.mark.parametrize(
    'key,value,message',
    [
        ('queue_size', 40, r'method.queue_size=40 must be a multiple of .*batch_size=16'),
        ('bn_groups', 3, r'method.bn_groups=3 must divide batch_size=16'),
        ('augmentation', 'v3', r"method.augmentation='v3': must be one of \('v1', 'v2', 'grey'\)"),
        ('key_momentum', 1.5, r'must be in \[0, 1\]'),
        ('augmentation', 'v2', r"augmentation='v2' needs RGB images; the data has 1 channel"),
    ],
)
def test_validation_names_the_values(key, value, message):
  config = moco_config(**{f'method.{key}': value})
  with pytest.raises(ValueError, match=message):
    train.validate(config, num_devices=1)


def test_multi_branch_networks_are_refused():
  config = moco_config(**{'model.arch': 'resnet8_okd2', 'cohort.num_peers': 1})
  with pytest.raises(ValueError, match=r"needs one encoder per peer; \['resnet8_okd2'\]"):
    train.validate(config, num_devices=1)


def test_resume_equals_uninterrupted(tmp_path):
  config = moco_config(**{'total_steps': 6, 'eval_every_steps': 3, 'log_every_steps': 1})
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.run(config, straight)
  train.run(config, resumed, stop_after_steps=2)
  train.run(config, resumed)
  step_a, state_a = restore_final_state(straight)
  step_b, state_b = restore_final_state(resumed)
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(state_a, state_b)  # queues, pointer, key encoders included
  metrics = read_metrics(straight)
  assert reproducible(metrics) == reproducible(read_metrics(resumed))
  names = set().union(*metrics)
  for name in (
      'train/vcl',
      'train/soft_vcl',
      'train/icl',
      'train/soft_icl',
      'train/loss',
      'train/pretext_top1',
      'train/peer_0/pretext_top1',
      'eval/peer_0/top1',
  ):
    assert name in names, name


def test_sharded_steps_equal_one_device(tmp_path):
  """On 8 fake CPU devices (meshes 4x2 and 8x1, float64): the grouped BatchNorm vmapped around
  the peers' shard_map, the key encoders and the queues split over 'peer' give the 1-device
  states and metrics; the step traces once; checkpoints restore exactly."""
  out = str(tmp_path / 'moco_sharding.json')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'support', 'moco_sharding.py'), out],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=1800,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out) as f:
    results = json.load(f)
  for mesh, r in results.items():
    assert max(r['free'], r['forced'], r['metrics']) < 1e-10, (mesh, r)
    assert r['traces'] == 1 and r['restored_equal'], (mesh, r)
  placements = results['4x2']['placements']
  assert placements[".method_state['queue']"] == "P('peer',)"
  assert placements[".method_state['queue_ptr']"] == 'P()'
  key_encoder = [v for k, v in placements.items() if 'key_encoder' in k or 'key_batch' in k]
  assert key_encoder and set(key_encoder) == {"P('peer',)"}
