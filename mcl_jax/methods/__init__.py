"""Training methods: one small object per method (see `base.Method`)."""
from mcl_jax.methods.base import DML, Independent, Method
from mcl_jax.methods.mcl import MCL

_METHODS = {
    'independent': Independent,
    'dml': DML,
    'mcl': MCL,
}

# Methods named in the public interface that later modules register here.
KNOWN_METHODS = ('independent', 'dml', 'mcl', 'lmcl', 'mcl_okd', 'ckd', 'crcd')


def register(name: str, cls) -> None:
  _METHODS[name] = cls


def available() -> tuple[str, ...]:
  return tuple(_METHODS)


def get_method(method_config) -> Method:
  name = method_config.name
  if name not in _METHODS:
    raise ValueError(f'method.name={name!r} is not available; choose one of {available()}.')
  return _METHODS[name](method_config)
