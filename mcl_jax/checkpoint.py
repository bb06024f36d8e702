"""Orbax checkpoints: the latest N and the best, auto-resume, and refusal of foreign checkpoints.

Layout under `<workdir>/checkpoints/`: `latest/<step>/` (kept: `keep` newest) and `best/<step>/`
(kept: 1, by `eval/best_peer/top1`). Each step holds `state` (the TrainState pytree) and `meta`
(JSON: the run's identity, progress and a checksum per state leaf). The data position needs no
saving: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run; the message says why and what to do."""


class UnrestorableCheckpoint(CheckpointError):
  """One checkpoint is damaged (killed mid-write, truncated, deleted or corrupted files)."""


def checksums(state) -> dict[str, int]:
  """{leaf path: uint32 checksum of its bits}, computed on device.

  Stored in each checkpoint's meta and compared after restore: a byte flipped inside a compressed
  array file restores without any error from Orbax, as garbage values.
  """
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state))
  sums = jax.device_get(_leaf_checksums(list(leaves)))
  return {jax.tree_util.keystr(path): int(s) for path, s in zip(paths, sums)}


@jax.jit
def _leaf_checksums(leaves):
  return [_checksum(leaf) for leaf in leaves]


def _checksum(x):
  """Sum of the bits of every element times an odd weight (mod 2**32): any changed element shows."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint8)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))
  weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
  return jnp.sum(bits.ravel().astype(jnp.uint32) * weights, dtype=jnp.uint32)


def _short(e: Exception) -> str:
  """`Type: first line` of an error (TensorStore errors run to pages)."""
  return f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'


def _manager(directory: str, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      # The latest and best managers save concurrently (async, often the same step). Multi-host,
      # each manager's barriers need their own names: with orbax's default (no prefix) the two
      # managers' "set_value_start" barriers collide ("Barrier ... is already ongoing").
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=f'mcl_jax_{os.path.basename(directory)}'
      ),
  )
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
    meta = {**meta, 'identity': self.identity, 'checksums': checksums(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if step not in self.latest.all_steps():
      self.latest.save(step, args=args)
    if best:
      self.best.save(step, args=args, force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """Newest restorable checkpoint as (state, meta), or None when the workdir has none.

    A checkpoint that fails to restore (killed mid-write, truncated, deleted or corrupted files) is
    skipped with a warning naming it and the previous one is tried; once one restores, the skipped
    ones are moved to `checkpoints/unrestorable/` so that training can save those steps again. If
    checkpoints exist but none can be restored, or they belong to a different run identity, raises
    CheckpointError: a workdir that holds a run is never silently trained over.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None
    problems = []
    for step in steps:
      try:
        restored = self._restore(self.latest, step, abstract_state)
      except UnrestorableCheckpoint as e:
        problems.append(str(e))
        logging.warning('Skipping checkpoint: %s; trying an older one.', e)
        continue
      if problems:
        logging.warning('Resumed from step %d after skipping: %s', step, '; '.join(problems))
        self._set_aside([s for s in steps if s > step])
      return restored
    raise CheckpointError(
        f'None of the checkpoints in {self.latest.directory} (steps {steps}) can be restored:\n  '
        + '\n  '.join(problems)
        + '\nThe workdir holds a run, so it is not overwritten. Use a new --workdir, or move the '
        'checkpoints directory away to start over.'
    )

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """The checkpoint of `step` (latest series, else best) as (state, meta); CheckpointError if
    there is none or it cannot be restored."""
    for manager in (self.latest, self.best):
      if step in manager.all_steps():
        return self._restore(manager, step, abstract_state)
    available = sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))
    root = os.path.dirname(self.latest.directory)
    raise CheckpointError(f'No checkpoint of step {step} in {root}; saved steps: {available}.')

  def _set_aside(self, steps) -> None:
    """Moves the unrestorable `steps` of the latest series to `checkpoints/unrestorable/`."""
    aside = os.path.join(os.path.dirname(self.latest.directory), 'unrestorable')
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
        os.rename(os.path.join(self.latest.directory, str(step)), target)
        logging.warning('Moved the unrestorable checkpoint of step %d to %s.', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('mcl_jax checkpoints set aside')
    self.latest.reload()

  def _restore(self, manager, step: int, abstract_state) -> tuple[Any, dict]:
    """(state, meta) of one checkpoint; UnrestorableCheckpoint naming the step and the damage."""
    where = f'step {step} in {manager.directory}'
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise UnrestorableCheckpoint(f'{where}: unreadable metadata ({_short(e)})') from e
    self._check_identity(step, meta)
    try:
      state = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )['state']
    except Exception as e:  # pylint: disable=broad-except
      raise UnrestorableCheckpoint(f'{where}: unreadable state ({_short(e)})') from e
    expected = meta.get('checksums')
    if expected is not None:
      bad = [path for path, value in checksums(state).items() if expected.get(path) != value]
      if bad:
        raise UnrestorableCheckpoint(
            f'{where}: corrupted data, checksum mismatch in {len(bad)} '
            f'arrays ({", ".join(bad[:3])}{", ..." * (len(bad) > 3)})'
        )
    return state, meta

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True at the step all hosts agreed to stop at after a preemption notice (JAX's
    preemption sync service, which handles SIGTERM there). Always False on a single host."""
    return self.latest.reached_preemption(step)

  def _check_identity(self, step: int, meta: dict) -> None:
    saved = meta.get('identity', {})
    diffs = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
    if diffs:
      described = ', '.join(
          f'{k}: checkpoint has {a!r}, config asks for {b!r}' for k, (a, b) in diffs.items()
      )
      raise CheckpointError(
          f'The checkpoint at step {step} in {self.latest.directory} belongs to a different run '
          f'({described}). Use a new --workdir for this config, or rerun with the config that '
          f'wrote it.'
      )

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()
