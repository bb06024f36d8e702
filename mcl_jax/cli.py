"""What the entry points share: one error path, and loading config files.

Every command (`python -m mcl_jax.main`, `.evaluate`, `.export`, `.plot`, `.report`) ends a user
mistake the same way: `<command>: error: <the problem and its fix>` on stderr (one or a few lines),
exit status 2, and nothing created or changed on disk. A traceback means a bug.

Config files: `load_config('configs/fashion_mnist_mcl.py:smoke')` is what `--config` does, for
Python. A relative `configs/<name>.py` that is not found from the current directory is looked up
in the shipped configs: the repository's `configs/` (a clone, or `pip install -e .`), then
`<prefix>/share/mcl_jax/configs/` where `pip install .` puts them.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import site
import sys
from typing import NoReturn

import ml_collections

from mcl_jax import config_lib


def fail(prog: str, message) -> NoReturn:
  """Prints `<prog>: error: <message>` to stderr and exits with status 2."""
  print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


@contextlib.contextmanager
def user_errors(prog: str, *types):
  """Turns the exception `types` (user mistakes) raised inside into `fail(prog, message)`."""
  try:
    yield
  except types as e:
    fail(prog, e)


# --------------------------------------------------------------------------------------------- #
# Config files
# --------------------------------------------------------------------------------------------- #
def config_dirs() -> list[str]:
  """Where the shipped configs are looked up: the checkout's configs/, then the installed copy."""
  package = os.path.dirname(os.path.abspath(__file__))
  return [
      os.path.join(os.path.dirname(package), 'configs'),
      os.path.join(sys.prefix, 'share', 'mcl_jax', 'configs'),
      os.path.join(site.USER_BASE or '~/.local', 'share', 'mcl_jax', 'configs'),  # pip --user
  ]


def shipped_configs() -> list[str]:
  for directory in config_dirs():
    if os.path.isdir(directory):
      return sorted(n for n in os.listdir(directory) if n.endswith('.py'))
  return []


def resolve_config_path(path: str) -> str:
  """`path` if it exists, else the shipped config of that name; ConfigError naming what exists."""
  if os.path.isfile(path):
    return path
  parent = os.path.normpath(os.path.dirname(path)) if os.path.dirname(path) else ''
  if not os.path.isabs(path) and parent in ('', 'configs'):
    for directory in config_dirs():
      candidate = os.path.join(directory, os.path.basename(path))
      if os.path.isfile(candidate):
        return candidate
  shipped = shipped_configs()
  if shipped:
    close = difflib.get_close_matches(os.path.basename(path), shipped, n=1)
    hint = f' Did you mean configs/{close[0]}?' if close else ''
    raise config_lib.ConfigError(
        f'config file {path} not found.{hint} Shipped configs (configs/): ' f'{", ".join(shipped)}.'
    )
  raise config_lib.ConfigError(
      f'config file {path} not found, and the shipped configs are not installed here (looked in '
      f'{", ".join(config_dirs())}). Run from a clone of the repository, or reinstall with '
      f'`pip install .` from one (it installs them into {config_dirs()[1]}).'
  )


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of `spec` ('path/to/file.py[:args]', as for --config), with `overrides`
  ({'optim.lr': 0.05, ...}) set; ConfigError for a missing file, bad args or an unknown key."""
  path, sep, arg = spec.partition(':')
  resolved = resolve_config_path(path)
  module_spec = importlib.util.spec_from_file_location('mcl_jax_config', resolved)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise config_lib.ConfigError(f'{path} is not a config file: it defines no get_config().')
  try:
    config = module.get_config(arg) if sep else module.get_config()
  except (ValueError, TypeError, KeyError) as e:
    raise config_lib.ConfigError(f'--config {spec}: {e}') from e
  for key, value in (overrides or {}).items():
    message = unknown_key_message(config, key)
    if message:
      raise config_lib.ConfigError(message)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f'{key}={value!r}: {e}') from e
  return config


def unknown_key_message(config, key: str) -> str | None:
  """None if `key` ('method.alpha') names a value of `config`, else what is wrong with it, the
  nearest known key and the known keys of its section."""
  parts = key.split('.')
  node = config
  for i, part in enumerate(parts):
    where = '.'.join(parts[:i])
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return (
          f'unknown config key {key}: {where} is a value ({where}={node!r}), not a section with '
          f'keys.'
      )
    known = sorted(node.keys())
    if part not in known:
      full = (lambda k: f'{where}.{k}') if where else (lambda k: k)
      close = difflib.get_close_matches(part, known, n=1)
      hint = f'; did you mean {full(close[0])}?' if close else '.'
      section = f'Known keys of {where}' if where else 'Top-level keys'
      return f'unknown config key {key}{hint} {section}: {", ".join(known)}.'
    node = node[part]
  return None


def value_type(config, key: str) -> str | None:
  """'an int (this config: 32)' for the value of `key`, None if there is none."""
  try:
    node = config
    for part in key.split('.'):
      node = node[part]
  except (KeyError, TypeError, AttributeError):
    return None
  kind = type(node).__name__
  return f'{"an" if kind[0] in "aeiou" else "a"} {kind} (this config: {node!r})'
