"""The run directory: one trainer at a time, no silent config change, clear errors for the tools.

**Lock.** `train.run` holds `<workdir>/trainer.lock` for the whole run: a small JSON file (host,
pid, start time, command) created atomically before anything else in the workdir is created or
changed, and removed when the run ends, however it ends (an exception, Ctrl-C). A second trainer
on the same workdir is refused with an error naming the holder. In a multi-host run process 0
takes the lock and tells the others whether it got it, so all processes agree on one owner. A lock
left behind by a killed trainer on *this* host (its pid is gone, a zombie, or now belongs to a
later process) is stale: it is taken over with a warning. A lock of *another* host cannot be
checked from here; the error says how to clear it (remove the file) when that machine is gone.

**Config drift.** A run's `config.json` is the config it was trained with. Resuming (or rerunning
a finished run) with a config that differs in any key except `FREE_KEYS` is refused, listing each
differing key with both values, unless `allow_config_change` is given (`--allow_config_change`).
Every accepted difference (free keys included) is appended to `<workdir>/config_changes.jsonl`
(`{"step", "time", "changes": {key: [old, new]}, "allowed_by"}`) in the same moment as
`config.json` is replaced by the config now in effect, so `config.json` plus the change records is
the full history; `config.json` is never replaced without such a record.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid

from mcl_jax import config_lib

LOCK_NAME = 'trainer.lock'
CONFIG_NAME = 'config.json'
CHANGES_NAME = 'config_changes.jsonl'

# Keys that may differ when a run is resumed: how long it runs and how often it logs, evaluates and
# checkpoints (what is trained up to now is unchanged), where the data is read from, and the eval
# batch size (eval counts correct predictions per example: the batch does not change them), and
# the cohort strategy (vmap / unroll / autotune compute the same step, to float round-off: a run
# moved to another machine may be resumed with the strategy that suits it). Changes of these are
# still recorded in config_changes.jsonl. Everything else (method, model,
# optimizer, data, seed, batch, mesh...) is compared, whatever the keys of a section are called.
FREE_KEYS = (
    'total_epochs',
    'total_steps',
    'log_every_steps',
    'ckpt_every_steps',
    'eval_every_steps',
    'keep_checkpoints',
    'data.data_dir',
    'data.eval_batch_size',
    'data.train_eval_examples',
    'cohort.strategy',
    'method.meta_program',  # the same meta round, compiled as one program or per step
)

_ABSENT = '<absent>'


class WorkdirError(RuntimeError):
  """A workdir that cannot be used as asked; the message names the problem and the fix."""


class ConfigDriftError(config_lib.ConfigError):
  """The config differs from the one the run in the workdir was trained with."""


# --------------------------------------------------------------------------------------------- #
# What is in a workdir (read-only: the tools that read a run call these before touching anything)
# --------------------------------------------------------------------------------------------- #
def require(workdir: str, *names: str) -> None:
  """Raises WorkdirError unless `workdir` is a directory holding each of `names`."""
  if not os.path.exists(workdir):
    raise WorkdirError(
        f'{workdir} does not exist. Pass the --workdir of a run of `python -m mcl_jax.main`.'
    )
  if not os.path.isdir(workdir):
    raise WorkdirError(f'{workdir} is not a directory. Pass the --workdir of a run.')
  for name in names:
    if not os.path.exists(os.path.join(workdir, name)):
      raise WorkdirError(
          f'{workdir} holds no {name}: it is not a run directory, or its run has not started. '
          f'Train first: `python -m mcl_jax.main --config ... --workdir {workdir}`.'
      )


def saved_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints in `workdir` (the `latest` and `best` series), without opening them."""
  steps = set()
  for series in ('latest', 'best'):
    try:
      names = os.listdir(os.path.join(workdir, 'checkpoints', series))
    except OSError:
      continue
    steps.update(int(n) for n in names if n.isdigit())
  return sorted(steps)


