"""`cohort.strategy=autotune` and `auto`'s cache (mcl_jax/autotune.py): the decision is measured,
recorded and reused; tuning never touches the run's state; the strategies are interchangeable
(the same step to float32 round-off, a checkpoint resumes under another strategy); on 8 fake CPU
devices (a subprocess) the decision is recorded and is one of the candidates."""

import json
import os
import subprocess
import sys

import chex
import jax
import pytest

from mcl_jax import autotune, cohort as cohort_lib, train

from support import REPO, max_relative_difference, tiny_config
from test_train import restore_final_state

HELPER = os.path.join(REPO, 'tests', 'support', 'autotune_devices.py')


@pytest.fixture
def cache(tmp_path, monkeypatch):
  path = str(tmp_path / 'cache' / 'autotune.json')
  monkeypatch.setenv(autotune.CACHE_ENV, path)
  return path


def test_cache_path_and_lookup_order(tmp_path, monkeypatch):
  monkeypatch.setenv(autotune.CACHE_ENV, '')
  assert autotune.cache_path() is None  # empty: no cache
  monkeypatch.delenv(autotune.CACHE_ENV)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert autotune.cache_path() == str(tmp_path / 'xdg' / 'mcl_jax' / 'autotune.json')
  path = str(tmp_path / 'c.json')
  monkeypatch.setenv(autotune.CACHE_ENV, path)

  key = {'backend': 'cpu', 'batch_size': 16}
  assert autotune.lookup(key, None) is None
  autotune.store(autotune.Decision('vmap', 'measured', key, {'vmap': {}}, 'why'))
  found = autotune.lookup(key, None)
  assert (found.strategy, found.source, found.reason) == ('vmap', 'cache', 'why')
  assert autotune.lookup({**key, 'batch_size': 32}, None) is None  # another setup: a miss
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  autotune.record(workdir, autotune.Decision('unroll', 'default', key))
  assert autotune.lookup(key, workdir).strategy == 'unroll'  # the run's own record first
  assert autotune.lookup(key, workdir).source == 'workdir'
  with open(path, 'w') as f:
    f.write('{not json')
  assert autotune.lookup(key, None) is None  # a damaged cache is a miss, not an error


def test_auto_without_a_cached_decision_is_the_backend_default(cache):
  exp = train.Experiment(tiny_config(**{'cohort.strategy': 'auto'}))
  assert exp.tuning.source == 'default'
  assert exp.cohort.strategy == cohort_lib.AUTO_STRATEGY.get(jax.default_backend(), 'vmap')
  assert not os.path.exists(cache)  # nothing measured, nothing cached
  explicit = train.Experiment(tiny_config(**{'cohort.strategy': 'vmap'}))
  assert explicit.tuning is None and explicit.cohort.strategy == 'vmap'


def test_autotune_measures_records_and_never_touches_the_state(tmp_path, cache, monkeypatch):
  config = tiny_config(**{'cohort.strategy': 'autotune', 'method.name': 'mcl'})
  tuned = str(tmp_path / 'tuned')
  train.run(config, tuned, stop_after_steps=4)  # as if preempted half way
  with open(os.path.join(tuned, autotune.WORKDIR_NAME)) as f:
    record = json.load(f)
  chosen = record['strategy']
  assert record['source'] == 'measured' and chosen in cohort_lib.CANDIDATES
  assert set(record['timings']) == set(cohort_lib.CANDIDATES)
  for timing in record['timings'].values():
    assert timing['step_ms'] and timing['step_ms_median'] > 0 and timing['first_call_s'] > 0
  assert record['reason'].startswith(f'{chosen}: ')
  assert record['key']['batch_size'] == 16 and record['key']['archs'] == ['resnet8'] * 2
  with open(cache) as f:
    assert [entry['strategy'] for entry in json.load(f).values()] == [chosen]

  # The cache now says the other strategy: `auto` follows the cache, but the resumed run keeps its
  # own recorded strategy and ends bit for bit where a run of that strategy alone ends.
  other = next(s for s in cohort_lib.CANDIDATES if s != chosen)
  with open(cache) as f:
    entries = json.load(f)
  for entry in entries.values():
    entry['strategy'] = other
  with open(cache, 'w') as f:
    json.dump(entries, f)
  auto = train.Experiment(tiny_config(**{'cohort.strategy': 'auto', 'method.name': 'mcl'}))
  assert (auto.cohort.strategy, auto.tuning.source) == (other, 'cache')

  monkeypatch.setattr(autotune, 'measure', lambda *a, **k: pytest.fail('measured again'))
  train.run(config, tuned)
  explicit = str(tmp_path / 'explicit')
  train.run(tiny_config(**{'cohort.strategy': chosen, 'method.name': 'mcl'}), explicit)
  step_a, state_a = restore_final_state(tuned)
  step_b, state_b = restore_final_state(explicit)
  assert step_a == step_b == config.total_steps
  chex.assert_trees_all_equal(state_a, state_b)
  assert not os.path.exists(os.path.join(explicit, autotune.WORKDIR_NAME))  # explicit: no record


