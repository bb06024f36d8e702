"""The training loop end to end: loss goes down, resume == uninterrupted, clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from mcl_jax import checkpoint as ckpt_lib, config_lib, train
from mcl_jax.metrics import read_metrics

from support import reproducible, restore_final_state, REPO


def test_resume_equals_uninterrupted(tmp_path, make_config):
  config = make_config(**{'data.train_eval_examples': 40})  # + 40 training images at each eval
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.run(config, straight)
  train.run(config, resumed, stop_after_steps=3)  # as if preempted after step 3
  assert restore_final_state(resumed)[0] == 3
  train.run(config, resumed)

  step_a, state_a = restore_final_state(straight)
  step_b, state_b = restore_final_state(resumed)
  assert step_a == step_b == config.total_steps
  chex.assert_trees_all_equal(state_a, state_b)  # bit-identical: params, opt and method state, BN
  metrics_a, metrics_b = read_metrics(straight), read_metrics(resumed)
  assert reproducible(metrics_a) == reproducible(metrics_b)
  names = set().union(*metrics_a)
  for name in (
      'train/loss',
      'train/ce',
      'train/dml',
      'train/lr',
      'train/img_per_s',
      'eval/peer_0/top1',
      'eval/peer_1/top5',
      'eval/ensemble/top1',
      'eval/best_peer/top1',
      'train_eval/peer_0/top1',
      'train_eval/peer_1/top5',
      'train_eval/best_peer/top1',
  ):
    assert name in names, name
  assert os.listdir(os.path.join(straight, 'checkpoints', 'best'))
  assert json.load(open(os.path.join(straight, 'config.json')))['method']['name'] == 'dml'
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(straight))

  # Running a finished run again does nothing and keeps the results.
  train.run(config, straight)
  assert reproducible(read_metrics(straight)) == reproducible(metrics_a)


def test_train_eval_split_is_a_fixed_subset_of_the_training_images(make_config):
  exp = train.Experiment(make_config(**{'data.train_eval_examples': 40}))  # 128 training images
  train_data = exp.train_data
  assert train.train_eval_split(train_data, 0) is None
  assert train.train_eval_split(train_data, -1) is train_data
  assert train.train_eval_split(train_data, 500) is train_data
  subset = exp.train_eval_data
  assert len(subset.labels) == 40
  rows = {image.tobytes(): label for image, label in zip(train_data.images, train_data.labels)}
  assert all(rows[image.tobytes()] == label for image, label in zip(subset.images, subset.labels))
  np.testing.assert_array_equal(train.train_eval_split(train_data, 40).labels, subset.labels)
  with pytest.raises(config_lib.ConfigError, match='data.train_eval_examples=-2'):
    train.validate(make_config(**{'data.train_eval_examples': -2}))


def test_train_step_lowers_loss_on_a_fixed_batch(make_config):
  from mcl_jax import data

  # The same batch at every step: no random crop or flip (a variant of the embedded source).
  plain = dataclasses.replace(data.get('fashion_mnist'), crop_padding=0, flip=False)
  data.register('fashion_mnist_plain', plain)
  config = make_config(
      **{
          'data.name': 'fashion_mnist_plain',
          'optim.lr': 0.05,
          'optim.schedule': 'constant',
          'method.name': 'independent',
      }
  )
  exp = train.Experiment(config)
  state, batch = exp.init_state(), exp.batch(0)
  losses = []
  for _ in range(6):
    state, metrics = exp.train_step(state, batch, exp.frozen)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 6


@pytest.mark.parametrize(
    'key,value,message',
    [
        ('cohort.num_peers', 0, 'cohort.num_peers=0: must be >= 1'),
        ('method.name', 'mlc', "method.name='mlc'"),
        ('model.arch', 'resnet33', "model.arch='resnet33'"),
        ('cohort.strategy', 'pmap', "cohort.strategy='pmap'"),
        ('optim.schedule', 'poly', "optim.schedule='poly'"),
        ('data.name', 'cifar10', "data.name='cifar10'"),
    ],
)
def test_bad_config_values_are_named(make_config, key, value, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
    train.validate(make_config(**{key: value}))


def test_batch_not_divisible_by_devices(make_config):
  with pytest.raises(config_lib.ConfigError, match='batch_size=30: must be divisible by the 4'):
    train.validate(make_config(batch_size=30), num_devices=4)


def test_missing_tfds_data_names_the_fix(tmp_path, make_config):
  config = make_config(**{'data.name': 'cifar100', 'data.data_dir': str(tmp_path)})
  with pytest.raises(FileNotFoundError, match='tfds build cifar100') as e:
    train.validate(config)
  assert 'data.name=fashion_mnist' in str(e.value)


def test_checkpoint_of_another_run_is_refused(tmp_path, make_config):
  workdir = str(tmp_path / 'run')
  train.run(make_config(total_steps=2, log_every_steps=1), workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match='belongs to a different run'):
    train.run(make_config(total_steps=2, **{'model.arch': 'resnet20'}), workdir)


def test_non_finite_loss_stops_with_step_and_terms(tmp_path, make_config):
  config = make_config(**{'optim.lr': 1e30, 'optim.schedule': 'constant'})
  with pytest.raises(train.NonFiniteLossError, match=r'Non-finite loss at step \d+: .*"ce"'):
    train.run(config, str(tmp_path / 'nan'))


def test_cli_rejects_unknown_key_and_runs(tmp_path):
  cmd = [
      sys.executable,
      '-m',
      'mcl_jax.main',
      '--config',
      'configs/fashion_mnist_mcl.py:smoke',
      '--workdir',
      str(tmp_path / 'cli'),
  ]
  bad = subprocess.run(cmd + ['--config.optim.lrr=0.1'], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and 'lrr' in bad.stderr
  bad = subprocess.run(
      cmd + ['--config.cohort.num_peers=0'], cwd=REPO, capture_output=True, text=True
  )
  assert bad.returncode == 2 and 'cohort.num_peers=0' in bad.stderr


def test_streamed_dataset_trains_and_resumes_exactly(tmp_path, make_config, monkeypatch):
  """The imagenet2012 path (grain stream + memory-bank MCL with lazily read labels) on a small
  fake tfds source: trains, and a resumed run equals an uninterrupted one."""
  from mcl_jax import data
  from support.fake_tfds import patch_prepared_tfds

  rng = np.random.default_rng(0)
  records = [
      {'image': rng.integers(0, 256, (20, 18, 3), dtype=np.uint8), 'label': i % 10}
      for i in range(40)
  ]
  patch_prepared_tfds(monkeypatch, records)  # every tfds split reads `records`
  small = dataclasses.replace(
      data.get('imagenet2012'), image_shape=(16, 16, 3), num_classes=10, num_train=40, num_test=40
  )
  data.register('imagenet2012_16px', small)  # ImageNet's streamed source and transforms, smaller
  config = make_config(
      **{
          'data.name': 'imagenet2012_16px',
          'data.data_dir': str(tmp_path / 'tfds'),
          'data.eval_batch_size': 16,
          'batch_size': 8,
          'total_steps': 4,
          'eval_every_steps': 4,
          'method.name': 'mcl',
          'method.memory_bank': True,
          'method.num_negatives': 6,
          'method.tau': 0.07,
      }
  )
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  last = train.run(config, straight)
  assert 0.0 <= last['eval/best_peer/top1'] <= 1.0
  assert os.path.exists(os.path.join(straight, 'imagenet2012_train_labels.npy'))
  train.run(config, resumed, stop_after_steps=2)
  train.run(config, resumed)
  chex.assert_trees_all_equal(restore_final_state(straight), restore_final_state(resumed))
  assert reproducible(read_metrics(straight)) == reproducible(read_metrics(resumed))
