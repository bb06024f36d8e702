"""The persistent compilation cache of the commands (mcl_jax.compile_cache)."""

import json
import os
import subprocess
import sys

from mcl_jax import compile_cache
from support import REPO

# A program that takes a while to compile, then the cache hits JAX counted (jax.monitoring).
PROGRAM = r"""
import json, sys
import jax, jax.numpy as jnp
from mcl_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith('cache_hits') else None)
path = compile_cache.enable()
def f(x):
  for i in range(200):
    x = jnp.tanh(x @ x) + i
  return x
jax.block_until_ready(jax.jit(f)(jnp.ones((32, 32))))
print(json.dumps({'dir': path, 'hits': len(hits)}))
"""


def _run(env_value):
  env = {**os.environ, compile_cache.CACHE_ENV: env_value}
  proc = subprocess.run(
      [sys.executable, '-c', PROGRAM],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_program_from_the_cache(tmp_path, monkeypatch):
  root = str(tmp_path / 'xla')
  first = _run(root)
  monkeypatch.setenv(compile_cache.CACHE_ENV, root)
  assert first['dir'] == compile_cache.cache_dir()
  assert os.path.dirname(first['dir']) == root and os.path.basename(first['dir']).startswith('cpu-')
  assert first['hits'] == 0 and os.listdir(first['dir'])  # compiled, then stored
  assert _run(root)['hits'] == 1  # loaded
  off = _run('')
  assert off == {'dir': None, 'hits': 0}


def test_cache_location(tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.CACHE_ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.cache_root() == str(tmp_path / 'mcl_jax' / 'xla')
  monkeypatch.setenv(compile_cache.CACHE_ENV, '')
  assert compile_cache.cache_root() is None and compile_cache.cache_dir() is None
  model, flags = compile_cache.cpu_description()
  assert isinstance(model, str) and isinstance(flags, str)
