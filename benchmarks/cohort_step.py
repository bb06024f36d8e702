r"""Times the full jitted cohort train step (augment, K forwards, method loss, backward, SGD).

    python benchmarks/cohort_step.py --arch resnet32 --peers 2 --batch 128 --method mcl \
        --strategy auto --steps 10

Prints one JSON line with "step_ms_median", "step_ms_min", "compile_s" and the setup. The batch is
a fixed random CIFAR-shaped batch (32x32x3, 100 classes) so no input pipeline is timed, matching
the PyTorch step that benchmarks/suite.py compares with.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import cohort as cohort_lib, config_lib, kernels, methods, optim, step as step_lib

# CIFAR-shaped on-device augmentation of every benchmark step.
AUG = config_lib.ml_collections.ConfigDict(
    dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_padding=4, flip=True)
)


def optimizer():
  """(tx, schedule) of every benchmark step: the default SGD-Nesterov, lr 0.05, cosine."""
  config = config_lib.base_config()
  config.optim.lr = 0.05
  return optim.make_optimizer(config.optim, total_steps=10_000, steps_per_epoch=390)


def build_step(
    arch, peers, method, strategy, batch, fast_path=True, num_classes=100, cpu_kernels=None
):
  config = config_lib.base_config()
  config.model.arch, config.cohort.num_peers, config.cohort.strategy = arch, peers, strategy
  config.method = methods.config(method)
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes)
  meth = methods.build(config.method)
  tx, schedule = optimizer()
  sample = jnp.zeros((1, 32, 32, 3), jnp.float32)
  train_labels = np.arange(50_000, dtype=np.int32) % num_classes
  state = step_lib.create_state(cohort, meth, tx, jax.random.key(0), sample, train_labels)
  train_step = jax.jit(
      step_lib.make_train_step(
          cohort,
          meth,
          tx,
          schedule,
          AUG,
          seed=0,
          cpu_kernels=fast_path if cpu_kernels is None else cpu_kernels,
      ),
      donate_argnums=0,
      compiler_options=step_lib.compiler_options(enabled=fast_path),
  )
  rng = np.random.default_rng(0)
  data = {
      'image': jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)),
      'label': jnp.asarray(np.arange(batch, dtype=np.int32) // 2 % num_classes),
      'index': jnp.arange(batch, dtype=jnp.int32),
  }
  return cohort, state, train_step, data


def build_meta_step(cohort, method_config, fast_path=True, donate=False, program=None, jit=None):
  """The meta step of `build_step`'s setup for the `lmcl` `method_config`, as the training loop
  builds it: one jitted program (`step.make_meta_step`) or a sequence of them
  (`step.make_per_step_meta_step`), by `program` (default: the method's `meta_program`, 'auto'
  resolved per backend). `donate`: the state's buffers reused, as the loop runs it (per step: always).
  jit: how each per-step program is jitted (default: `jax.jit` with the compiler options)."""
  if program is not None:
    keys = {k: v for k, v in method_config.items() if k != 'name'}
    method_config = methods.config('lmcl', **{**keys, 'meta_program': program})
  method = methods.build(method_config)
  options = step_lib.compiler_options(enabled=fast_path)
  make = (step_lib.make_meta_step, step_lib.make_per_step_meta_step)
  if step_lib.meta_program(method) == 'per_step':
    jit = jit or functools.partial(jax.jit, compiler_options=options)
    return make[1](cohort, method, optimizer()[1], AUG, seed=0, jit=jit)
  return jax.jit(
      make[0](cohort, method, optimizer()[1], AUG, seed=0),
      donate_argnums=0 if donate else (),
      compiler_options=options,
  )


def time_step(train_step, state, data, steps: int, warmup: int = 2):
  t0 = time.perf_counter()
  state, metrics = train_step(state, data, None)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = train_step(state, data, None)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, data, None)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) * 1e3)
  return compile_s, times, state


def breakdown(cohort, state, data, steps: int, fast_path: bool) -> dict:
  """Median ms of the step's parts, each jitted on its own: augmentation + forward of all peers
  (train mode), forward + backward (CE of every peer), and the full step is timed by the caller."""
  from mcl_jax import augment, losses  # pylint: disable=g-import-not-at-top

  options = step_lib.compiler_options(enabled=fast_path)
  images = augment.augment_batch(
      data['image'], jax.random.key(0), mean=(0.5,) * 3, std=(0.25,) * 3, pad=4, flip=True
  )

  def forward(params):
    out, _ = cohort.apply(params, state.batch_stats, images, train=True)
    return losses.ce_loss(out['logits'], data['label'])

  parts = {
      'forward': jax.jit(forward, compiler_options=options),
      'forward_backward': jax.jit(jax.grad(forward), compiler_options=options),
  }
  out = {}
  for name, fn in parts.items():
    jax.block_until_ready(fn(state.params['peers']))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state.params['peers']))
      times.append((time.perf_counter() - t0) * 1e3)
    out[f'{name}_ms_median'] = round(statistics.median(times), 1)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--arch', default='resnet32')
  ap.add_argument('--peers', type=int, default=2)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--method', default='independent')
  ap.add_argument('--strategy', default='auto', choices=cohort_lib.STRATEGIES)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument(
      '--no-fast-path',
      action='store_true',
      help='compile without the XLA:CPU option of mcl_jax.step.CPU_COMPILER_OPTIONS',
  )
  ap.add_argument(
      '--no-cpu-kernels',
      action='store_true',
      help="lax's convolutions only (not mcl_jax.kernels' native weight gradients)",
  )
  ap.add_argument(
      '--breakdown', action='store_true', help='also time forward and forward+backward alone'
  )
  args = ap.parse_args(argv)
  cohort, state, train_step, data = build_step(
      args.arch,
      args.peers,
      args.method,
      args.strategy,
      args.batch,
      fast_path=not args.no_fast_path,
      cpu_kernels=not args.no_fast_path and not args.no_cpu_kernels,
  )
  parts = (
      breakdown(cohort, state, data, args.steps, not args.no_fast_path) if args.breakdown else {}
  )
  compile_s, times, _ = time_step(train_step, state, data, args.steps, args.warmup)
  print(
      json.dumps(
          {
              **parts,
              'arch': args.arch,
              'peers': args.peers,
              'batch': args.batch,
              'method': args.method,
              'strategy': args.strategy,
              'resolved_strategy': cohort.strategy,
              'backend': jax.default_backend(),
              'fast_path': not args.no_fast_path,
              'cpu_kernels': not args.no_fast_path
              and not args.no_cpu_kernels
              and kernels.available(),
              'step_ms_median': round(statistics.median(times), 1),
              'step_ms_min': round(min(times), 1),
              'compile_s': round(compile_s, 1),
              'steps': args.steps,
              'img_per_s': round(args.batch * 1e3 / statistics.median(times), 1),
          }
      )
  )


if __name__ == '__main__':
  main()
