"""`python -m mcl_jax.main` re-executes itself with huge-page malloc on CPU-only Linux hosts only."""

import os
import subprocess
import sys

from mcl_jax import host_malloc

from support import REPO


def env_for(environ, platform='linux', accelerator=False):
  return host_malloc.reexec_environment(environ, platform, lambda: accelerator)


def test_cpu_only_linux_gets_huge_pages_and_keeps_the_rest():
  env = env_for({'PATH': '/bin'})
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': host_malloc.TUNABLES}
  assert (
      env_for({'JAX_PLATFORMS': 'cpu'}, accelerator=True)['GLIBC_TUNABLES']
      == 'glibc.malloc.hugetlb=1'
  )


def test_left_alone_elsewhere():
  assert env_for({}, accelerator=True) is None  # a GPU/TPU plugin is installed
  assert env_for({'JAX_PLATFORMS': 'cuda'}) is None
  assert env_for({'JAX_PLATFORMS': 'cpu,tpu'}) is None
  assert env_for({}, platform='darwin') is None
  assert env_for({'GLIBC_TUNABLES': ''}) is None  # the user's setting (empty: opt out) wins
  assert env_for({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}) is None


def test_main_runs_reexecuted_with_the_same_command_line():
  """Through the real entry point: the re-executed process sees the setting and the same argv
  (a bad command line still ends in one line and status 2, printed once)."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['JAX_PLATFORMS'] = 'cpu'
  probe = (
      'import os, runpy, sys; print("TUNABLES", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:]);'
      'sys.stdout.flush(); runpy.run_module("mcl_jax.main", run_name="__main__")'
  )
  out = subprocess.run(
      [sys.executable, '-c', probe, '--no_such_flag'],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=120,
  )
  assert out.returncode == 2, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith('TUNABLES')]
  # First run without the setting, then the same command line once more with it.
  assert lines == [
      "TUNABLES None ['--no_such_flag']",
      "TUNABLES glibc.malloc.hugetlb=1 ['--no_such_flag']",
  ]
  assert out.stderr.count('mcl_jax: error:') == 1
