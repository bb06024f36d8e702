"""mcl_jax.kernels: the native 3x3 convolution, its weight and input gradients equal float64 NumPy
and lax (every supported width, odd sizes, under vmap), are chosen only where they apply, are
deterministic, and the train step that uses them equals the one that does not to round-off."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mcl_jax import kernels

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f'CPU kernels unavailable: {kernels.unavailable_reason()}'
)

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def _windows(x):
  """{(kh, kw): the [N, H, W, C] window of the zero-padded x that tap (kh, kw) reads}, float64."""
  x = np.asarray(x, np.float64)
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return {(i, j): xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)}


def _numpy_conv(x, w):
  """y[n, h, w, o] = sum_{kh,kw,c} xpad[n, h + kh, w + kw, c] w[kh, kw, c, o]."""
  return sum(np.einsum('nhwc,co->nhwo', v, w[k]) for k, v in _windows(x).items())


def _numpy_weight_grad(x, g):
  """dW[kh, kw, c, o] = sum_{n,h,w} xpad[n, h + kh, w + kw, c] g[n, h, w, o]."""
  taps = _windows(x)
  return np.stack(
      [np.stack([np.einsum('nhwc,nhwo->co', taps[i, j], g) for j in range(3)]) for i in range(3)]
  )


@pytest.mark.parametrize(
    'n,hw,c,o',
    [
        (4, (8, 8), 3, 16),
        (3, (7, 5), 16, 16),
        (2, (6, 6), 20, 32),
        (5, (4, 4), 64, 64),
        (1, (3, 9), 7, 48),
        (2, (5, 5), 33, 128),
        (9, (1, 1), 16, 16),
        (2, (28, 28), 16, 16),
        (2, (17, 3), 32, 32),
    ],
)
def test_kernels_equal_numpy(n, hw, c, o):
  """Forward pass, weight gradient and (with a supported number of input channels) input
  gradient against float64 NumPy."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, *hw, c)).astype(np.float32)
  w = rng.standard_normal((3, 3, c, o)).astype(np.float32)
  g = rng.standard_normal((n, *hw, o)).astype(np.float32)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-4)
  close(jax.jit(kernels.conv3x3_forward)(x, w), _numpy_conv(x, w))
  close(jax.jit(kernels.conv3x3_weight_grad)(x, g), _numpy_weight_grad(x, g))
  if c in kernels.OUTPUT_CHANNELS:
    # dx = the convolution of g with the kernel flipped in space and its channels swapped
    want = _numpy_conv(g, np.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    close(jax.jit(kernels.conv3x3_input_grad)(g, w), want)


def test_custom_vjp_values_and_gradients_equal_lax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((6, 9, 9, 16)), jnp.float32)
  w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 16, 32)), jnp.float32)
  loss = lambda conv: lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)  # noqa: E731
  chex.assert_trees_all_close(kernels.conv3x3(x, w), _lax_conv(x, w), rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(kernels.conv3x3), (0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(_lax_conv), (0, 1)))(x, w)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-4)  # sums of 486 products
  # 3 input channels (an image): the input gradient is lax's
  x3, w3 = x[..., :3], w[:, :, :3, :]
  got = jax.jit(jax.grad(loss(kernels.conv3x3), (0, 1)))(x3, w3)
  want = jax.jit(jax.grad(loss(_lax_conv), (0, 1)))(x3, w3)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-4)  # sums of 486 products


def test_vmapped_over_peers_equals_per_peer():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 4, 8, 8, 16)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((3, 4, 8, 8, 32)), jnp.float32)
  got = jax.vmap(kernels.conv3x3_weight_grad)(x, g)
  for k in range(3):
    chex.assert_trees_all_equal(got[k], kernels.conv3x3_weight_grad(x[k], g[k]))


def test_deterministic():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((32, 16, 16, 32)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((32, 16, 16, 32)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, w: jnp.vdot(kernels.conv3x3(x, w), g), (0, 1)))
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
  first = grad(x, w)
  for _ in range(3):
    chex.assert_trees_all_equal(grad(x, w), first)


def _uses_kernel(fn, *args) -> bool:
  # A new function each time: jit's trace cache does not key on the `use` context.
  traced = jax.jit(lambda *a: fn(*a)).lower(*args)  # pylint: disable=unnecessary-lambda
  return kernels._TARGET in traced.as_text()  # pylint: disable=protected-access


