"""Training methods: one small object per method (see `base.Method`), behind a registry.

from mcl_jax import methods
section = methods.config('mcl', alpha=0.1)     # the `method` config section, validated keys
methods.register('my_method', MyMethod)        # a user's Method subclass, from any module
"""

from __future__ import annotations

import ml_collections

from mcl_jax import registry
from mcl_jax.config_lib import ConfigError
from mcl_jax.methods.base import (
    DML,
    HParam,
    Independent,
    Method,
    PEER,
    PEER_EXAMPLE,
    REPLICATED,
    RunInfo,
    same_placement,
)
from mcl_jax.methods.ckd import CKD
from mcl_jax.methods.crcd import CRCD
from mcl_jax.methods.lmcl import LMCL
from mcl_jax.methods.mcl import MCL
from mcl_jax.methods.mcl_okd import MCLOKD
from mcl_jax.methods.moco_mcl import MoCoMCL
from mcl_jax.methods.teacher import KD

_REGISTRY: registry.Registry[type[Method]] = registry.Registry('method', 'method.name')


def register(name: str, cls: type[Method], *, replace: bool = False) -> type[Method]:
  """Makes `cls` (a `Method` subclass) selectable as `method.name=name`."""
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise TypeError(f'methods.register({name!r}, ...): {cls!r} is not a mcl_jax Method subclass.')
  _REGISTRY.register(name, cls, replace=replace)
  return cls


def get(name: str) -> type[Method]:
  """The class registered as `name` (KeyError naming the registered ones)."""
  return _REGISTRY.get(name)


def names() -> tuple[str, ...]:
  return _REGISTRY.names()


def origin(name: str) -> registry.Origin:
  return _REGISTRY.origin(name)


def config(name: str, **overrides) -> ml_collections.ConfigDict:
  """The `method` config section of method `name`: its keys at their defaults, then `overrides`."""
  return get(name).default_config(name, **overrides)


def upgrade(section: dict) -> dict:
  """A `method` section as this version writes it. Configs saved before each method owned its
  keys held one flat set of keys for every method (`alpha` ... meant other things for the
  distillation methods): they become the method's own keys, renamed per `Method.legacy_names`.
  Keys a method gained later are added at their defaults (the behaviour the run was trained with).
  """
  if section.get('name') not in _REGISTRY:
    return dict(section)
  cls = get(section['name'])
  if set(section) - {'name'} <= set(cls.hparams):
    return {**{k: h.default for k, h in cls.hparams.items() if k not in section}, **section}
  out = {'name': section['name']}
  for key, hparam in cls.hparams.items():
    out[key] = section.get(key, section.get(cls.legacy_names.get(key, key), hparam.default))
  return out


def problems(section, run: RunInfo | None) -> list[str]:
  """Everything wrong with the `method` section for `run`, one line each ([] when valid)."""
  try:
    cls = get(section.get('name'))
  except registry.UnknownNameError as e:
    return [str(e)]
  return cls.validate(section, run)


def build(section, run: RunInfo | None = None) -> Method:
  """The method object of the `method` section; raises ConfigError listing every problem."""
  found = problems(section, run)
  if found:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(found))
  return get(section.name)(section, run)


for _name, _cls in (
    ('independent', Independent),
    ('dml', DML),
    ('mcl', MCL),
    ('lmcl', LMCL),
    ('mcl_okd', MCLOKD),
    ('kd', KD),
    ('ckd', CKD),
    ('crcd', CRCD),
    ('moco_mcl', MoCoMCL),
):
  register(_name, _cls)

__all__ = [
    'CKD',
    'CRCD',
    'DML',
    'HParam',
    'Independent',
    'KD',
    'LMCL',
    'MCL',
    'MCLOKD',
    'MoCoMCL',
    'Method',
    'PEER',
    'PEER_EXAMPLE',
    'REPLICATED',
    'RunInfo',
    'build',
    'config',
    'get',
    'names',
    'register',
    'same_placement',
]