def test_strategies_take_the_same_step():
  """From the same state, one train step under vmap and under unroll: the same new state and
  metrics to float32 round-off (1e-5 of each leaf's scale; measured ~2e-6)."""
  exps = {
      s: train.Experiment(tiny_config(**{'cohort.strategy': s, 'method.name': 'mcl'}))
      for s in cohort_lib.CANDIDATES
  }
  state = jax.device_get(exps['unroll'].init_state())
  out = {}
  for s, exp in exps.items():
    new_state, metrics = exp.train_step(
        jax.device_put(state, exp.state_sharding), exp.batch(0), exp.frozen
    )
    out[s] = jax.device_get((new_state, metrics))
  assert max_relative_difference(out['vmap'], out['unroll']) < 1e-5


def test_a_checkpoint_resumes_under_another_strategy(tmp_path):
  # lax's convolutions (cpu_kernels=False): this compares two float32 programs over 6 steps, and
  # in this tiny run a difference of round-off crosses a ReLU kink within a few steps, after which
  # the runs part (vmap vs unroll from one state, 4 steps: 3e-3 with lax's convolutions, 1e-2
  # after 2 steps with the kernels, which are themselves compared with lax in test_kernels.py).
  straight, switched = str(tmp_path / 'straight'), str(tmp_path / 'switched')
  config = tiny_config(**{'cohort.strategy': 'unroll', 'total_steps': 6, 'cpu_kernels': False})
  train.run(config, straight)
  train.run(config, switched, stop_after_steps=3)
  train.run(
      tiny_config(**{'cohort.strategy': 'vmap', 'total_steps': 6, 'cpu_kernels': False}),
      switched,
      allow_config_change=True,  # cohort.strategy is part of the recorded config
  )
  step_a, state_a = restore_final_state(straight)
  step_b, state_b = restore_final_state(switched)
  assert step_a == step_b == 6
  # 3 steps on from the switch, two float32 programs: round-off grows a little through the steps.
  assert max_relative_difference(state_b, state_a) < 1e-4


def test_autotune_on_8_fake_devices(tmp_path):
  """A 4 x 2 ('data', 'peer') mesh of fake CPU devices, K = 4 under shard_map over 'peer' (two
  local peers per device): the decision is recorded in the workdir and the cache and is one of
  the candidates; `auto` then takes it from the cache."""
  out = str(tmp_path / 'result.json')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env[autotune.CACHE_ENV] = str(tmp_path / 'cache.json')
  proc = subprocess.run(
      [sys.executable, HELPER, str(tmp_path / 'run'), out],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=1200,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out) as f:
    result = json.load(f)
  record = result['record']
  assert result['devices'] == 8
  assert record['source'] == 'measured' and record['strategy'] in cohort_lib.CANDIDATES
  assert record['key']['mesh'] == {'data': 4, 'peer': 2} and record['key']['num_peers'] == 4
  assert set(record['timings']) == set(cohort_lib.CANDIDATES)
  assert result['cached'] == [record['strategy']]
  assert result['auto'] == [record['strategy'], 'cache']
  assert result['steps_done'] == 2
