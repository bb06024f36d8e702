"""The persistent XLA compilation cache of every command: a rerun or a resumed run loads its
compiled programs from disk instead of compiling them again.

Compiling is not free: the L-MCL meta round of ResNet-32 x 2 takes 1.5 min to compile on a
2-core CPU, the train steps 6-20 s; every restart of a preempted run would pay it again. JAX keys
each entry by the program, the compile options, the backend and jax/jaxlib versions; the directory
is further split by host CPU (model name and instruction-set flags) so that a cache on a shared
home directory never hands a program built for one CPU to another. Only programs that took at
least `MIN_COMPILE_SECONDS` to compile are stored. A damaged entry costs a recompile (JAX warns
and compiles), never a wrong program.

Where: $MCL_JAX_COMPILATION_CACHE (a directory; empty: no cache), else
$XDG_CACHE_HOME/mcl_jax/xla, else ~/.cache/mcl_jax/xla.
"""

from __future__ import annotations

import hashlib
import os

CACHE_ENV = 'MCL_JAX_COMPILATION_CACHE'
MIN_COMPILE_SECONDS = 1.0


def cpu_description() -> tuple[str, str]:
  """(model name, instruction-set flags) of the host CPU from /proc/cpuinfo ('' where unknown)."""
  model = flags = ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key == 'model name' and not model:
          model = value.strip()
        elif key in ('flags', 'Features') and not flags:
          flags = ' '.join(sorted(value.split()))
        if model and flags:
          break
  except OSError:
    pass
  return model, flags


def user_cache_path(env_var: str, name: str) -> str | None:
  """`$env_var` when set (empty: None, i.e. switched off), else `$XDG_CACHE_HOME/mcl_jax/name`,
  else `~/.cache/mcl_jax/name`. Shared by every per-machine cache of the library."""
  path = os.environ.get(env_var)
  if path is not None:
    return path or None
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'mcl_jax', name)


def cache_root() -> str | None:
  """The cache's base directory (before the per-CPU split); None when switched off."""
  return user_cache_path(CACHE_ENV, 'xla')


def cache_dir() -> str | None:
  """`cache_root()/<host CPU hash>`, or None when the cache is off."""
  root = cache_root()
  if root is None:
    return None
  host = hashlib.sha256('\n'.join(cpu_description()).encode()).hexdigest()[:16]
  return os.path.join(root, f'cpu-{host}')


def enable() -> str | None:
  """Points JAX's persistent compilation cache at `cache_dir()` (before the first compile);
  returns the directory, or None when the cache is off or the directory cannot be created (then
  every program is compiled, as without a cache)."""
  import jax  # pylint: disable=g-import-not-at-top

  path = cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return path
