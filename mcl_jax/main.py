"""Entry point: `python -m mcl_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.k=v]`.

Running again with the same --workdir resumes from its latest checkpoint (with the same config:
a changed one is refused unless --allow_config_change; see mcl_jax.workdir). A mistake on the
command line (a missing config file, an unknown or mistyped key, a bad value) ends in one line
naming it and the fix, exit status 2, with nothing created (mcl_jax.cli).
"""

from __future__ import annotations

import os
import re
import sys

if __name__ == '__main__':  # before the heavy imports: glibc reads its tunables at process start
  from mcl_jax import host_malloc  # pylint: disable=g-import-not-at-top

  host_malloc.reexec_if_cpu_only()

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mcl_jax import cli

PROG = 'mcl_jax'
USAGE = (
    'python -m mcl_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.key=value]'
)

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config file, e.g. configs/fashion_mnist_mcl.py:smoke',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed',
    os.environ.get('MCL_JAX_DISTRIBUTED', '0') == '1',
    'Call jax.distributed.initialize() (multi-host; also MCL_JAX_DISTRIBUTED=1).',
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change',
    False,
    'Resume a run with a config that differs from its config.json (beyond run length and '
    'logging keys); the change is recorded in <workdir>/config_changes.jsonl.',
)


def main(argv):
  if len(argv) > 1:
    cli.fail(PROG, f'unexpected arguments {argv[1:]}; usage: {USAGE}')
  import jax  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from mcl_jax import checkpoint, compile_cache, config_lib, train, workdir  # pylint: disable=g-import-not-at-top

  compile_cache.enable()  # a resumed or repeated run loads its compiled programs

  logging.set_verbosity(logging.WARNING)
  with cli.user_errors(
      PROG,
      config_lib.ConfigError,
      workdir.WorkdirError,
      checkpoint.CheckpointError,
      train.NonFiniteLossError,
      OSError,
  ):
    try:
      train.run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, status 130 as for any SIGINT
      print(
          f'{PROG}: aborted by a second Ctrl-C; run the same command again to resume from the '
          f'last checkpoint.',
          file=sys.stderr,
      )
      sys.exit(130)


# --------------------------------------------------------------------------------------------- #
# Command line: checked before absl parses it, so that every mistake gets one line and status 2.
# --------------------------------------------------------------------------------------------- #
_preflight_config = None  # the config file's config, for the messages of bad --config.* values


def _flag_value(argv, i):
  """(name, value, next index) of the flag at argv[i] ('--name=value' or '--name value')."""
  name, sep, value = argv[i].lstrip('-').partition('=')
  if sep:
    return name, value, i + 1
  if i + 1 < len(argv) and not argv[i + 1].startswith('-'):
    return name, argv[i + 1], i + 2
  return name, None, i + 1


def preflight(argv: list[str]) -> list[str]:
  """Checks --config, --workdir and the --config.* keys; returns argv with --config's path
  resolved (`cli.resolve_config_path`). Exits with status 2 and one message on a mistake."""
  global _preflight_config
  argv = list(argv)
  spec_at, overrides, workdir, i = None, [], None, 1
  while i < len(argv):
    arg = argv[i]
    if arg == '--':
      break
    if not arg.startswith('-'):
      i += 1
      continue
    name, value, nxt = _flag_value(argv, i)
    if name == 'config':
      spec_at = (i, '=' in arg)
    elif name.startswith('config.'):
      overrides.append(name[len('config.') :])
    elif name == 'workdir':
      workdir = value
    if name in ('config', 'workdir') or (name.startswith('config.') and '=' not in arg):
      i = nxt
    else:
      i += 1
  if any(a in ('--help', '-h', '--helpshort', '--helpfull', '-help') for a in argv[1:]):
    return argv
  if spec_at is None or not workdir:
    cli.fail(PROG, f'--config and --workdir are required; usage: {USAGE}')
  index, inline = spec_at
  spec = argv[index].split('=', 1)[1] if inline else argv[index + 1]
  path, sep, arg = spec.partition(':')
  try:
    resolved = cli.resolve_config_path(path)
    _preflight_config = cli.load_config(resolved + sep + arg)
  except ValueError as e:  # config_lib.ConfigError
    cli.fail(PROG, e)
  sections = [k for k in ('model', 'cohort', 'method', 'optim') if k not in _preflight_config]
  if sections:  # e.g. configs/linear_eval.py, the config of `python -m mcl_jax.linear_eval`
    cli.fail(
        PROG,
        f'{path} is not a training config (it has no {", ".join(sections)} section); configs/'
        f'linear_eval.py is for `python -m mcl_jax.linear_eval --workdir RUN --config ...`.',
    )
  for key in overrides:
    message = cli.unknown_key_message(_preflight_config, key)
    if message:
      cli.fail(PROG, message)
  if resolved != path:
    print(f'{PROG}: using the shipped config {resolved}', file=sys.stderr)
    if inline:
      argv[index] = f'--config={resolved}{sep}{arg}'
    else:
      argv[index + 1] = f'{resolved}{sep}{arg}'
  return argv


def _parse_flags(argv):
  """absl's flag parsing, every error ending in one line and exit status 2."""
  argv = preflight(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # all of it comes from the command line
    cli.fail(PROG, _flag_error(e))


def _flag_error(e: Exception) -> str:
  text = ' '.join(str(e).split())
  bad_value = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)', text)
  if bad_value:
    key, value, reason = bad_value.groups()
    kind = cli.value_type(_preflight_config, key) if _preflight_config is not None else None
    return f'--config.{key}={value}: {reason}' + (f'; {key} is {kind}.' if kind else '')
  return f'{text} (usage: {USAGE}; --helpshort lists the flags)'


def run(argv=None):
  """`python -m mcl_jax.main ...` (argv: the command line, default sys.argv)."""
  app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
