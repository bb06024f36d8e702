import os

import pytest

from support import tiny_config

# No test reads or writes the machine's autotune cache (~/.cache/mcl_jax/autotune.json): `auto`
# would take a decision cached there. tests/test_autotune.py points it at its own files.
# Subprocesses inherit this.
os.environ['MCL_JAX_AUTOTUNE_CACHE'] = ''
# Nor its compilation cache (~/.cache/mcl_jax/xla): every test compiles its programs, and no
# test sees another's half-written entry. tests/test_compile_cache.py points it at its own.
os.environ['MCL_JAX_COMPILATION_CACHE'] = ''


@pytest.fixture
def make_config():
  return tiny_config
