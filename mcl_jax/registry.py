"""Name -> plug-in tables with one shape, for methods, models and data sets.

    from mcl_jax import methods, models, data
    methods.register('mcl_l2', MclL2)          # a Method subclass
    models.register('tiny_cnn', TinyCNN)       # a constructor (num_classes=, dtype=) -> nn.Module
    data.register('my_digits', my_source)      # a data source

A registration may come from anywhere: the package itself, a user's module, or a config file. Each
entry remembers the module (and file) that registered it, so that a run can record the user code
it depends on and `evaluate` / `export` can import it again (mcl_jax.plugins).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar('T')

PACKAGE = 'mcl_jax'


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where a registered object was defined: its module name and, when it has one, its file."""

  module: str
  file: str | None

  @property
  def is_builtin(self) -> bool:
    return self.module == PACKAGE or self.module.startswith(PACKAGE + '.')


def caller_origin() -> Origin:
  """The module that called a public `register` (mcl_jax.methods/models/data.register): a user's
  module or config file, or the package itself for the built-ins."""
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None and frame.f_code.co_name == 'register' and _in_package(frame):
    frame = frame.f_back
  if frame is None or _in_package(frame):
    return Origin(PACKAGE, None)
  return Origin(frame.f_globals.get('__name__', '__main__'), frame.f_code.co_filename)


def _same_place(a: Origin, b: Origin) -> bool:
  """The same module, or the same file loaded again under another module name (a config file)."""
  if a.file and b.file:
    return os.path.realpath(a.file) == os.path.realpath(b.file)
  return a.module == b.module


def _in_package(frame) -> bool:
  module = frame.f_globals.get('__name__', '')
  return module == PACKAGE or module.startswith(PACKAGE + '.')


class UnknownNameError(KeyError, ValueError):
  """A name that no plug-in registered; the message lists the registered ones. A KeyError (a
  failed lookup) and a ValueError (a bad config value) alike."""

  def __str__(self):  # KeyError quotes its message; this one is a sentence.
    return str(self.args[0])


class Registry(Generic[T]):
  """A table of named plug-ins of one kind ('method', 'model', 'data set')."""

  def __init__(self, kind: str, config_key: str):
    self.kind, self.config_key = kind, config_key
    self._entries: dict[str, T] = {}
    self._origins: dict[str, Origin] = {}

  def register(
      self, name: str, obj: T, *, replace: bool = False, origin: Origin | None = None
  ) -> T:
    """Adds `obj` under `name`. Re-registering a name is an error unless `replace=True` or it
    comes from the same module and file again (a config file or plug-in loaded twice).
    `origin`: who registers it (default: the first caller outside mcl_jax)."""
    if not isinstance(name, str) or not name:
      raise ValueError(f'A {self.kind} name must be a non-empty string, got {name!r}.')
    origin = origin or caller_origin()
    if name in self._entries and not replace and not _same_place(self._origins[name], origin):
      raise ValueError(
          f'{self.kind} {name!r} is already registered (by {self._origins[name].module}); '
          f'pick another name or pass replace=True.'
      )
    self._entries[name] = obj
    self._origins[name] = origin
    return obj

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise UnknownNameError(
          f'{self.config_key}={name!r} is not a registered {self.kind}; choose one of '
          f'{self.names()}, or register yours with {self._register_call()} before the run '
          f'(e.g. in your config file).'
      )
    return self._entries[name]

  def origin(self, name: str) -> Origin:
    self.get(name)
    return self._origins[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def _register_call(self) -> str:
    module = {'method': 'methods', 'model': 'models', 'data set': 'data'}.get(self.kind, '')
    return f'mcl_jax.{module}.register(name, ...)'