def saved_config(workdir: str) -> dict | None:
  """The run's `config.json` as a dict, or None when there is none."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(
        f'{path} cannot be read ({e}). It records what the run in {workdir} was trained with; '
        f'restore it, or use a new --workdir.'
    ) from e


# --------------------------------------------------------------------------------------------- #
# Lock
# --------------------------------------------------------------------------------------------- #
class TrainerLock:
  """`<workdir>/trainer.lock`: who trains in `workdir` (see the module docstring)."""

  def __init__(self, workdir: str, flag: str = '--workdir'):
    self.workdir = workdir
    self.flag = flag  # how the directory was given, for the messages (linear_eval: --out)
    self.path = os.path.join(workdir, LOCK_NAME)
    self._token = None

  # ---- inspection -------------------------------------------------------------------------- #
  def holder(self) -> dict | None:
    """The lock's content, or None when there is no lock file."""
    try:
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    except IsADirectoryError:
      return {}
    try:
      content = json.loads(text)
    except ValueError:
      return {}  # being written by an O_EXCL creator, or garbage: unknown holder
    return content if isinstance(content, dict) else {}

  def check_free(self) -> None:
    """Raises WorkdirError if a live trainer (or one that cannot be checked) holds the lock.
    Changes nothing: stale locks are left for `acquire` to take over."""
    holder = self.holder()
    if holder is not None and not _is_stale(holder):
      raise WorkdirError(self._held_message(holder))

  # ---- acquire / release ------------------------------------------------------------------- #
  def acquire(self) -> None:
    """Creates the workdir if needed and takes the lock; WorkdirError if another trainer holds it."""
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(5):
      if self._create():
        return
      holder = self.holder()
      if holder is None:
        continue  # released in the meantime
      if holder == {}:
        time.sleep(0.2)  # maybe half-written by a creator without hard links: read it again
        holder = self.holder()
        if holder is None:
          continue
      if not _is_stale(holder):
        raise WorkdirError(self._held_message(holder))
      if self._set_aside(holder):
        print(
            f'mcl_jax: warning: took over the stale lock {self.path} of {_describe(holder)}: '
            f'that process is gone (killed?).',
            file=sys.stderr,
            flush=True,
        )
    raise WorkdirError(
        f'Could not take the lock {self.path}: it keeps changing. Is another trainer starting on '
        f'{self.flag} {self.workdir}?'
    )

  def release(self) -> None:
    """Removes the lock if it is still this process's."""
    if self._token is None:
      return
    if (self.holder() or {}).get('token') == self._token:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self._token = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _create(self) -> bool:
    token = uuid.uuid4().hex
    content = {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'started_unix': time.time(),
        'command': _command_line(),
        'token': token,
    }
    text = json.dumps(content, indent=1) + '\n'
    # Written in full under a private name, then hard-linked to the lock's name: atomic, and a
    # reader never sees half a lock. O_EXCL where the file system has no hard links.
    tmp = f'{self.path}.{content["host"]}.{content["pid"]}.{token[:8]}'
    try:
      with open(tmp, 'w') as f:
        f.write(text)
      try:
        os.link(tmp, self.path)
      except FileExistsError:
        return False
      except OSError:
        try:
          fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, 'w') as f:
          f.write(text)
    finally:
      try:
        os.remove(tmp)
      except OSError:
        pass
    self._token = token
    return True

  def _set_aside(self, stale: dict) -> bool:
    """Moves the stale lock out of the way; False if what was moved turned out not to be it."""
    aside = f'{self.path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    try:
      with open(aside) as f:
        moved = json.loads(f.read() or 'null')
    except (OSError, ValueError):
      moved = None
    if moved != stale:  # another trainer took it over between our read and the rename: put back
      try:
        os.link(aside, self.path)
      except OSError:
        pass
      os.remove(aside)
      return False
    os.remove(aside)
    return True

  def _held_message(self, holder: dict) -> str:
    here = holder.get('host') == socket.gethostname()
    if not holder:
      who, clear = (
          'an unknown trainer (the lock file cannot be read)',
          f'If no trainer is running on it, remove {self.path} and run again.',
      )
    elif here:
      who = _describe(holder)
      clear = (
          f'Wait for it to finish, or stop it (`kill {holder.get("pid")}`: it checkpoints and '
          f'exits) and run again to resume.'
      )
    else:
      who = _describe(holder)
      clear = (
          f'Wait for it to finish. If that trainer is gone (its machine was killed or '
          f'preempted), remove {self.path} and run again to resume.'
      )
    return (
        f'{self.flag} {self.workdir} is in use by {who}. Two trainers on one workdir would '
        f'corrupt its checkpoints and metrics. {clear} Or use another {self.flag}.'
    )


def _command_line() -> str:
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  program = f'-m {spec.name}' if spec is not None and spec.name else (sys.argv[0] or '-c ...')
  return ' '.join(['python', program] + sys.argv[1:])[:500]


