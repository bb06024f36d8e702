"""Transparent huge pages for host allocations on CPU-only runs, set before anything is imported.

XLA:CPU allocates a step's large buffers afresh on every step; without huge pages each step
faults every page in again, ~30% of a CPU train step (docs/performance.md#host-memory-on-cpu).
glibc reads its tunables only when a process starts, so `python -m mcl_jax.main` (and
`mcl_jax.linear_eval`) re-executes itself once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` when:
- it runs on Linux,
- `GLIBC_TUNABLES` is not already in the environment (any value, even empty, is respected: set
  `GLIBC_TUNABLES=` to opt out; `launch/local.sh` sets it itself),
- and JAX can only run on the CPU: `JAX_PLATFORMS` is unset and no accelerator plugin is installed,
  or `JAX_PLATFORMS` names only `cpu`. GPU/TPU hosts are left untouched.
Same program, same numbers: only the host memory's page size changes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Callable, Mapping

TUNABLES = 'glibc.malloc.hugetlb=1'


def accelerator_plugin_installed() -> bool:
  """Whether a JAX accelerator plugin (CUDA, ROCm, TPU, ...) is installed, without importing jax."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  # namespace package of the plugins
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def reexec_environment(
    environ: Mapping[str, str],
    platform: str = sys.platform,
    has_accelerator: Callable[[], bool] = accelerator_plugin_installed,
) -> dict[str, str] | None:
  """The environment to re-execute with, or None to run as is (see the module docstring)."""
  if not platform.startswith('linux') or 'GLIBC_TUNABLES' in environ:
    return None
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms and platforms != ['cpu']:
    return None
  if not platforms and has_accelerator():
    return None
  return {**environ, 'GLIBC_TUNABLES': TUNABLES}


def reexec_if_cpu_only() -> None:
  """Replaces this process by the same command line with huge-page malloc, when it applies."""
  env = reexec_environment(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
