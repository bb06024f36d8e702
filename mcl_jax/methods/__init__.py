"""Training methods: one small object per method (see `base.Method`)."""
from mcl_jax.methods.base import DML, Independent, Method
from mcl_jax.methods.lmcl import LMCL
from mcl_jax.methods.ckd import CKD
from mcl_jax.methods.crcd import CRCD
from mcl_jax.methods.mcl import MCL
from mcl_jax.methods.mcl_okd import MCLOKD
from mcl_jax.methods.teacher import KD

_METHODS = {
    'independent': Independent,
    'dml': DML,
    'mcl': MCL,
    'lmcl': LMCL,
    'mcl_okd': MCLOKD,
    'kd': KD,
    'ckd': CKD,
    'crcd': CRCD,
}

# Methods named in the public interface that later modules register here.
KNOWN_METHODS = ('independent', 'dml', 'mcl', 'lmcl', 'mcl_okd', 'kd', 'ckd', 'crcd')


def register(name: str, cls) -> None:
  _METHODS[name] = cls


def available() -> tuple[str, ...]:
  return tuple(_METHODS)


def get_method(method_config) -> Method:
  name = method_config.name
  if name not in _METHODS:
    raise ValueError(f'method.name={name!r} is not available; choose one of {available()}.')
  return _METHODS[name](method_config)
