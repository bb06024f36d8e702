"""Host malloc settings for XLA:CPU, applied once when mcl_jax is imported (glibc, CPU runs only).

Every execution of a jitted step allocates its temporary buffers afresh (one arena of a few
hundred MB per step, from the runtime's threads) and Eigen's convolutions allocate their packing
buffers (up to ~75 MB each for the ResNet weight gradients at batch 128) on every call. glibc
serves such requests by `mmap` (always above 32 MB, and always in a thread's arena above 64 MB)
and returns them by `munmap`, so every page of them is faulted in and zeroed again on every step:
~70k page faults per ResNet-32 step, 17% of the CPU time in the kernel
(docs/performance.md#host-memory-on-cpu). With one malloc arena, no `mmap` and no trimming, the
heap keeps the pages once the first step has touched them: the same programs, bit for bit, 20-30%
faster on this 2-core CPU.

`configure()` sets, through `mallopt`: `M_ARENA_MAX=1` (threads created from now on share the
main arena, which can serve any size), `M_MMAP_MAX=0`, `M_TRIM_THRESHOLD` at its maximum. The
cost: the process keeps its peak heap until it exits, and malloc-heavy host threads share one
arena. So it is applied only where XLA:CPU computes (no accelerator plug-in installed, or
`JAX_PLATFORMS` starting with `cpu`), only with glibc, and before jax starts its runtime threads
for it to take full effect (mcl_jax/__init__.py calls it on import); `MCL_JAX_HOST_MALLOC=0`
turns it off. (Setting `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before Python starts gives about the
same gain by other means, transparent huge pages.)
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

ENV = 'MCL_JAX_HOST_MALLOC'  # '0': leave malloc as it is
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

applied: bool | None = None  # None: not tried yet


def accelerator_expected() -> bool:
  """Whether jax will compute on an accelerator: JAX_PLATFORMS names one first, or (unset) a PJRT
  plug-in or libtpu is installed. Decided without starting jax's backends."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() != 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return True
  try:
    return bool(importlib.metadata.entry_points(group='jax_plugins'))
  except Exception:  # pylint: disable=broad-except  # a broken distribution's metadata
    return False


def configure() -> bool:
  """Applies `SETTINGS` once (see the module docstring); returns whether they are in effect."""
  global applied
  if applied is not None:
    return applied
  applied = False
  if os.environ.get(ENV, '1') == '0' or not sys.platform.startswith('linux'):
    return applied
  if platform.libc_ver()[0] != 'glibc' or accelerator_expected():
    return applied
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return applied
  applied = all(mallopt(option, value) == 1 for option, value in SETTINGS)
  return applied
