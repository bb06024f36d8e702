"""Orbax checkpoints: the latest N and the best, auto-resume, and refusal of foreign checkpoints.

Layout under `<workdir>/checkpoints/`: `latest/<step>/` (kept: `keep` newest) and `best/<step>/`
(kept: 1, by `eval/best_peer/top1`). Each step holds `state` (the TrainState pytree) and `meta`
(JSON: the run's identity and progress). The data position needs no saving: batches are a pure
function of (seed, step).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run; the message says why and what to do."""


def _manager(directory: str, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))


class Checkpointer:
  """Saves and restores TrainStates for one workdir.

  `identity` is a small JSON dict (architectures, number of peers, method, data set) that must match
  on restore: resuming a ResNet-32 x2 run with a WRN x4 config is refused with a clear error rather
  than silently starting over or mixing.
  """

  def __init__(self, workdir: str, identity: dict, keep: int = 2, async_save: bool = True):
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.identity = identity
    self.latest = _manager(os.path.join(root, 'latest'), keep, async_save)
    self.best = _manager(os.path.join(root, 'best'), 1, async_save)

  def save(self, state, meta: dict, *, best: bool = False) -> None:
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave({**meta, 'identity': self.identity}))
    if step not in self.latest.all_steps():
      self.latest.save(step, args=args)
    if best:
      self.best.save(step, args=args, force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """Newest restorable checkpoint as (state, meta), or None when the workdir has none.

    A checkpoint that fails to restore (killed mid-write, truncated or deleted files) is skipped
    with a warning naming it and the previous one is tried. If checkpoints exist but none can be
    restored, or they belong to a different run identity, raises CheckpointError: a workdir that
    holds a run is never silently trained over.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None
    problems = []
    for step in steps:
      try:
        meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f'step {step}: unreadable metadata ({type(e).__name__}: {e})')
        logging.warning('Skipping checkpoint at step %d: %s', step, problems[-1])
        continue
      self._check_identity(step, meta)
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f'step {step}: {type(e).__name__}: {e}')
        logging.warning('Skipping checkpoint at step %d (%s); trying an older one.', step, e)
        continue
      if problems:
        logging.warning('Resumed from step %d after skipping: %s', step, '; '.join(problems))
      return restored['state'], meta
    raise CheckpointError(
        f'None of the checkpoints in {self.latest.directory} (steps {steps}) can be restored:\n  '
        + '\n  '.join(problems) +
        '\nThe workdir holds a run, so it is not overwritten. Use a new --workdir, or move the '
        'checkpoints directory away to start over.')

  def _check_identity(self, step: int, meta: dict) -> None:
    saved = meta.get('identity', {})
    diffs = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
    if diffs:
      described = ', '.join(f'{k}: checkpoint has {a!r}, config asks for {b!r}'
                            for k, (a, b) in diffs.items())
      raise CheckpointError(
          f'The checkpoint at step {step} in {self.latest.directory} belongs to a different run '
          f'({described}). Use a new --workdir for this config, or rerun with the config that '
          f'wrote it.')

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()