def _describe(holder: dict) -> str:
  cmd = f' ({holder["command"]})' if holder.get('command') else ''
  return (
      f'pid {holder.get("pid")} on host {holder.get("host")}, started {holder.get("started")}'
      f'{cmd}'
  )


def _is_stale(holder: dict) -> bool:
  """True when the lock's process is known to be gone: same host, and its pid is dead, a zombie,
  or now a process started after the lock was written. A lock of another host is never stale."""
  if not holder or holder.get('host') != socket.gethostname():
    return False
  pid = holder.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # alive, another user's
  started = _process_start_time(pid)
  if started is None:
    return False
  state, start_unix = started
  if state in ('Z', 'X'):
    return True
  lock_time = holder.get('started_unix')
  return isinstance(lock_time, (int, float)) and start_unix > lock_time + 5


def _process_start_time(pid: int) -> tuple[str, float] | None:
  """(state, start time in seconds since the epoch) of `pid` from /proc; None off Linux."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    with open('/proc/stat') as f:
      btime = next(int(line.split()[1]) for line in f if line.startswith('btime'))
    return fields[0], btime + int(fields[19]) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def hold(workdir: str) -> TrainerLock:
  """Takes the lock of `workdir` for a run (all processes call this at the same point).

  Process 0 creates the workdir and takes the lock; in a multi-host run it then tells the other
  processes whether it got it (one collective), so that all of them go on or all of them stop.
  Returns the lock (a no-op to release on processes other than 0).
  """
  import jax  # pylint: disable=g-import-not-at-top

  lock = TrainerLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except (WorkdirError, OSError) as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not int(ok) and error is None:
      error = WorkdirError(
          f'Process 0 could not take the lock of --workdir {workdir}; its error says why.'
      )
  if error is not None:
    raise error
  return lock


# --------------------------------------------------------------------------------------------- #
# Config drift
# --------------------------------------------------------------------------------------------- #
def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a.b.c': value} of a nested dict (a config as JSON); lists and tuples are leaves."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict) and value:
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def as_json_dict(config) -> dict:
  """A ConfigDict (or dict) as config.json would hold it."""
  text = config.to_json() if hasattr(config, 'to_json') else json.dumps(config)
  return json.loads(text)


def config_changes(saved: dict, config) -> dict:
  """{key: (old, new)} of every flattened key whose value differs between the saved config and
  `config` (a key present on one side only shows the other as '<absent>')."""
  old, new = flatten(saved), flatten(as_json_dict(config))
  return {
      k: (old.get(k, _ABSENT), new.get(k, _ABSENT))
      for k in sorted(set(old) | set(new))
      if old.get(k, _ABSENT) != new.get(k, _ABSENT)
  }


def describe_changes(changes: dict) -> str:
  return '\n'.join(
      f'  {key}: {old!r} (config.json) -> {new!r} (now)' for key, (old, new) in changes.items()
  )


def check_drift(workdir: str, changes: dict, *, allow_config_change: bool) -> None:
  """Raises ConfigDriftError when `changes` touch more than FREE_KEYS and are not allowed."""
  bound = {k: v for k, v in changes.items() if k not in FREE_KEYS}
  if not bound or allow_config_change:
    return
  path = os.path.join(workdir, CONFIG_NAME)
  raise ConfigDriftError(
      f'The config differs from the one the run in {workdir} was trained with ({path}):\n'
      f'{describe_changes(bound)}\n'
      f'Use a new --workdir for this config, or rerun with the values of config.json, or pass '
      f'--allow_config_change (Python: train.run(..., allow_config_change=True)) to continue this '
      f'run with the change, recorded in {os.path.join(workdir, CHANGES_NAME)}. Keys that may '
      f'change without it: {", ".join(FREE_KEYS)}.'
  )


def record_config(workdir: str, config, changes: dict | None, *, step: int, allowed: bool) -> None:
  """Writes config.json: the first time as is; after `changes`, only together with their record
  in config_changes.jsonl (appended first, so a crash in between leaves the record)."""
  path = os.path.join(workdir, CONFIG_NAME)
  if changes:
    bound = any(k not in FREE_KEYS for k in changes)
    record = {
        'step': int(step),
        'time': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'changes': {k: [old, new] for k, (old, new) in changes.items()},
        'allowed_by': '--allow_config_change' if bound and allowed else 'free keys',
    }
    with open(os.path.join(workdir, CHANGES_NAME), 'a') as f:
      f.write(json.dumps(record) + '\n')
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, path)
