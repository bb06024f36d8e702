"""Two local processes (jax.distributed over localhost, 4 fake CPU devices each, one (4 data x 2
peer) mesh spanning both) train memory-bank MCL for a few steps, stop, and resume.

Deselect with `-m "not multihost"`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mcl_jax.metrics import read_metrics

from support import REPO

WORKER = os.path.join(REPO, 'tests', 'support', 'multihost_worker.py')
pytestmark = pytest.mark.multihost


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two_processes(workdir: str, stop_after: int) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  port = str(_free_port())
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, str(i), '2', port, workdir, str(stop_after)],
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          env=env,
          cwd=REPO,
      )
      for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=420)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  results = []
  for out in outputs:
    lines = [l for l in out.splitlines() if l.startswith('RESULT ')]
    assert lines, out[-4000:]
    results.append(json.loads(lines[-1][len('RESULT ') :]))
  return sorted(results, key=lambda r: r['process_index']), outputs


def test_two_processes_train_and_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  first, _ = _run_two_processes(workdir, stop_after=2)
  for r in first:
    assert r['resumed_from'] == 0
    assert (r['process_count'], r['devices'], r['local_devices']) == (2, 8, 4)
    assert r['mesh'] == {'data': 4, 'peer': 2}
    assert r['step'] == 2
    # Memory bank [K=2, N=128, D=16] split over peer (2) and data (4): 1 x 32 slots per device.
    assert r['memory_spec'] == str(P('peer', 'data'))
    assert r['memory_local_shape'] == [1, 32, 16]
  # Each process feeds only its own half of the global batch of 16.
  assert first[0]['batch_rows'] == list(range(8)) and first[1]['batch_rows'] == list(range(8, 16))
  # Both processes see the same (global) state.
  assert first[0]['params'] == first[1]['params'] and first[0]['memory'] == first[1]['memory']

  second, _ = _run_two_processes(workdir, stop_after=100)
  for r in second:
    assert (r['resumed_from'], r['step']) == (2, 4)
  assert second[0]['params'] == second[1]['params']
  assert second[0]['params'] != first[0]['params'] and np.isfinite(second[0]['params'])

  # Metrics are written once (process 0), one line per logged step, across the resume.
  records = read_metrics(workdir)
  steps = [r['step'] for r in records if 'train/loss' in r]
  assert steps == [1, 2, 3, 4], records
  assert any('eval/best_peer/top1' in r for r in records)


def test_a_held_workdir_stops_every_process_without_a_hang(tmp_path):
  """Process 0 checks the lock and tells process 1 (mcl_jax.workdir.hold): both stop, at once."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  lock = workdir / 'trainer.lock'
  lock.write_text(json.dumps({'host': 'elsewhere', 'pid': 7, 'started': 'earlier'}))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  port = str(_free_port())
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, str(i), '2', port, str(workdir), '100'],
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          env=env,
          cwd=REPO,
      )
      for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode != 0 for p in procs), outputs
  assert 'WorkdirError: --workdir' in outputs[0] and 'in use by pid 7 on host elsewhere' in (
      outputs[0]
  )
  assert 'WorkdirError: Process 0 could not take the lock' in outputs[1], outputs[1][-3000:]
  assert os.listdir(workdir) == ['trainer.lock']
