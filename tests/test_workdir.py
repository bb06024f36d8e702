"""The run directory (mcl_jax.workdir): one trainer at a time, no silent config change.

One module-scoped smoke run (`configs/fashion_mnist_mcl.py:smoke`, 8 steps, trained in-process as
the CLI would build it) serves as the finished run of the config-drift tests and as the lone run
that two concurrent trainings must reproduce.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import pytest

from mcl_jax import cli, train, workdir as workdir_lib
from mcl_jax.metrics import read_metrics

from support import REPO, reproducible, restore_final_state, start_training

SMOKE = 'configs/fashion_mnist_mcl.py:smoke'
STEPS = 8
MAIN = [sys.executable, '-m', 'mcl_jax.main', '--config', SMOKE, f'--config.total_steps={STEPS}']


def tree(path) -> dict:
  """{relative path: sha256} of every file under `path` ({} if it does not exist)."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def smoke_config(**overrides):
  return cli.load_config(SMOKE, {'total_steps': STEPS, **overrides})


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('workdir') / 'finished')
  train.run(smoke_config(), workdir)
  return workdir


def _copy(finished, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  return workdir


def _dead_pid() -> int:
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def _write_lock(workdir, **content):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.LOCK_NAME), 'w') as f:
    json.dump({'started': 'earlier', 'started_unix': time.time(), **content}, f)


# --------------------------------------------------------------------------------------------- #
# Lock
# --------------------------------------------------------------------------------------------- #
def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
  workdir = str(tmp_path / 'run')
  first = workdir_lib.TrainerLock(workdir)
  first.acquire()
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.TrainerLock(workdir).acquire()
  assert f'is in use by pid {os.getpid()} on host {socket.gethostname()}, started ' in str(e.value)
  assert f'kill {os.getpid()}' in str(e.value)
  first.release()
  assert os.listdir(workdir) == []
  with workdir_lib.TrainerLock(workdir):
    assert os.listdir(workdir) == [workdir_lib.LOCK_NAME]


@pytest.mark.parametrize(
    'holder',
    [
        dict(pid='dead'),  # the trainer was killed
        dict(pid=os.getpid(), started_unix=0.0),  # its pid now belongs to a later process
    ],
    ids=['dead pid', 'reused pid'],
)
def test_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys, holder):
  workdir = str(tmp_path / 'run')
  pid = _dead_pid() if holder['pid'] == 'dead' else holder['pid']
  _write_lock(workdir, **{**holder, 'pid': pid, 'host': socket.gethostname()})
  lock = workdir_lib.TrainerLock(workdir)
  lock.acquire()
  assert lock.holder()['pid'] == os.getpid()
  assert f'took over the stale lock {lock.path} of pid {pid}' in capsys.readouterr().err
  lock.release()


def test_lock_of_another_host_is_refused_saying_how_to_clear_it(tmp_path):
  workdir = str(tmp_path / 'run')
  _write_lock(workdir, host='node-17', pid=4242, command='python -m mcl_jax.main ...')
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.TrainerLock(workdir).acquire()
  message = str(e.value)
  assert 'in use by pid 4242 on host node-17, started earlier (python -m mcl_jax.main ...)' in (
      message
  )
  assert f'remove {os.path.join(workdir, workdir_lib.LOCK_NAME)} and run again' in message


def test_a_held_workdir_is_refused_before_anything_is_built_or_written(
    finished, tmp_path, monkeypatch
):
  workdir = _copy(finished, tmp_path)
  _write_lock(workdir, host=socket.gethostname(), pid=os.getppid(), started_unix=time.time())
  before = tree(workdir)

  def no_experiment(*args, **kwargs):
    raise AssertionError('a second trainer must be refused before the experiment is built')

  monkeypatch.setattr(train, 'Experiment', no_experiment)
  with pytest.raises(workdir_lib.WorkdirError, match=f'in use by pid {os.getppid()} on host'):
    train.run(smoke_config(), workdir)
  assert tree(workdir) == before


def test_two_concurrent_trainings_one_refused_the_other_as_a_lone_run(finished, tmp_path):
  workdir = str(tmp_path / 'shared')
  first, lines = start_training(MAIN + ['--workdir', workdir], REPO)
  # Paused mid-run (holding the lock) while the second trainer tries the same workdir.
  first.send_signal(signal.SIGSTOP)
  try:
    during = tree(workdir)
    t0 = time.time()
    second = subprocess.run(
        MAIN + ['--workdir', workdir], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    refused_after = time.time() - t0
    assert tree(workdir) == during  # nothing created or changed by the refused trainer
  finally:
    first.send_signal(signal.SIGCONT)
  out = ''.join(lines) + first.communicate(timeout=300)[0]
  assert first.returncode == 0, out

  assert second.returncode == 2, second.stderr
  assert second.stderr.startswith(
      f'mcl_jax: error: --workdir {workdir} is in use by pid {first.pid} on host '
      f'{socket.gethostname()}, started '
  ), second.stderr
  assert 'Traceback' not in second.stderr and len(second.stderr.splitlines()) == 1
  assert refused_after < 30, refused_after

  # The survivor ends exactly as the same config trained alone: one series of rows, one writer.
  chex.assert_trees_all_equal(restore_final_state(workdir), restore_final_state(finished))
  assert reproducible(read_metrics(workdir)) == reproducible(read_metrics(finished))
  steps = [r['step'] for r in read_metrics(workdir)]
  assert steps == sorted(set(steps))
  assert len([n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]) == 1
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))