@pytest.mark.parametrize(
    'shape,kernel,kwargs,expected',
    [
        ((2, 8, 8, 16), (3, 3, 16, 32), {}, True),
        ((2, 8, 8, 16), (3, 3, 16, 32), {'padding': 'SAME'}, True),
        ((2, 8, 8, 16), (3, 3, 16, 32), {'window_strides': (2, 2)}, False),
        ((2, 8, 8, 16), (1, 1, 16, 32), {'padding': ((0, 0), (0, 0))}, False),
        ((2, 8, 8, 16), (3, 3, 16, 24), {}, False),  # no register tiling for 24 outputs
        ((2, 8, 8, 16), (3, 3, 8, 32), {'feature_group_count': 2}, False),
        ((2, 8, 8, 16), (3, 3, 16, 32), {'padding': ((0, 0), (0, 0))}, False),
        ((2, 8, 8, 16), (3, 3, 16, 32), {'rhs_dilation': (2, 2)}, False),
    ],
)
def test_only_qualifying_convolutions_use_the_kernel(shape, kernel, kwargs, expected):
  args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)
  args.update(kwargs)
  x, w = jnp.zeros(shape), jnp.zeros(kernel)
  loss = lambda x, w: kernels.conv_general_dilated(x, w, **args).sum()  # noqa: E731
  grad = jax.grad(loss, 1)
  assert not _uses_kernel(grad, x, w)  # off unless enabled
  with kernels.use(True):
    assert _uses_kernel(grad, x, w) == expected
    assert not _uses_kernel(grad, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    if expected:  # forward mode is not defined: the L-MCL meta step traces outside `use(True)`
      with pytest.raises(TypeError, match='custom_vjp'):
        jax.jvp(lambda w: loss(x, w), (w,), (w,))


def test_mcl_train_and_eval_steps_with_kernels_equal_lax():
  """The MCL train step of a ResNet-8 pair: with the kernels the same loss and, to round-off, the
  same new params as with lax's convolutions; only the enabled step calls the kernel. The eval
  step: the same counts."""
  from mcl_jax import cohort as cohort_lib, config_lib, methods, optim, step as step_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.base_config()
  config.model.arch, config.cohort.num_peers = 'resnet8', 2
  config.method = methods.config('mcl')
  cohort = cohort_lib.build_cohort(config.model, config.cohort, 10)
  method = methods.build(config.method)
  tx, schedule = optim.make_optimizer(config.optim, total_steps=100, steps_per_epoch=10)
  aug = config_lib.ml_collections.ConfigDict(
      dict(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=2, flip=True)
  )
  labels = np.arange(64, dtype=np.int32) % 10
  state = step_lib.create_state(
      cohort, method, tx, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), labels
  )
  rng = np.random.default_rng(0)
  batch = {
      'image': jnp.asarray(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)),
      'label': jnp.asarray(labels[:16]),
      'index': jnp.arange(16, dtype=jnp.int32),
  }
  steps = {
      enabled: jax.jit(
          step_lib.make_train_step(cohort, method, tx, schedule, aug, 0, cpu_kernels=enabled)
      )
      for enabled in (False, True)
  }
  assert _uses_kernel(steps[True], state, batch) and not _uses_kernel(steps[False], state, batch)
  new = {enabled: fn(state, batch) for enabled, fn in steps.items()}
  chex.assert_trees_all_close(new[True][1]['loss'], new[False][1]['loss'], rtol=1e-6)
  chex.assert_trees_all_close(new[True][0].params, new[False][0].params, rtol=1e-4, atol=1e-6)
  # The eval step: the forward kernel, the same counts (logits within round-off).
  evals = {
      enabled: jax.jit(step_lib.make_eval_step(cohort, aug, method, cpu_kernels=enabled))
      for enabled in (False, True)
  }
  args = (state.params['peers'], state.batch_stats, {**batch, 'mask': jnp.ones(16, bool)})
  forward = kernels._FORWARD_TARGET  # pylint: disable=protected-access
  assert forward in jax.jit(evals[True]).lower(*args).as_text()
  assert forward not in jax.jit(evals[False]).lower(*args).as_text()
  chex.assert_trees_all_equal(evals[True](*args), evals[False](*args))


def test_unavailable_without_a_compiler(tmp_path):
  """No compiler: `available()` is False with the reason, and the convolution is lax's."""
  code = (
      'import jax, jax.numpy as jnp\n'
      'from mcl_jax import kernels\n'
      'print(kernels.available(), kernels.unavailable_reason())\n'
      'with kernels.use(True):\n'
      '  f = jax.grad(lambda w: kernels.conv_general_dilated(jnp.ones((1, 4, 4, 16)), w, (1, 1),'
      ' "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())\n'
      '  print(jax.jit(f)(jnp.ones((3, 3, 16, 16))).shape)\n'
  )
  env = {**os.environ, 'PATH': str(tmp_path), 'CXX': '', 'MCL_JAX_KERNEL_CACHE': str(tmp_path)}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      'False no C++ compiler (g++ or $CXX) to build them',
      '(3, 3, 16, 16)',
  ]
