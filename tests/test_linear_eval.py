"""Linear evaluation (mcl_jax.linear_eval) of a tiny two-peer ResNet-8 run: its result equals an
independent recomputation, the backbone stays frozen, cached features give what per-step
recomputed ones give, a stopped evaluation resumes to the uninterrupted numbers, multi-branch
and heterogeneous cohorts are numbered as the run's evaluation, and every mistake on the command
line is one message, exit status 2, nothing written."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import cohort as cohort_lib, config_lib, data, evaluate, linear_eval, methods, models
from mcl_jax import train, workdir
from mcl_jax.metrics import read_metrics

from support import REPO, restore_final_state, tiny_config
from support.fake_tfds import fake_records, patch_prepared_tfds

RESULT_KEYS = {'workdir', 'peer', 'data', 'step', 'linear_eval/top1', 'linear_eval/top5', 'epochs'}
# An un-augmented variant of the run's data set: a transfer target of the same image shape on
# which augmented views and cached features see the same images.
PLAIN = 'fashion_mnist_plain_le'
data.register(PLAIN, dataclasses.replace(data.get('fashion_mnist'), crop_padding=0, flip=False))


def small_config(**overrides):
  """3 epochs of 4 steps (128 images, batch 32), lr x0.1 after epoch 2, 48 test images (the
  feature batches of 32 end in a padded one)."""
  c = linear_eval.default_config()
  c.epochs, c.milestones, c.batch_size = 3, (2,), 32
  c.data.train_examples, c.data.eval_examples, c.data.eval_batch_size = 128, 48, 32
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _tree(path, skip=None) -> dict:
  """{relative path: sha256 (None for a directory)} of everything under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in files + dirs:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if skip and rel.split(os.sep)[0] == skip:
        continue
      out[rel] = None
      if os.path.isfile(full):
        with open(full, 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('linear_eval') / 'run')
  train.run(tiny_config(), path)
  return path


@pytest.fixture(scope='module')
def evaluated(run):
  """Peer 1 of the run evaluated with the protocol (augmented views, lr 30) into the default
  output directory, with the run's files hashed before and after."""
  before = _tree(run)
  result = linear_eval.linear_eval(run, small_config(), peer=1)
  return types.SimpleNamespace(
      result=result,
      out=os.path.join(run, 'linear_eval', 'peer_1'),
      before=before,
      after=_tree(run, skip='linear_eval'),
  )


