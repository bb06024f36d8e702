"""README's Extending example (examples/extending.py), used as a user would: a method, a model
and a data set registered from outside the package are trained, resumed bit-exact, evaluated and
exported through the package's own commands, which import the plug-ins again from the run's
record."""

import importlib.util
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from mcl_jax import augment, evaluate, export, methods, models, train
from mcl_jax.metrics import TIMING_METRICS, read_metrics

from support import REPO

EXAMPLE = os.path.join(REPO, 'examples', 'extending.py')


def load_example():
  spec = importlib.util.spec_from_file_location('extending_example', EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The smoke config of the example: one uninterrupted run, one stopped after 5 steps and
  resumed by the same call again."""
  example = load_example()
  config = example.get_config('smoke')
  root = tmp_path_factory.mktemp('extending')
  whole, resumed = str(root / 'whole'), str(root / 'resumed')
  train.run(config, whole)
  train.run(config, resumed, stop_after_steps=5)
  train.run(example.get_config('smoke'), resumed)
  return config, whole, resumed


def test_plugins_are_registered_with_their_origin():
  load_example()
  assert methods.origin('mcl_l2').file == EXAMPLE
  assert models.origin('tiny_cnn').file == EXAMPLE
  assert 'l2_weight' in methods.config('mcl_l2') and 'alpha' in methods.config('mcl_l2')
  load_example()  # the same file again (as config_flags does): no "already registered" error


def test_the_user_method_trains_and_resumes_bit_exact(runs):
  config, whole, resumed = runs
  _, state_a = evaluate.restore(whole)
  _, state_b = evaluate.restore(resumed)
  assert int(state_a.step) == config.total_steps
  chex.assert_trees_all_equal(jax.device_get(state_a), jax.device_get(state_b))
  strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in rows]
  assert strip(read_metrics(whole)) == strip(read_metrics(resumed))
  last = [r for r in read_metrics(whole) if 'train/l2' in r][-1]
  assert last['train/l2'] > 0  # the user's term is computed and logged
  with open(os.path.join(whole, 'plugins.json')) as f:
    recorded = {(e['kind'], e['name']): e['file'] for e in json.load(f)}
  assert recorded == {
      ('method', 'mcl_l2'): EXAMPLE,
      ('model', 'tiny_cnn'): EXAMPLE,
      ('data', 'fashion4'): EXAMPLE,
  }


def test_evaluate_and_export_cli_import_the_plugins_again(runs, tmp_path):
  """A fresh process, outside the repository: the plug-ins come only from the run's record."""
  _, whole, _ = runs
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  evaluated = subprocess.run(
      [sys.executable, '-m', 'mcl_jax.evaluate', '--workdir', whole],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=env,
      timeout=300,
  )
  assert evaluated.returncode == 0, evaluated.stderr
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  last_eval = [r for r in read_metrics(whole) if 'eval/peer_0/top1' in r][-1]
  for key in ('eval/peer_0/top1', 'eval/peer_1/top1', 'eval/ensemble/top1'):
    assert result[key] == pytest.approx(last_eval[key], abs=1e-9)

  out = str(tmp_path / 'peer0.msgpack')
  exported = subprocess.run(
      [sys.executable, '-m', 'mcl_jax.export', '--workdir', whole, '--peer', '0', '--out', out],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=env,
      timeout=300,
  )
  assert exported.returncode == 0, exported.stderr
  # The exported peer alone (the user's model is registered by importing the example) gives the
  # same test accuracy as the run's evaluation.
  load_example()
  model, variables = export.load_peer(out)
  meta = export.load_metadata(out)
  exp, _ = evaluate.restore(whole)
  test = exp.test_data
  images = augment.normalize(test.images, meta['mean'], meta['std'])
  logits = model.apply(variables, images, train=False)['logits']
  top1 = float(np.mean(np.argmax(np.asarray(logits), -1) == test.labels))
  assert top1 == pytest.approx(last_eval['eval/peer_0/top1'], abs=1e-9)


def test_readme_extending_section_is_the_example():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  with open(EXAMPLE) as f:
    code = f.read()
  body = code[code.index('import flax') :]  # README shows the file from its imports on
  assert body.strip() in readme
