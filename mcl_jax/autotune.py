"""The cohort strategy of a run chosen by measurement (`cohort.strategy=autotune`), and the cached
decisions `auto` uses.

The candidates are the per-device strategies (`cohort.CANDIDATES`: vmap, unroll). A 'peer' mesh
axis is orthogonal to them: under `jax.shard_map` each device applies its local peers with the
chosen strategy, so the candidates are timed on the run's own mesh.

For a run whose `cohort.strategy` is `auto` or `autotune` the strategy comes from, in order:
1. `<workdir>/autotune.json` of the same run (same `tuning_key`): a resumed run keeps the strategy
   it started with, whatever the cache says now, so resume stays bit-exact;
2. the per-machine cache (`cache_path()`), keyed by `tuning_key` (backend, device kind, mesh,
   architectures, K, batch size, method, dtype, image shape, jax version, compile options);
3. `autotune` only: measurement. Every candidate's train step is compiled for the run's exact
   shapes, shardings and compile options (the very `jax.jit` objects the run then uses, so the
   winner is not compiled twice) and timed round robin on a scratch state initialised from the
   seed; the scratch state is then dropped, and the real state is created or restored afterwards,
   so tuning never advances or alters it. The fastest is kept, cached, and recorded with every
   timing in `<workdir>/autotune.json`;
4. the per-backend default (`cohort.AUTO_STRATEGY`).

All strategies give the same numbers to float32 round-off and the same checkpointed state (the
peers stay stacked), so a checkpoint resumes under any of them (tests/test_autotune.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax

from mcl_jax import cohort as cohort_lib, compile_cache

CACHE_ENV = 'MCL_JAX_AUTOTUNE_CACHE'  # a file path; empty: no cache
WORKDIR_NAME = 'autotune.json'
TIMED_ROUNDS = 3  # timed steps per candidate, after one compile + first step
SLOW_CUTOFF = 3.0  # a candidate this many times slower than the best is no longer timed


@dataclasses.dataclass
class Decision:
  """The strategy of a run and why: `source` is 'workdir', 'cache', 'measured' or 'default'."""

  strategy: str
  source: str
  key: dict
  timings: dict = dataclasses.field(default_factory=dict)
  reason: str = ''

  def as_json(self) -> dict:
    return dataclasses.asdict(self)


def cache_path() -> str | None:
  """$MCL_JAX_AUTOTUNE_CACHE (empty: no cache), else $XDG_CACHE_HOME/mcl_jax/autotune.json, else
  ~/.cache/mcl_jax/autotune.json."""
  return compile_cache.user_cache_path(CACHE_ENV, 'autotune.json')


def tuning_key(config, mesh, image_shape, compiler_options) -> dict:
  """What a decision depends on. CPU device kinds are all 'cpu': the CPU model and core count
  tell machines apart there."""
  device = mesh.devices.flat[0]
  key = {
      'backend': device.platform,
      'device_kind': device.device_kind,
      'mesh': {name: int(size) for name, size in mesh.shape.items()},
      'peer_shard_map': bool(config.mesh.get('peer_shard_map', True)),
      'archs': list(cohort_lib.peer_archs(config.model, config.cohort)),
      'num_peers': int(config.cohort.num_peers),
      'batch_size': int(config.batch_size),
      'method': config.method.name,
      'dtype': config.model.dtype,
      'image_shape': [int(d) for d in image_shape],
      'jax': jax.__version__,
      'compiler_options': dict(compiler_options or {}),
  }
  if device.platform == 'cpu':
    key['cpu'] = {'model': compile_cache.cpu_description()[0], 'cores': os.cpu_count()}
  return key


def _key_string(key: dict) -> str:
  return json.dumps(key, sort_keys=True)


def _read_json(path: str | None) -> dict:
  if not path or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return {}  # an unreadable cache or record is only a cache miss
  return value if isinstance(value, dict) else {}


def _write_json(path: str, value: dict) -> None:
  """Atomically (a concurrent reader sees the old or the new file, never half of one)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
  with os.fdopen(fd, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def lookup(key: dict, workdir: str | None) -> Decision | None:
  """The recorded decision for `key`: the workdir's own first, then the machine cache."""
  record = _read_json(os.path.join(workdir, WORKDIR_NAME) if workdir else None)
  if record.get('key') == key and record.get('strategy') in cohort_lib.CANDIDATES:
    return dataclasses.replace(Decision(**_fields(record)), source='workdir')
  entry = _read_json(cache_path()).get(_key_string(key))
  if entry and entry.get('strategy') in cohort_lib.CANDIDATES:
    return Decision(**{**_fields(entry), 'key': key, 'source': 'cache'})
  return None


def _fields(record: dict) -> dict:
  names = {f.name for f in dataclasses.fields(Decision)}
  return {k: v for k, v in record.items() if k in names}


def store(decision: Decision) -> None:
  """Adds a measured decision to the machine cache (process 0; a cache that cannot be written is
  skipped: the next run measures again)."""
  path = cache_path()
  if not path or jax.process_index() != 0:
    return
  cache = _read_json(path)
  cache[_key_string(decision.key)] = {
      **decision.as_json(),
      'source': 'measured',
      'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
  }
  try:
    _write_json(path, cache)
  except OSError as e:
    print(f'mcl_jax: could not write the autotune cache {path} ({e}); not cached.', flush=True)


def record(workdir: str, decision: Decision | None) -> None:
  """Writes `<workdir>/autotune.json` (process 0), unless it is the workdir's own record."""
  if decision is None or decision.source == 'workdir' or jax.process_index() != 0:
    return
  _write_json(
      os.path.join(workdir, WORKDIR_NAME),
      {**decision.as_json(), 'time': time.strftime('%Y-%m-%dT%H:%M:%S')},
  )


def measure(steps: dict[str, Callable], make_state: Callable[[], Any], batch, frozen) -> dict:
  """Times each jitted `step(state, batch, frozen) -> (state, metrics)` of `steps`: one call
  (compile + first step), then `TIMED_ROUNDS` rounds of one synchronised step of every candidate
  still in the race, in turn (so drifts of a shared machine hit them alike). One scratch state
  from `make_state()` is threaded through all the calls (every candidate takes and returns the
  same pytree in the same shardings; the steps donate it) and dropped at the end.
  Returns {strategy: {'first_call_s', 'step_ms', 'step_ms_median', 'dropped'}}."""
  state = make_state()
  timings = {}
  for name, step in steps.items():
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready((state, metrics))
    timings[name] = {'first_call_s': round(time.perf_counter() - t0, 2), 'step_ms': []}
  racing = list(steps)
  for _ in range(TIMED_ROUNDS):
    for name in racing:
      t0 = time.perf_counter()
      state, metrics = steps[name](state, batch, frozen)
      jax.block_until_ready((state, metrics))
      timings[name]['step_ms'].append(round((time.perf_counter() - t0) * 1e3, 2))
    best = min(statistics.median(timings[n]['step_ms']) for n in racing)
    racing = [n for n in racing if min(timings[n]['step_ms']) <= SLOW_CUTOFF * best]
  del state
  for name, t in timings.items():
    t['step_ms_median'] = round(statistics.median(t['step_ms']), 2)
    t['dropped'] = name not in racing
  return timings


def explain(timings: dict) -> tuple[str, str]:
  """(the fastest strategy, a one-line reason with the ratios)."""
  ranked = sorted(timings, key=lambda n: timings[n]['step_ms_median'])
  best = ranked[0]
  base = timings[best]['step_ms_median']
  others = ', '.join(
      f'{n} {timings[n]["step_ms_median"]:.1f} ms ({timings[n]["step_ms_median"] / base:.2f}x)'
      for n in ranked[1:]
  )
  rounds = len(timings[best]['step_ms'])
  return best, f'{best}: {base:.1f} ms/step (median of {rounds}) vs {others}'


def _agree(index: int) -> int:
  """Process 0's value on every process (a multi-host run must compile the same program
  everywhere, whatever each host's cache holds)."""
  if jax.process_count() == 1:
    return index
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return int(multihost_utils.broadcast_one_to_all(index))


def choose(
    config,
    *,
    key: dict,
    workdir: str | None,
    build_step: Callable[[str], Callable],
    make_state: Callable[[], Any],
    batch: Callable[[], Any],
    frozen=None,
) -> tuple[Decision | None, dict]:
  """The strategy of a run (see the module docstring). Returns (decision, {strategy: jitted
  step already compiled by the measurement}); (None, {}) for an explicit `vmap` / `unroll`.

  build_step(strategy): the run's jitted train step with that cohort strategy; make_state(): a
  fresh (scratch) state in the run's shardings; batch(): a batch of the run's shapes."""
  strategy = config.cohort.strategy
  if strategy not in ('auto', 'autotune'):
    return None, {}
  candidates = cohort_lib.CANDIDATES
  found = lookup(key, workdir)
  # Multi-host: every process follows process 0 (-1: process 0 has no recorded decision).
  index = _agree(candidates.index(found.strategy) if found else -1)
  if index >= 0:
    if found is None or found.strategy != candidates[index]:
      found = Decision(candidates[index], 'process 0', key)
    return found, {}
  if strategy == 'auto':
    default = cohort_lib.resolve_strategy('auto', key['backend'])
    return Decision(default, 'default', key, reason='per-backend default (no cached decision)'), {}
  steps = {name: build_step(name) for name in candidates}
  print(f'mcl_jax: autotune: timing the cohort strategies {", ".join(candidates)}', flush=True)
  timings = measure(steps, make_state, batch(), frozen)
  best, reason = explain(timings)
  best = candidates[_agree(candidates.index(best))]
  decision = Decision(best, 'measured', key, timings, reason)
  store(decision)
  print(f'mcl_jax: autotune: {reason}', flush=True)
  return decision, {best: steps[best]}
