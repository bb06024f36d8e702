"""Native CPU kernels that XLA:CPU runs slowly, behind `jax.custom_vjp`; a CPU-only choice.

On this jaxlib, XLA:CPU computes the weight gradient of a convolution as another convolution that
Eigen runs 2-3x slower than the forward pass of the same FLOPs, behind layout transposes of the
activations, and runs convolutions with few channels (the 16 of a CIFAR ResNet's first stage) at
half the speed of wider ones (docs/performance.md). `conv_general_dilated` is a drop-in for
`jax.lax.conv_general_dilated` (Flax's `nn.Conv(conv_general_dilated=...)`) that, while
`use(True)` is in force at trace time, computes every 3x3, stride-1, SAME-padded float32 NHWC
convolution with 16, 32, 48, 64 or 128 output channels, its weight gradient and (with as many
input channels) its input gradient with AVX-512 kernels (`conv3x3.cc`, XLA FFI handlers).
Anything else (other shapes, strides, groups, dtypes, forward-mode differentiation, other
backends) is `lax`'s convolution.

The kernel is compiled from the source shipped in this package the first time it is needed (g++,
`-O3 -mavx512f -mfma`, the XLA FFI headers of the installed jaxlib), into
`$MCL_JAX_KERNEL_CACHE` (default `~/.cache/mcl_jax/kernels`; one file per source, jaxlib and
compiler). Where that is not possible (no compiler, no AVX-512, a failed build) `available()` is
False with the reason in `unavailable_reason()`, and everything runs on `lax`.

Forward-mode differentiation (`jax.jvp`, used by the L-MCL meta step) is not defined for a
`custom_vjp` function: trace such programs outside `use(True)` (the default). The choice is made
at trace time and `jax.jit` caches a function's trace whatever the context, so set `use` inside
the traced function (as `mcl_jax.step` does), never around the call of a jitted one.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import lax

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conv3x3.cc')
_TARGET = 'mcl_jax_conv3x3_weight_grad'
_FORWARD_TARGET = 'mcl_jax_conv3x3_forward'
_FLAGS = ('-O3', '-mavx512f', '-mfma', '-std=c++17', '-shared', '-fPIC', '-pthread')
# Output channels the kernel has a register tiling for (mcl_jax/kernels/conv3x3.cc: ChunkFor).
OUTPUT_CHANNELS = (16, 32, 48, 64, 128)

_enabled = contextvars.ContextVar('mcl_jax_cpu_kernels', default=False)
_reason: list[str] = []


@contextlib.contextmanager
def use(enabled: bool):
  """Within this context (at trace time), `conv_general_dilated` uses the kernels if `enabled`
  and `available()`."""
  token = _enabled.set(bool(enabled))
  try:
    yield
  finally:
    _enabled.reset(token)


def _cpu_has_avx512() -> bool:
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line for line in f if line.startswith('flags')), '').split()
  except OSError:
    return False
  return 'avx512f' in flags and 'fma' in flags


def _cache_dir() -> str:
  return os.environ.get('MCL_JAX_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'mcl_jax', 'kernels'
  )


def _build(compiler: str) -> str:
  """Path of the compiled library, building it (atomically) if this cache lacks it."""
  include = jax.ffi.include_dir()
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  version = subprocess.run(
      [compiler, '--version'], capture_output=True, text=True, check=True
  ).stdout
  key = hashlib.sha256(
      source + repr((_FLAGS, include, jax.__version__, version)).encode()
  ).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f'conv3x3-{key}.so')
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    subprocess.run(
        [compiler, *_FLAGS, '-I', include, '-o', tmp, _SOURCE],
        capture_output=True,
        text=True,
        check=True,
    )
    os.replace(tmp, path)  # another process building the same file writes the same bytes
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def available() -> bool:
  """Whether the kernels can run here (CPU backend, AVX-512, a compiler, a successful build);
  builds and registers them on the first call."""
  if jax.default_backend() != 'cpu':
    _reason.append(f'the default backend is {jax.default_backend()}, not cpu')
  elif not _cpu_has_avx512():
    _reason.append('this CPU has no AVX-512 (avx512f + fma)')
  elif not (compiler := os.environ.get('CXX') or shutil.which('g++')):
    _reason.append('no C++ compiler (g++ or $CXX) to build them')
  else:
    try:
      library = ctypes.cdll.LoadLibrary(_build(compiler))
      jax.ffi.register_ffi_target(
          _TARGET, jax.ffi.pycapsule(library.Conv3x3WeightGrad), platform='cpu'
      )
      jax.ffi.register_ffi_target(
          _FORWARD_TARGET, jax.ffi.pycapsule(library.Conv3x3Forward), platform='cpu'
      )
      return True
    except (OSError, subprocess.CalledProcessError) as e:
      detail = getattr(e, 'stderr', '') or str(e)
      _reason.append(f'building them failed: {detail.strip()[-2000:]}')
  logging.info('mcl_jax CPU kernels not used: %s', _reason[-1])
  return False


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True or was not asked)."""
  return _reason[-1] if _reason else None