# --------------------------------------------------------------------------------------------- #
# Config drift
# --------------------------------------------------------------------------------------------- #
def test_config_changes_compare_every_key_generically():
  saved = {'seed': 0, 'method': {'name': 'mcl', 'alpha': 0.1}, 'optim': {'milestones': [1, 2]}}
  now = {'seed': 0, 'method': {'name': 'mcl', 'vcl_weight': 0.1}, 'optim': {'milestones': [1, 3]}}
  assert workdir_lib.config_changes(saved, now) == {
      'method.alpha': (0.1, '<absent>'),
      'method.vcl_weight': ('<absent>', 0.1),
      'optim.milestones': ([1, 2], [1, 3]),
  }


def test_a_changed_config_is_refused_naming_each_key_and_changes_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = tree(workdir)
  with pytest.raises(workdir_lib.ConfigDriftError) as e:
    train.run(smoke_config(**{'optim.lr': 0.5, 'seed': 3, 'total_steps': 12}), workdir)
  message = str(e.value)
  assert '  optim.lr: 0.1 (config.json) -> 0.5 (now)\n  seed: 0 (config.json) -> 3 (now)\n' in (
      message
  )
  assert 'total_steps' not in message.split('\n')[1:3]  # a free key is not a reason to refuse
  assert '--allow_config_change' in message
  assert tree(workdir) == before


def test_an_allowed_change_is_recorded_with_its_step_and_both_values(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  train.run(
      smoke_config(**{'optim.lr': 0.05, 'total_steps': STEPS + 2}),
      workdir,
      allow_config_change=True,
  )
  (record,) = [json.loads(l) for l in open(os.path.join(workdir, workdir_lib.CHANGES_NAME))]
  assert record['step'] == STEPS and record['allowed_by'] == '--allow_config_change'
  assert record['changes'] == {'optim.lr': [0.1, 0.05], 'total_steps': [STEPS, STEPS + 2]}
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['optim']['lr'] == 0.05 and saved['total_steps'] == STEPS + 2
  out = capsys.readouterr().out
  assert f'config changed from step {STEPS}' in out
  assert f'mcl_jax: resumed from step {STEPS} (of {STEPS + 2}) in {workdir}' in out
  assert restore_final_state(workdir)[0] == STEPS + 2


def test_run_length_keys_change_freely_and_are_recorded(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = json.load(open(os.path.join(workdir, 'config.json')))['cohort']['strategy']
  train.run(
      smoke_config(total_steps=STEPS + 2, log_every_steps=1, **{'cohort.strategy': 'vmap'}),
      workdir,
  )
  (record,) = [json.loads(l) for l in open(os.path.join(workdir, workdir_lib.CHANGES_NAME))]
  assert record['allowed_by'] == 'free keys'
  assert record['changes'] == {
      'cohort.strategy': [before, 'vmap'],
      'log_every_steps': [4, 1],
      'total_steps': [STEPS, STEPS + 2],
  }


def test_rerunning_a_finished_run_changes_nothing_and_sums_it_up(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  before = tree(workdir)
  last = train.run(smoke_config(), workdir)  # the same config
  changed = train.run(smoke_config(**{'optim.lr': 0.5}), workdir, allow_config_change=True)
  assert tree(workdir) == before  # no config.json rewrite, no event file, no record
  logged = [r for r in read_metrics(workdir) if 'eval/best_peer/top1' in r][-1]
  assert last == changed == {k: v for k, v in logged.items() if k.startswith('eval/')}
  out = capsys.readouterr().out
  assert f'nothing to do: the run in {workdir} already finished ({STEPS} steps)' in out
  assert 'config.json left as it was' in out
  assert f'  curves:      {os.path.join(workdir, "curves.png")}' in out
  assert f'final (step {STEPS}): peer_0 ' in out


def test_changed_config_on_the_command_line_exits_2_and_changes_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = tree(workdir)
  proc = subprocess.run(
      MAIN + ['--workdir', workdir, '--config.optim.lr=0.5'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith('mcl_jax: error: The config differs from the one the run in ')
  assert '  optim.lr: 0.1 (config.json) -> 0.5 (now)' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert tree(workdir) == before
