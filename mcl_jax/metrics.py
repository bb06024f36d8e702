"""Metrics: one JSON line per logged step (always), TensorBoard event files, a progress line."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

# Metrics that depend on wall-clock time; everything else is reproducible on resume.
TIMING_METRICS = ('train/img_per_s', 'train/eta_s')


class MetricWriter:
  """Writes `metrics.jsonl` and TensorBoard events under `workdir` (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    try:
      from tensorboardX import SummaryWriter  # optional at run time, a dependency of the package

      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
    except ImportError:  # pragma: no cover
      logging.warning('tensorboardX is not installed; writing metrics.jsonl only.')

  def _truncate_after(self, step: int) -> None:
    """On resume, drop lines logged after the restored checkpoint: they are re-logged identically.
    A new run starts an empty file, so a run stopped before its first log point still has one."""
    if not os.path.exists(self.path):
      open(self.path, 'a').close()
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _to_python(v) for k, v in sorted(scalars.items())}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for name, value in record.items():
        if name != 'step' and isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, global_step=step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Throughput and ETA between log points; ignores the compile time of the first step."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self._last_step, self._last_time = start_step, None

  def mark(self, step: int) -> None:
    """Restarts the clock at `step` (after compilation, eval or checkpointing)."""
    self._last_step, self._last_time = step, time.perf_counter()

  def update(self, step: int) -> dict:
    """img/s and ETA since the last mark/update (call after the step's results are fetched)."""
    now = time.perf_counter()
    out = {}
    if self._last_time is not None and step > self._last_step:
      sec_per_step = (now - self._last_time) / (step - self._last_step)
      out = {
          'train/img_per_s': self.batch_size / sec_per_step,
          'train/eta_s': sec_per_step * (self.total_steps - step),
      }
    self.mark(step)
    return out

  def line(self, step: int, scalars: dict) -> str:
    parts = [f'step {step}/{self.total_steps}']
    if 'train/loss' in scalars:
      parts.append(f"loss {scalars['train/loss']:.4f}")
    if 'train/img_per_s' in scalars:
      eta = scalars['train/eta_s']
      parts.append(f"{scalars['train/img_per_s']:.0f} img/s")
      parts.append(f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    for name in sorted(scalars):
      # (a method's further classifiers are in metrics.jsonl, only their best is shown here)
      if name.startswith('eval/') and name.endswith('/top1') and '/classifier/' not in name:
        parts.append(f'{name[5:]} {scalars[name]:.2%}')
    return ' | '.join(parts)
