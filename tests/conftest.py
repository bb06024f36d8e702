import atexit
import os
import shutil
import tempfile

import pytest

# Faster compiles of the tests' many small programs, in this process and in every subprocess a
# test starts: LLVM at -O1 without its expensive passes (XLA's HLO passes and fusion decisions are
# unchanged, only the machine code is less optimised): docs/performance.md#compile-time has the
# measured saving. The CI smoke run and every command keep XLA's defaults. Not -O0: with it one
# data-sharded DML step differed from the 1-device run by 8e-3 (float32,
# benchmarks/results/sharding.md). A caller's own optimisation level in XLA_FLAGS is kept.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

from support import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# No test reads or writes the machine's autotune cache (~/.cache/mcl_jax/autotune.json): `auto`
# would take a decision cached there. tests/test_autotune.py points it at its own files.
# Subprocesses inherit this.
os.environ['MCL_JAX_AUTOTUNE_CACHE'] = ''
# Nor its compilation cache (~/.cache/mcl_jax/xla): each test process (an xdist worker) has a
# fresh one of its own, removed at exit, that its subprocesses share (a resumed run, the CLI run
# twice, the same tiny config in many tests compile the same programs). A cached program is the
# same executable, so no result depends on the cache; one per worker so that two workers never
# write one directory at once (two processes of one test still may: JAX then at worst warns and
# compiles). tests/test_compile_cache.py points it at its own.
_CACHE = tempfile.mkdtemp(prefix='mcl_jax_test_xla_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ['MCL_JAX_COMPILATION_CACHE'] = _CACHE
# Nor its kernel builds (~/.cache/mcl_jax/kernels, mcl_jax.kernels): the same directory.
os.environ['MCL_JAX_KERNEL_CACHE'] = _CACHE
from mcl_jax import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

compile_cache.enable()  # the in-process tests too


@pytest.fixture
def make_config():
  return tiny_config