def _conv(x, w):
  return lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _require() -> None:
  if not available():
    raise RuntimeError(f'mcl_jax CPU kernels are unavailable: {unavailable_reason()}')


def conv3x3_weight_grad(x, g):
  """dW [3, 3, C, O] of `_conv(x, w)` for the cotangent g [N, H, W, O]: the native kernel."""
  _require()
  out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method='sequential')(x, g)


def conv3x3_forward(x, w):
  """`_conv(x, w)` [N, H, W, O] by the native kernel."""
  _require()
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[-1],), jnp.float32)
  return jax.ffi.ffi_call(_FORWARD_TARGET, out, vmap_method='sequential')(x, w)


def conv3x3_input_grad(g, w):
  """dx [N, H, W, C] of `_conv(x, w)` for the cotangent g: the forward kernel applied to g with
  the kernel flipped in space and its channels swapped (needs C among `OUTPUT_CHANNELS`)."""
  return conv3x3_forward(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))


@jax.custom_vjp
def conv3x3(x, w):
  """A 3x3, stride-1, SAME NHWC/HWIO convolution computed by the native kernels (forward, weight
  gradient, and input gradient where the input has a supported number of channels)."""
  return conv3x3_forward(x, w)


def _conv3x3_fwd(x, w):
  return conv3x3_forward(x, w), (x, w)


def _conv3x3_bwd(residuals, g):
  x, w = residuals
  if x.shape[-1] in OUTPUT_CHANNELS:
    dx = conv3x3_input_grad(g, w)
  else:  # e.g. the 3 channels of an image: lax's (and dropped by XLA when, as there, unused)
    (dx,) = jax.vjp(lambda x: _conv(x, w), x)[1](g)
  return dx, conv3x3_weight_grad(x, g)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    expected = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, ('NHWC', 'HWIO', 'NHWC'))
    return tuple(dimension_numbers) == tuple(expected)
  return tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC')


def _same_3x3(padding) -> bool:
  if isinstance(padding, str):
    return padding.upper() == 'SAME'
  return [tuple(p) for p in padding] == [(1, 1), (1, 1)]


def qualifies(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
) -> bool:
  """Whether the kernel computes this convolution's weight gradient."""
  ones = lambda d: d is None or all(v == 1 for v in d)  # noqa: E731
  return (
      lhs.ndim == 4
      and tuple(rhs.shape[:2]) == (3, 3)
      and rhs.shape[3] in OUTPUT_CHANNELS
      and lhs.dtype == jnp.float32
      and rhs.dtype == jnp.float32
      and tuple(window_strides) == (1, 1)
      and ones(lhs_dilation)
      and ones(rhs_dilation)
      and feature_group_count == 1
      and batch_group_count == 1
      and precision is None
      and preferred_element_type in (None, jnp.float32)
      and _is_nhwc_hwio(dimension_numbers, 4)
      and _same_3x3(padding)
  )


def conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs):
  """`jax.lax.conv_general_dilated`, computed by the native kernels where they apply (above)."""
  if _enabled.get() and qualifies(lhs, rhs, window_strides, padding, *args, **kwargs):
    if available():
      return conv3x3(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