def test_the_result_equals_an_independent_recomputation(run, evaluated):
  result = evaluated.result
  assert set(result) == RESULT_KEYS
  assert (result['workdir'], result['peer'], result['data'], result['epochs']) == (
      run,
      1,
      'fashion_mnist',
      3,
  )
  encoder_step, run_state = restore_final_state(run)
  assert result['step'] == encoder_step == 8
  # Peer 1 from the run's checkpoint, applied by hand in eval mode to the un-augmented test images.
  variables = {
      'params': jax.tree.map(lambda x: x[1], run_state['params']['peers'][0]),
      'batch_stats': jax.tree.map(lambda x: x[1], run_state['batch_stats'][0]),
  }
  test = data.load('fashion_mnist', 'test').take(48)
  mean, std = data.normalization('fashion_mnist')
  images = ((test.images / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
  model = models.get_model('resnet8', 10)
  features = np.asarray(model.apply(variables, images, train=False)['feature'], np.float64)
  # The classifier of the evaluation's final checkpoint.
  step, linear = restore_final_state(evaluated.out)
  assert step == 3 * 4
  logits = features @ np.asarray(linear['params']['kernel'], np.float64) + linear['params']['bias']
  ranked = np.argsort(-logits, axis=1)
  top1 = np.mean(ranked[:, 0] == test.labels)
  top5 = np.mean([label in row[:5] for label, row in zip(test.labels, ranked)])
  assert result['linear_eval/top1'] == top1 and result['linear_eval/top5'] == top5
  # metrics.jsonl: a line per epoch with the loss, the lr schedule and the test accuracy.
  rows = read_metrics(evaluated.out)
  assert [r['step'] for r in rows] == [4, 8, 12] and [r['epoch'] for r in rows] == [1, 2, 3]
  assert [r['linear/lr'] for r in rows] == pytest.approx([30.0, 30.0, 3.0])
  assert all(np.isfinite(r['linear/loss']) for r in rows)
  assert rows[-1]['linear_eval/top1'] == top1 and rows[-1]['linear_eval/top5'] == top5
  with open(os.path.join(evaluated.out, 'config.json')) as f:
    record = json.load(f)
  assert record['encoder']['step'] == 8 and record['encoder']['peer'] == 1
  assert record['data']['name'] == 'fashion_mnist' and record['lr'] == 30.0
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(evaluated.out))
  assert not os.path.exists(os.path.join(evaluated.out, workdir.LOCK_NAME))  # released


def test_the_backbone_is_frozen(evaluated):
  """The run's checkpoints and files are the same bytes: only linear_eval/ was added."""
  assert evaluated.after == evaluated.before


def test_a_finished_evaluation_reports_again_and_changes_nothing(run, evaluated, capsys):
  before = _tree(evaluated.out)
  assert linear_eval.linear_eval(run, small_config(), peer=1) == evaluated.result
  assert 'nothing to do' in capsys.readouterr().out
  assert _tree(evaluated.out) == before


def test_a_stopped_evaluation_resumes_to_the_uninterrupted_numbers(run, evaluated, tmp_path):
  """Stopped after an epoch (as a kill after its checkpoint), or run for 1 epoch and then
  continued to 3 (epochs may change): both end with the uninterrupted evaluation's numbers."""
  _, uninterrupted = restore_final_state(evaluated.out)
  for name, first in (
      ('stopped', dict(config=small_config(), stop_after_epochs=1)),
      ('longer', dict(config=small_config(epochs=1))),
  ):
    out = str(tmp_path / name)
    partial = linear_eval.linear_eval(run, peer=1, out=out, **first)
    assert int(restore_final_state(out)[0]) == 4
    if name == 'longer':
      assert partial['epochs'] == 1 and set(partial) == RESULT_KEYS
    result = linear_eval.linear_eval(run, small_config(), peer=1, out=out)
    assert result == evaluated.result, name
    assert read_metrics(out) == read_metrics(evaluated.out), name
    chex.assert_trees_all_equal(restore_final_state(out)[1], uninterrupted)
  with open(os.path.join(out, workdir.CHANGES_NAME)) as f:
    assert json.loads(f.readline())['changes'] == {'epochs': [1, 3]}


def test_cached_features_train_as_per_step_recomputed_ones(run, monkeypatch):
  """On a data source without augmentation (a transfer target of the same shape) the augmented
  path recomputes every step exactly the features the cached path computed once (which is why
  such a source is always cached: here it is made to recompute them)."""
  monkeypatch.setattr(linear_eval, '_CACHE_UNAUGMENTED', False)
  results, rows = {}, {}
  for augment in (True, False):
    config = small_config(epochs=2, lr=0.5, augment=augment, **{'data.name': PLAIN})
    results[augment] = linear_eval.linear_eval(run, config, peer=0, out=f'{run}_plain_{augment}')
    rows[augment] = read_metrics(f'{run}_plain_{augment}')
  assert results[True]['data'] == PLAIN
  assert results[True] == results[False]
  for a, b in zip(rows[True], rows[False]):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)


def test_features_of_one_step_equal_the_cache(run):
  """Directly: the cached features of a batch are the per-step ones of the same images."""
  exp, state = evaluate.restore(run)
  encoder = linear_eval.encoder_of(exp.cohort, state, exp.config, 0)
  config = small_config(augment=False, **{'data.name': PLAIN})
  probe = linear_eval.probe_data(config, PLAIN, None)
  features = linear_eval.Features(encoder, probe, config)
  cached, labels = features.of_split(probe.train, probe.num_train)
  idx = jnp.asarray(data.BatchSampler(np.asarray(labels), 32, 0).indices(5))
  per_step = features.views(jnp.asarray(probe.train.images), idx, 5)
  np.testing.assert_allclose(per_step, cached[idx], rtol=1e-5, atol=1e-6)


