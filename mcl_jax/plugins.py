"""User plug-ins a run depends on: recorded when it starts, imported again to evaluate or export it.

A method, model or data set registered from outside the package (a user's module, or the config
file itself) is part of what a run *is*. `record` writes `<workdir>/plugins.json` with the module
and file of every non-built-in plug-in the config selects; `load` imports them again (by module
name when importable, else from the recorded file), so `python -m mcl_jax.evaluate` / `export` of
such a run need nothing but the workdir. `import_modules` serves their `--import` flag.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

from mcl_jax import data, methods, models

FILE = 'plugins.json'


def used(config) -> list[dict]:
  """The non-built-in plug-ins `config` selects: [{kind, name, module, file}]."""
  archs = sorted(set(config.model.archs or [config.model.arch]))
  entries = [('method', config.method.name, methods.origin)]
  entries += [('model', arch, models.origin) for arch in archs]
  entries += [('data', config.data.name, data.origin)]
  found = []
  for kind, name, origin_of in entries:
    origin = origin_of(name)
    if not origin.is_builtin:
      found.append({'kind': kind, 'name': name, 'module': origin.module, 'file': origin.file})
  return found


def record(config, workdir: str) -> None:
  """Writes `<workdir>/plugins.json` (process 0; an empty list when every plug-in is built in)."""
  with open(os.path.join(workdir, FILE), 'w') as f:
    json.dump(used(config), f, indent=2)


def load(workdir: str) -> list[str]:
  """Imports the plug-ins recorded in `<workdir>/plugins.json` (if any); returns their modules.
  Raises ImportError naming the module, its file and the fix when one cannot be imported."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    recorded = json.load(f)
  for entry in recorded:
    _import(entry['module'], entry.get('file'), what=f"{entry['kind']} {entry['name']!r}")
  return sorted({e['module'] for e in recorded})


def import_modules(names) -> None:
  """Imports each module name (or path to a .py file) of a CLI's `--import` flag."""
  for name in names:
    if name.endswith('.py'):
      _import(os.path.splitext(os.path.basename(name))[0], name, what=name)
    else:
      _import(name, None, what=name)


def _import(module: str, file: str | None, *, what: str) -> None:
  if module in sys.modules:
    return
  try:
    importlib.import_module(module)
    return
  except ImportError:
    if not file or not os.path.exists(file):
      raise ImportError(
          f'The run uses the {what} registered by module {module!r}'
          + (f' ({file})' if file else '')
          + ', which cannot be imported here. Put it on PYTHONPATH (or restore the file), or '
          'pass --import <module or file.py>.'
      ) from None
  spec = importlib.util.spec_from_file_location(module, file)
  loaded = importlib.util.module_from_spec(spec)
  sys.modules[module] = loaded
  try:
    spec.loader.exec_module(loaded)
  except BaseException:
    del sys.modules[module]
    raise
