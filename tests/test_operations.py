"""Operations: SIGTERM and preemption, damaged checkpoints, bad input, NaN, evaluate/export/plot.

One module-scoped pair of runs is shared: a `python -m mcl_jax.main` subprocess SIGTERMed mid-run
and resumed, and the same config run uninterrupted in-process (checkpoints at steps 4, 8, 12).
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import augment, checkpoint as ckpt_lib, config_lib, evaluate, export, plot, train
from mcl_jax import step as step_lib
from mcl_jax.metrics import read_metrics

from support import REPO, reproducible, restore_final_state, start_training

TOTAL_STEPS = 12
MAIN = [
    sys.executable,
    '-m',
    'mcl_jax.main',
    '--config',
    'configs/fashion_mnist_mcl.py:method=dml,arch=resnet8,peers=2',
    '--config.batch_size=16',
    f'--config.total_steps={TOTAL_STEPS}',
    '--config.data.train_examples=128',
    '--config.data.eval_examples=64',
    '--config.data.eval_batch_size=32',
    '--config.log_every_steps=2',
    '--config.eval_every_steps=4',
    '--config.ckpt_every_steps=4',
    '--config.keep_checkpoints=3',
    '--config.mesh.data=1',
]


def _train_cli(workdir, *, sigterm_after_first_step=False):
  """Runs MAIN on `workdir`; with `sigterm_after_first_step`, SIGTERMs it once a step is done."""
  proc, lines = start_training(MAIN + ['--workdir', workdir], REPO)
  if sigterm_after_first_step:
    proc.send_signal(signal.SIGTERM)
  out = ''.join(lines) + proc.communicate(timeout=300)[0]
  return proc.returncode, out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('operations')
  interrupted, straight = str(root / 'interrupted'), str(root / 'straight')
  stopped = _train_cli(interrupted, sigterm_after_first_step=True)
  stopped_metrics = read_metrics(interrupted)
  resumed = _train_cli(interrupted)
  config = evaluate.load_config(interrupted)  # the CLI's config, as evaluate/export read it
  train.run(config, straight)
  return types.SimpleNamespace(
      interrupted=interrupted,
      straight=straight,
      config=config,
      stopped=stopped,
      stopped_metrics=stopped_metrics,
      resumed=resumed,
  )


@pytest.fixture(scope='module')
def abstract_state(runs):
  return train.Experiment(runs.config).abstract_state_with_shardings()


def _copy_run(runs, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(runs.straight, workdir)
  return workdir


def _checkpoint(workdir, step):
  return os.path.join(workdir, 'checkpoints', 'latest', str(step))


def _state_at(workdir, step, abstract_state, identity):
  ckpt = ckpt_lib.Checkpointer(workdir, identity)
  try:
    return ckpt.restore(step, abstract_state)[0]
  finally:
    ckpt.close()


# --------------------------------------------------------------------------------------------- #
# Preemption (SIGTERM on one host; the multi-host sync point is below with a damaged checkpoint)
# --------------------------------------------------------------------------------------------- #
def test_sigterm_stops_cleanly_and_resume_equals_uninterrupted(runs):
  rc, out = runs.stopped
  assert rc == 0, out
  stop_step = int(out.split('stopped by SIGTERM after step ')[1].split(';')[0])
  assert 1 <= stop_step < TOTAL_STEPS, out
  assert 'checkpoint saved' in out
  # The metrics of the stopped run are on disk (flushed), up to the step it stopped at.
  assert [r['step'] for r in runs.stopped_metrics] == list(range(2, stop_step + 1, 2))
  rc, out = runs.resumed
  assert rc == 0, out

  step_a, state_a = restore_final_state(runs.straight)
  step_b, state_b = restore_final_state(runs.interrupted)
  assert step_a == step_b == TOTAL_STEPS
  chex.assert_trees_all_equal(state_a, state_b)
  assert reproducible(read_metrics(runs.interrupted)) == reproducible(read_metrics(runs.straight))


# --------------------------------------------------------------------------------------------- #
# Damaged checkpoints
# --------------------------------------------------------------------------------------------- #
def _array_files(checkpoint_dir):
  files = glob.glob(os.path.join(checkpoint_dir, 'state', '**', 'd', '*'), recursive=True)
  return sorted(files, key=os.path.getsize)


def _truncate(checkpoint_dir):
  for path in _array_files(checkpoint_dir):
    os.truncate(path, os.path.getsize(path) // 2)


def _delete_largest_array_file(checkpoint_dir):
  os.remove(_array_files(checkpoint_dir)[-1])


def _flip_bytes(checkpoint_dir):
  """Garbage in the middle of the compressed data: Orbax restores it without an error."""
  path = _array_files(checkpoint_dir)[-1]
  data = bytearray(open(path, 'rb').read())
  middle = len(data) // 2
  data[middle : middle + 32] = bytes(b ^ 0xFF for b in data[middle : middle + 32])
  open(path, 'wb').write(bytes(data))


def _garble_meta(checkpoint_dir):
  open(os.path.join(checkpoint_dir, 'meta', 'metadata'), 'w').write('{"step": 1')


def _delete_state(checkpoint_dir):
  shutil.rmtree(os.path.join(checkpoint_dir, 'state'))


def _killed_mid_write(checkpoint_dir):
  """Orbax writes into a temporary directory and renames it when complete."""
  os.rename(checkpoint_dir, checkpoint_dir + '.orbax-checkpoint-tmp-1700000000')


@pytest.mark.parametrize(
    'damage,reason',
    [
        (_truncate, 'unreadable state'),
        (_delete_largest_array_file, 'unreadable state'),
        (_flip_bytes, 'corrupted data, checksum mismatch'),
        (_garble_meta, 'unreadable metadata'),
        (_delete_state, 'unreadable state'),
        (_killed_mid_write, None),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_previous(
    runs, abstract_state, tmp_path, caplog, damage, reason
):
  workdir = _copy_run(runs, tmp_path)
  damage(_checkpoint(workdir, 12))
  ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(runs.config))
  with caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore_latest(abstract_state)
  ckpt.close()
  assert meta['step'] == 8
  if reason is not None:
    latest = os.path.join(workdir, 'checkpoints', 'latest')
    assert f'Skipping checkpoint: step 12 in {latest}: {reason}' in caplog.text
  identity = train.run_identity(runs.config)
  chex.assert_trees_all_equal(state, _state_at(runs.straight, 8, abstract_state, identity))


def test_damaged_newest_checkpoint_is_skipped_and_resaved_and_preemption_stops(
    runs, tmp_path, monkeypatch, capsys, caplog
):
  workdir = _copy_run(runs, tmp_path)
  _truncate(_checkpoint(workdir, 12))
  # Multi-host preemption: the hosts agree on a step through JAX's sync service; the loop asks at
  # every step. Here the agreed step is the last one, so the run still ends where it should.
  asked = []
  monkeypatch.setattr(
      ckpt_lib.Checkpointer,
      'reached_preemption',
      lambda self, step: asked.append(step) or step == TOTAL_STEPS,
  )
  with caplog.at_level(logging.WARNING):
    train.run(runs.config, workdir)
  assert 'Resumed from step 8 after skipping: step 12' in caplog.text
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'unrestorable'))[0].startswith('12-')
  assert asked == [9, 10, 11, 12]
  assert 'stopped by a preemption notice (all hosts) after step 12' in capsys.readouterr().out
  # Step 12 was saved again where the damaged one was: resuming from 8 ends as the straight run.
  chex.assert_trees_all_equal(restore_final_state(workdir), restore_final_state(runs.straight))
  assert reproducible(read_metrics(workdir)) == reproducible(read_metrics(runs.straight))


def test_no_valid_checkpoint_is_an_error_and_moves_nothing(runs, abstract_state, tmp_path):
  workdir = _copy_run(runs, tmp_path)
  for step in (4, 8, 12):
    _truncate(_checkpoint(workdir, step))
  ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(runs.config))
  with pytest.raises(ckpt_lib.CheckpointError, match=r'None of the checkpoints .*\[12, 8, 4\]'):
    ckpt.restore_latest(abstract_state)
  ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) == ['12', '4', '8']


def test_checkpoint_of_another_cohort_is_refused_and_config_kept(runs, tmp_path):
  workdir = _copy_run(runs, tmp_path)
  three_peers = evaluate.load_config(workdir)
  three_peers.cohort.num_peers = 3
  expected = (
      "archs: checkpoint has ['resnet8', 'resnet8'], config asks for "
      "['resnet8', 'resnet8', 'resnet8']"
  )
  with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'belongs to a different run \(' + expected.replace('[', r'\[').replace(']', r'\]'),
  ):
    train.run(three_peers, workdir)
  assert evaluate.load_config(workdir).cohort.num_peers == 2


# --------------------------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    'key,value,message',
    [
        ('data.crop_padding', 0, 'data.crop_padding=0: is no longer a config key: the data source'),
        ('data.eval_batch_size', 0, 'data.eval_batch_size=0: must be >= 1'),
        ('method.alpha', -0.1, 'method.alpha=-0.1: must be >= 0'),
        ('method.dml_weight', -1.0, 'method.dml_weight=-1.0: must be >= 0'),
        ('method.memory_momentum', 1.5, 'method.memory_momentum=1.5: must be in [0, 1]'),
        ('method.num_negatives', 0, 'method.num_negatives=0: must be >= 1'),
        ('model.dtype', 'float16', "model.dtype='float16': must be 'float32' or 'bfloat16'"),
        ('seed', -1, 'seed=-1: must be >= 0'),
        ('method.alhpa', 0.1, "method.name='mcl' has no keys ['alhpa']"),
        ('optim.milestones', (60, 30), 'optim.milestones=(60, 30): must be increasing epochs > 0'),
        ('optim.decay_factor', 0.0, 'optim.decay_factor=0.0: must be > 0'),
    ],
)
def test_each_bad_config_value_is_named(make_config, key, value, message):
  overrides = {key: value}
  if key.startswith('method.') and key != 'method.dml_weight':  # MCL's own keys
    overrides['method.name'] = 'mcl'
  with pytest.raises(config_lib.ConfigError) as e:
    train.validate(make_config(**overrides))
  assert message in str(e.value)


def test_every_bad_value_is_listed_at_once(make_config):
  with pytest.raises(config_lib.ConfigError) as e:
    train.validate(make_config(**{'data.eval_batch_size': 0, 'optim.lr': 0.0}))
  assert 'data.eval_batch_size=0' in str(e.value) and 'optim.lr=0.0' in str(e.value)


def _inside_a_file(tmp_path):
  (tmp_path / 'a_file').write_text('')
  return str(tmp_path / 'a_file' / 'run')


def _read_only_dir(tmp_path):
  os.chmod(tmp_path, 0o500)
  return str(tmp_path / 'run')


@pytest.mark.parametrize(
    'make_workdir,free_mib,message',
    [
        (_inside_a_file, None, 'Cannot write to --workdir'),
        pytest.param(
            _read_only_dir,
            None,
            'Cannot write to --workdir',
            marks=pytest.mark.skipif(os.geteuid() == 0, reason='root writes anywhere'),
        ),
        (lambda tmp_path: str(tmp_path / 'run'), 1, 'has only 1 MiB free'),
    ],
)
def test_unusable_workdir_is_reported_before_training(
    tmp_path, make_config, monkeypatch, make_workdir, free_mib, message
):
  def no_training(*args, **kwargs):
    raise AssertionError('the workdir must be checked before the experiment is built')

  monkeypatch.setattr(train, 'Experiment', no_training)
  if free_mib is not None:
    monkeypatch.setattr(train, '_free_bytes', lambda path: free_mib * 2**20)
  workdir = make_workdir(tmp_path)
  try:
    with pytest.raises(OSError, match=message) as e:
      train.run(make_config(), workdir)
  finally:
    os.chmod(tmp_path, 0o700)
  assert workdir in str(e.value)


def test_nan_in_a_batch_stops_the_run_with_the_last_checkpoint_intact(
    runs, abstract_state, tmp_path, monkeypatch
):
  poisoned_step = 5  # the 6th update; a checkpoint was written after update 4
  clean = step_lib.augmented_batch

  def augmented_batch_with_nan(batch, step, seed, aug, method=None):
    batch, key = clean(batch, step, seed, aug, method)
    return {**batch, 'image': jnp.where(step == poisoned_step, jnp.nan, batch['image'])}, key

  monkeypatch.setattr(step_lib, 'augmented_batch', augmented_batch_with_nan)
  workdir = str(tmp_path / 'nan')
  # On XLA:CPU the ReLUs drop NaNs and the loss may stay finite; the poisoned state does not.
  stopped = r'Non-finite (loss|parameters or BatchNorm statistics).* at step 6: '
  with pytest.raises(train.NonFiniteLossError, match=stopped) as e:
    train.run(runs.config, workdir)
  assert '"ce": ' in str(e.value) and '"dml": ' in str(e.value)
  ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(runs.config))
  assert sorted(ckpt.latest.all_steps()) == [4]
  state, _ = ckpt.restore_latest(abstract_state)  # checksums verified
  ckpt.close()
  identity = train.run_identity(runs.config)
  chex.assert_trees_all_equal(state, _state_at(runs.straight, 4, abstract_state, identity))
  logged = reproducible(read_metrics(workdir))
  assert logged == [r for r in reproducible(read_metrics(runs.straight)) if r['step'] <= 4]


# --------------------------------------------------------------------------------------------- #
# evaluate / export / plot
# --------------------------------------------------------------------------------------------- #
def test_evaluate_cli_equals_the_logged_eval_metrics(runs):
  out = subprocess.run(
      [sys.executable, '-m', 'mcl_jax.evaluate', '--workdir', runs.straight, '--step', '8'],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  logged = next(r for r in read_metrics(runs.straight) if r['step'] == 8)
  names = [
      'eval/peer_0/top1',
      'eval/peer_0/top5',
      'eval/peer_1/top1',
      'eval/peer_1/top5',
      'eval/ensemble/top1',
      'eval/best_peer/top1',
  ]
  assert sorted(k for k in result if k.startswith('eval/')) == sorted(names)
  assert result['step'] == 8 and result['split'] == 'test'
  assert {k: result[k] for k in names} == {k: logged[k] for k in names}


def test_evaluate_names_the_saved_steps(runs):
  with pytest.raises(ckpt_lib.CheckpointError, match=r'No checkpoint of step 5 .*\[4, 8, 12\]'):
    evaluate.restore(runs.straight, 5)


def test_exported_peers_give_the_trainer_logits(runs, tmp_path, capsys):
  exp, state = evaluate.restore(runs.straight)
  images = exp.test_data.images[:32]
  normalized = augment.normalize(images, exp.aug.mean, exp.aug.std)
  trainer_logits = exp.cohort.apply(
      state.params['peers'], state.batch_stats, normalized, train=False
  )[0]['logits']
  every, one = str(tmp_path / 'cohort.msgpack'), str(tmp_path / 'peer1.msgpack')
  export.main(['--workdir', runs.straight, '--peer', 'all', '--out', every])
  export.main(['--workdir', runs.straight, '--peer', '1', '--out', one])
  printed = capsys.readouterr().out
  assert f'load peer k with mcl_jax.export.load_peer({every!r}, peer=k), k in [0, 1].' in printed
  assert f'load with mcl_jax.export.load_peer({one!r}).' in printed

  meta = export.load_metadata(every)
  assert meta['archs'] == {0: 'resnet8', 1: 'resnet8'} and meta['num_classes'] == 10
  assert meta['step'] == TOTAL_STEPS
  for path, k in [(every, 0), (every, 1), (one, None)]:
    model, variables = export.load_peer(path, k)
    inputs = augment.normalize(images, *(export.load_metadata(path)[n] for n in ('mean', 'std')))
    logits = model.apply(variables, inputs, train=False)['logits']
    np.testing.assert_allclose(logits, trainer_logits[1 if k is None else k], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'holds peers \[0, 1\] .*; pick one: load_peer\(.*peer=k\)'):
    export.load_peer(every)
  with pytest.raises(TypeError, match=r"peer='1': pass the peer index as an int, e.g. load_peer"):
    export.load_peer(every, '1')
  with pytest.raises(ValueError, match=r'--peer=2: the cohort has peers 0..1'):
    export.export(runs.straight, '2', str(tmp_path / 'x.msgpack'))


def test_plot_overlays_runs_and_training_writes_curves(runs, tmp_path):
  out = str(tmp_path / 'curves.png')
  plot.main([runs.interrupted, runs.straight, '--out', out])
  assert open(out, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  fig = plot.make_figure([runs.interrupted, runs.straight])
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == [plot.ACCURACY_PANEL, 'train/loss', 'train/ce', 'train/dml']
  accuracy = {line.get_label() for line in fig.axes[0].lines}
  assert accuracy == {
      f'{run} {series}'
      for run in ('interrupted', 'straight')
      for series in ('peer_0', 'peer_1', 'ensemble')
  }
  assert list(fig.axes[1].lines[1].get_xdata()) == list(range(2, TOTAL_STEPS + 1, 2))
  for workdir in (runs.interrupted, runs.straight):  # written by train.run when a run finishes
    assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 0


def test_plot_mean_accuracy_and_train_test_gap(tmp_path):
  """The `mean_accuracy` and `gap` panels against the mean over peers computed here; `gap` is
  left out of the default panels for runs without training-set accuracy, and an error when
  asked for."""
  rng = np.random.default_rng(0)
  acc = rng.uniform(0.5, 1.0, size=(2, 3, 2, 2))  # run, log point, {test, train}, peer
  workdirs = []
  for run in range(2):
    workdir = tmp_path / f'run{run}'
    workdir.mkdir()
    lines = [{'step': 1, 'train/loss': 2.0}]  # a log point without evaluation
    for point in range(3):
      record = {'step': 10 * (point + 1), 'train/loss': 1.0 / (point + 1)}
      for peer in range(2):
        record[f'eval/peer_{peer}/top1'] = acc[run, point, 0, peer]
        record[f'train_eval/peer_{peer}/top1'] = acc[run, point, 1, peer]
      lines.append(record)
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
    workdirs.append(str(workdir))
  fig = plot.make_figure(workdirs, ('mean_accuracy', 'gap'))
  assert [ax.get_title() for ax in fig.axes] == [plot.MEAN_ACCURACY_PANEL, plot.GAP_PANEL]
  for run in range(2):
    mean, gap = fig.axes[0].lines[run], fig.axes[1].lines[run]
    assert list(mean.get_xdata()) == list(gap.get_xdata()) == [10, 20, 30]
    np.testing.assert_allclose(mean.get_ydata(), acc[run, :, 0].mean(-1), rtol=1e-12)
    np.testing.assert_allclose(
        gap.get_ydata(), 100 * (acc[run, :, 1].mean(-1) - acc[run, :, 0].mean(-1)), rtol=1e-12
    )
  default = [ax.get_title() for ax in plot.make_figure(workdirs).axes]
  assert default == [plot.ACCURACY_PANEL, plot.GAP_PANEL, 'train/loss']
  for workdir in workdirs:  # without training-set accuracy
    lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    stripped = [{k: v for k, v in l.items() if not k.startswith('train_eval/')} for l in lines]
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(l) + '\n' for l in stripped)
  assert [ax.get_title() for ax in plot.make_figure(workdirs).axes] == [
      plot.ACCURACY_PANEL,
      'train/loss',
  ]
  with pytest.raises(ValueError, match='--panels gap: no run logs accuracy on its training'):
    plot.make_figure(workdirs, ('accuracy', 'gap'))