def test_peers_are_numbered_as_the_runs_evaluation():
  """Heterogeneous groups in order, a multi-branch model's branches as consecutive peers; each
  peer's encoder gives that peer's (branch's) feature."""
  config = tiny_config()
  config.model.archs = ('resnet8', 'resnet8_okd2', 'resnet8')
  config.cohort.num_peers = 3
  assert linear_eval.peer_table(config) == [
      ('resnet8', 0, 0, None),
      ('resnet8_okd2', 1, 0, 0),
      ('resnet8_okd2', 1, 0, 1),
      ('resnet8', 2, 0, None),
  ]
  cohort = cohort_lib.build_cohort(config.model, config.cohort, 10, backend='cpu')
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
  params, stats = cohort.init(jax.random.key(0), images[:1])
  outputs, _ = cohort.apply(params, stats, images, train=False)
  assert outputs['logits'].shape[0] == 4  # what the run's evaluation counts as peers
  state = types.SimpleNamespace(params={'peers': params}, batch_stats=stats)
  expected = [
      outputs['groups'][0]['feature'][0],
      outputs['groups'][1]['feature'][0, 0],
      outputs['groups'][1]['feature'][0, 1],
      outputs['groups'][2]['feature'][0],
  ]
  for peer, feature in enumerate(expected):
    encoder = linear_eval.encoder_of(cohort, state, config, peer)
    np.testing.assert_allclose(
        encoder.features(encoder.variables, images), feature, rtol=1e-5, atol=1e-6
    )


def test_a_held_output_directory_is_refused(run, tmp_path):
  out = str(tmp_path / 'held')
  lock = workdir.TrainerLock(out, flag='--out')
  lock.acquire()  # this (live) process holds it
  try:
    with pytest.raises(workdir.WorkdirError, match=f'--out {out} is in use by pid {os.getpid()}'):
      linear_eval.linear_eval(run, small_config(), peer=0, out=out)
    assert os.listdir(out) == [workdir.LOCK_NAME]
  finally:
    lock.release()


def test_the_config_file_and_its_checks():
  load = linear_eval.cli.load_config
  assert linear_eval.problems(load('configs/linear_eval.py')) == []
  assert linear_eval.problems(load('configs/linear_eval.py:smoke')) == []
  c = load('configs/linear_eval.py')
  assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (30.0, 0.9, 0.0, 256, 100)
  assert (c.milestones, c.augment, c.data.name) == ((60, 80), True, '')
  c = load('configs/linear_eval.py:epochs=10,cached,data=fashion_mnist_full')
  assert (c.epochs, c.milestones, c.augment, c.data.name) == (
      10,
      (6, 8),
      False,
      'fashion_mnist_full',
  )
  linear_eval.apply_overrides(c, [('milestones', '3,7'), ('augment', 'true'), ('lr', '1')])
  assert (c.milestones, c.augment, c.lr) == ((3, 7), True, 1.0)
  c.milestones, c.epochs, c.momentum = (5, 2), 0, 1.0
  assert [p.split('=')[0] for p in linear_eval.problems(c)] == ['epochs', 'momentum', 'milestones']
  with pytest.raises(config_lib.ConfigError, match='--config.epochs=1.5: .* epochs is an int'):
    linear_eval.apply_overrides(c, [('epochs', '1.5')])


# ---- The command line: each mistake through the real command in a subprocess --------------- #
CASES = [
    ('no run', ['--workdir', '{root}/nope'], ['{root}/nope does not exist.']),
    (
        'peer out of range',
        ['--workdir', '{run}', '--peer', '2'],
        ['--peer=2: the run in {run} has peers 0..1 (0: resnet8, 1: resnet8); pass one of them.'],
    ),
    (
        'transfer to another image shape',
        ['--workdir', '{run}', '--config.data.name=cifar100'],
        [
            "data.name='cifar100': its images are 32x32x3 (H x W x C), but peer 0 of {run} was "
            'trained on fashion_mnist images of 28x28x1',
            'Registered data sets of 28x28x1: fashion_mnist, fashion_mnist_full',
        ],
    ),
    ('bad value', ['--workdir', '{run}', '--config.lr=-1'], ['lr=-1.0: must be > 0']),
    (
        'wrong type',
        ['--workdir', '{run}', '--config.epochs=ten'],
        ["--config.epochs=ten: invalid literal for int() with base 10: 'ten'; epochs is an int"],
    ),
    (
        'unknown key',
        ['--workdir', '{run}', '--config.momentun=0.5'],
        ['unknown config key momentun; did you mean momentum?'],
    ),
    (
        'unknown config argument',
        ['--workdir', '{run}', '--config', 'configs/linear_eval.py:epoch=3'],
        ["Unknown config argument 'epoch'"],
    ),
    (
        'another evaluation in --out',
        ['--workdir', '{run}', '--peer', '1', '--config.lr=0.1'],
        [
            '--out {run}/linear_eval/peer_1 holds a linear evaluation with other settings',
            'lr: 30.0',
        ],
    ),
]


