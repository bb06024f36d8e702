"""One error path for every command (mcl_jax.cli): each bad input below is given to the real
command in a subprocess, which must end in a line or a few naming the problem and the fix, exit
status 2 and no traceback, with the workdir untouched (absent, or the same bytes).

Every case fails before training starts (most before JAX is imported), so each takes ~2 s.
"""

import hashlib
import os
import subprocess
import sys

import pytest

from mcl_jax import cli

from support import REPO

SMOKE = 'configs/fashion_mnist_mcl.py:smoke'
TRAIN = ['mcl_jax.main', '--config', SMOKE, '--workdir', '{workdir}']

# (case, command after `python -m`, what stderr must say, the workdir: absent, config_only (a
# config.json), with_checkpoint (and a checkpoint directory), None (not given))
CASES = [
    (
        'unknown key',
        TRAIN + ['--config.optim.momentun=0.5'],
        ['unknown config key optim.momentun; did you mean optim.momentum? Known keys of optim: '],
        'absent',
    ),
    (
        'unknown key of the method',
        TRAIN + ['--config.method.alhpa=0.1'],
        ['unknown config key method.alhpa', 'Known keys of method: '],
        'absent',
    ),
    (
        'unknown section',
        TRAIN + ['--config.optm.lr=0.5'],
        ['unknown config key optm.lr; did you mean optim? Top-level keys: '],
        'absent',
    ),
    (
        'wrong type',
        TRAIN + ['--config.batch_size=abc'],
        [
            "--config.batch_size=abc: invalid literal for int() with base 10: 'abc'; batch_size is an int"
        ],
        'absent',
    ),
    (
        'missing config file',
        ['mcl_jax.main', '--config', 'configs/fashion_mnist_mlc.py', '--workdir', '{workdir}'],
        [
            'config file configs/fashion_mnist_mlc.py not found. Did you mean '
            'configs/fashion_mnist_mcl.py? Shipped configs (configs/): '
        ],
        'absent',
    ),
    (
        'unknown config argument',
        [
            'mcl_jax.main',
            '--config',
            'configs/fashion_mnist_mcl.py:bogus=1',
            '--workdir',
            '{workdir}',
        ],
        ["--config configs/fashion_mnist_mcl.py:bogus=1: Unknown config argument 'bogus'"],
        'absent',
    ),
    (
        'lmcl with one peer',
        ['mcl_jax.main', '--config', 'configs/fashion_mnist_mcl.py:method=lmcl,peers=1']
        + ['--workdir', '{workdir}'],
        ['Invalid config:', 'lmcl', 'peers'],
        'absent',
    ),
    (
        'batch larger than the data',
        TRAIN + ['--config.batch_size=1024'],
        ['batch_size=1024 is larger than the 512 training examples'],
        'absent',
    ),
    (
        'changed config of a run with a checkpoint',
        TRAIN + ['--config.optim.lr=0.5'],
        ['  optim.lr: 0.1 (config.json) -> 0.5 (now)', '--allow_config_change'],
        'with_checkpoint',
    ),
    (
        'no workdir',
        ['mcl_jax.main', '--config', SMOKE],
        ['--config and --workdir are required'],
        None,
    ),
    (
        'unknown flag',
        TRAIN + ['--allow_config_chang'],
        ['Did you mean: allow_config_change'],
        'absent',
    ),
    ('report: no run', ['mcl_jax.report', '{workdir}'], ['{workdir} does not exist.'], 'absent'),
    (
        'report: no metrics',
        ['mcl_jax.report', '{workdir}'],
        ['{workdir} holds no metrics.jsonl'],
        'config_only',
    ),
    (
        'plot: no run',
        ['mcl_jax.plot', '{workdir}', '--out', '{workdir}/c.png'],
        ['{workdir} does not exist.'],
        'absent',
    ),
    (
        'plot: unknown panel',
        ['mcl_jax.plot', '{workdir}', '--panels', 'accuracy,bogus', '--out', '{workdir}/c.png'],
        ['--panels accuracy,bogus: unknown or empty; choose from accuracy, mean_accuracy, gap'],
        'with_checkpoint',
    ),
    (
        'evaluate: no run',
        ['mcl_jax.evaluate', '--workdir', '{workdir}'],
        ['{workdir} does not exist.'],
        'absent',
    ),
    (
        'evaluate: no checkpoint',
        ['mcl_jax.evaluate', '--workdir', '{workdir}'],
        ['{workdir} holds no checkpoint yet; train first'],
        'config_only',
    ),
    (
        'export: no run',
        ['mcl_jax.export', '--workdir', '{workdir}', '--peer', '0', '--out', '{workdir}/p.msgpack'],
        ['{workdir} does not exist.'],
        'absent',
    ),
    (
        'export: bad peer',
        [
            'mcl_jax.export',
            '--workdir',
            '{workdir}',
            '--peer',
            'one',
            '--out',
            '{workdir}/p.msgpack',
        ],
        ["--peer='one': must be a peer index (0, 1, ...) or `all`."],
        'config_only',
    ),
]


def _tree(path) -> dict:
  out = {}
  for root, dirs, files in os.walk(path):
    for name in files + dirs:
      full = os.path.join(root, name)
      digest = None if os.path.isdir(full) else hashlib.sha256(open(full, 'rb').read()).hexdigest()
      out[os.path.relpath(full, path)] = digest
  return out


def _started_run(workdir, checkpoint):
  """A run's config.json (the smoke config, as the CLI builds it) and an (empty) checkpoint."""
  os.makedirs(os.path.join(workdir, 'checkpoints', 'latest', '4') if checkpoint else workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cli.load_config(SMOKE).to_json(indent=2))


@pytest.mark.parametrize(
    'command,expected,workdir_kind', [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_mistake_is_one_clear_error_exit_2_and_nothing_written(
    tmp_path, command, expected, workdir_kind
):
  workdir = str(tmp_path / 'run')
  if workdir_kind in ('config_only', 'with_checkpoint'):
    _started_run(workdir, checkpoint=workdir_kind == 'with_checkpoint')
  before = _tree(workdir)
  proc = subprocess.run(
      [sys.executable, '-m'] + [a.format(workdir=workdir) for a in command],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  prog = command[0] if command[0] != 'mcl_jax.main' else 'mcl_jax'
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.startswith(f'{prog}: error: '), proc.stderr
  assert 'Traceback' not in proc.stderr and len(proc.stderr.splitlines()) <= 4, proc.stderr
  for part in expected:
    assert part.format(workdir=workdir) in proc.stderr, proc.stderr
  if workdir_kind == 'absent':
    assert not os.path.exists(workdir)
  assert _tree(workdir) == before
  assert not os.path.exists(os.path.join(REPO, 'c.png'))


def test_configs_are_found_from_any_directory_and_missing_ones_named(tmp_path):
  """`configs/<name>.py` resolves to the shipped configs outside the checkout (README: "Configs
  after pip install")."""
  os.chdir(tmp_path)
  try:
    config = cli.load_config('configs/fashion_mnist_mcl.py:smoke', {'total_steps': 3})
    assert config.total_steps == 3 and config.smoke
    with pytest.raises(ValueError, match=r'configs/nope.py not found. Shipped configs'):
      cli.load_config('configs/nope.py')
  finally:
    os.chdir(REPO)
