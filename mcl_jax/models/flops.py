"""Multiply-accumulate count of a model's forward pass, read off its jaxpr.

`count_macs(model, input_shape)` traces `model.apply(variables, x, train=False)` on abstract shapes
(no parameters are materialised) and sums, over every equation of the jaxpr and of the jaxprs nested
in it (jit, custom_jvp / custom_vjp, remat, cond, scan, while):
  conv_general_dilated: prod(output shape) * input features per group * prod(kernel window)
  dot_general:          prod(output shape) * prod(contracted sizes)
Everything else (elementwise ops, BatchNorm, pooling, reductions) counts zero. This is the
convention of the papers' "FLOPs" columns (e.g. MCL-OKD's `cal_multi_adds`: conv and linear
weights only), so the count is comparable with their tables.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def _sub_jaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out features, in features, *window)
    window = math.prod(rhs[d] for d in rhs_spec[2:])
    return math.prod(eqn.outvars[0].aval.shape) * rhs[rhs_spec[1]] * window
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    contracted = math.prod(lhs[d] for d in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted
  return 0


def jaxpr_macs(jaxpr: jex_core.Jaxpr) -> int:
  """Multiply-accumulates of one evaluation of `jaxpr`, nested jaxprs included.

  cond counts its most expensive branch; scan counts its body `length` times; while counts its
  body once (the trip count is not static).
  """
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    name = eqn.primitive.name
    if name == 'cond':
      total += max((jaxpr_macs(b) for b in _sub_jaxprs(eqn.params['branches'])), default=0)
      continue
    nested = sum(jaxpr_macs(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
    total += nested * eqn.params['length'] if name == 'scan' else nested
  return total


def count_macs(model: nn.Module, input_shape: Sequence[int], dtype=jnp.float32) -> int:
  """Multiply-accumulates of one forward pass (train=False) of `model` on ONE image.

  Args:
    model: a zoo model (`model.apply(variables, x, train=False)`).
    input_shape: the image shape (H, W, C); a leading batch axis, if given, is dropped.
    dtype: dtype of the abstract input.

  Returns:
    The MAC count (the papers' "FLOPs": 1 MAC = 1 "FLOP" in their tables; divide by 1e9 for "G").
  """
  if len(input_shape) == 4:
    input_shape = input_shape[1:]
  if len(input_shape) != 3:
    raise ValueError(
        f'count_macs: input_shape must be (H, W, C) or (B, H, W, C), got {input_shape}'
    )
  x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
  # `train` stays a Python bool: bound outside the traced functions.
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  apply = functools.partial(model.apply, train=False)
  closed = jax.make_jaxpr(apply)(variables, x)
  return jaxpr_macs(closed.jaxpr)