@pytest.mark.parametrize('args,expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_clear_error_exit_2_and_nothing_written(run, evaluated, args, expected):
  root = os.path.dirname(run)
  before = _tree(root)
  proc = subprocess.run(
      [sys.executable, '-m', 'mcl_jax.linear_eval'] + [a.format(run=run, root=root) for a in args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.startswith('mcl_jax.linear_eval: error: '), proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  for part in expected:
    assert part.format(run=run, root=root) in proc.stderr, proc.stderr
  assert _tree(root) == before


# ---- A streamed probe (the ImageNet path: host-side views, a stream resumed at any step) ----- #
def _streamed_train_view(record, rng, size):
  """The host-side training view of the fake streamed source: a random flip."""
  del size
  image = record['image'][:, ::-1] if rng.random() < 0.5 else record['image']
  return {'image': np.ascontiguousarray(image), 'label': np.int32(record['label'])}


def _streamed_eval_view(record, size):
  del size
  return {'image': record['image'], 'label': np.int32(record['label']), 'mask': np.bool_(True)}


def test_a_streamed_probe_matches_a_recomputation_and_resumes(run, tmp_path, monkeypatch):
  records = fake_records(96, (28, 28, 1))  # labels i % 7; every split reads these records
  patch_prepared_tfds(monkeypatch, records)
  data.register(
      'streamed_le',
      data.StreamedTfdsSource(
          'streamed_le',
          tfds_name='imagenet2012',  # a tfds builder that exists; its data comes from the patch
          image_shape=(28, 28, 1),
          num_classes=7,
          num_train=96,
          num_test=96,
          mean=(0.5,),
          std=(0.25,),
          train_transform=_streamed_train_view,
          eval_transform=_streamed_eval_view,
      ),
      replace=True,
  )
  config = small_config(lr=0.5, epochs=2, milestones=(), **{'data.name': 'streamed_le'})
  config.data.eval_examples = 40
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  result = linear_eval.linear_eval(run, config, peer=0, out=whole)
  assert (result['data'], result['epochs']) == ('streamed_le', 2)
  linear_eval.linear_eval(run, config, peer=0, out=resumed, stop_after_epochs=1)
  assert linear_eval.linear_eval(run, config, peer=0, out=resumed) == result
  assert read_metrics(resumed) == read_metrics(whole)
  config.augment = False  # each training record's (eval-view) feature computed once
  cached = linear_eval.linear_eval(run, config, peer=0, out=str(tmp_path / 'cached'))
  assert cached['epochs'] == 2 and 0 <= cached['linear_eval/top1'] <= 1

  # The first 40 test records (eval view: as stored), through peer 0 and the final classifier.
  _, run_state = restore_final_state(run)
  variables = {
      'params': jax.tree.map(lambda x: x[0], run_state['params']['peers'][0]),
      'batch_stats': jax.tree.map(lambda x: x[0], run_state['batch_stats'][0]),
  }
  images = np.stack([r['image'] for r in records[:40]]) / 255.0
  labels = np.asarray([r['label'] for r in records[:40]])
  model = models.get_model('resnet8', 10)
  features = model.apply(variables, ((images - 0.5) / 0.25).astype(np.float32), train=False)
  _, linear = restore_final_state(whole)
  logits = np.asarray(features['feature'], np.float64) @ np.asarray(linear['params']['kernel'])
  top1 = np.mean(np.argmax(logits + linear['params']['bias'], axis=1) == labels)
  assert result['linear_eval/top1'] == top1


def test_the_trainer_refuses_this_config(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'mcl_jax.main', '--config', 'configs/linear_eval.py']
      + ['--workdir', str(tmp_path / 'run')],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.startswith('mcl_jax: error: configs/linear_eval.py is not a training config')
  assert not os.path.exists(tmp_path / 'run')


def test_a_self_supervised_run_is_probed_through_its_backbone(tmp_path):
  """A moco_mcl run (peers trained without labels; projection heads in the method's params): its
  peer's pooled backbone feature is what the classifier sees."""
  if 'moco_mcl' not in methods.names():
    pytest.skip('no moco_mcl method in this tree')
  config = tiny_config(**{'method.name': 'moco_mcl'})
  if 'augmentation' in config.method:
    config.method.augmentation = 'grey'  # Fashion-MNIST has one channel
  run = str(tmp_path / 'moco')
  train.run(config, run)
  result = linear_eval.linear_eval(run, small_config(epochs=1, augment=False), peer=1)
  assert set(result) == RESULT_KEYS and result['epochs'] == 1
  assert 0 <= result['linear_eval/top1'] <= result['linear_eval/top5'] <= 1
