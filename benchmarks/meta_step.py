r"""Cost of L-MCL's meta step (mcl_jax.meta, docs/methods.md#l-mcl-meta-step) against an ordinary step.

    python benchmarks/meta_step.py --arch resnet8 --peers 2 --batch 64 --steps 3

Prints one JSON line: median ms of an MCL train step, an L-MCL train step, an L-MCL meta step
(with each `method.meta_second_order`, the default first) and an L-MCL train step with the meta
step fused in behind `lax.cond` (not taken); the meta step's cost relative to the MCL step; the
amortised overhead of meta every `--every` steps; and the peak temporary memory of the compiled
hyper-gradient with and without `jax.checkpoint` per virtual step (`compiled.memory_analysis()`).
Fixed random CIFAR-shaped batch, as benchmarks/cohort_step.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from cohort_step import AUG, build_meta_step, build_step, optimizer, time_step
from mcl_jax import config_lib, meta, methods, step as step_lib


def time_calls(fn, steps: int):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--arch', default='resnet8')
  ap.add_argument('--peers', type=int, default=2)
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--strategy', default='auto')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--every', type=int, default=50)
  args = ap.parse_args(argv)
  options = step_lib.compiler_options()

  _, state, mcl_step, data = build_step(args.arch, args.peers, 'mcl', args.strategy, args.batch)
  mcl_ms = statistics.median(time_step(mcl_step, state, data, args.steps, warmup=1)[1])

  cohort, state, lmcl_step, data = build_step(
      args.arch, args.peers, 'lmcl', args.strategy, args.batch
  )
  compile_s, times, state = time_step(lmcl_step, state, data, args.steps, warmup=1)
  lmcl_ms = statistics.median(times)
  method_config = methods.config('lmcl')
  method = methods.build(method_config)
  default_order = method_config.meta_second_order
  tx, schedule = optimizer()  # those of build_step
  meta_ms_by_order = {}
  for order in sorted(meta.SECOND_ORDER, key=lambda o: o != default_order):
    order_config = config_lib.ml_collections.ConfigDict(method_config)
    order_config.meta_second_order = order
    meta_step = build_meta_step(cohort, order_config)
    meta_ms_by_order[order] = time_calls(lambda: meta_step(state, data, None), args.steps)
  meta_ms = meta_ms_by_order[default_order]

  # The alternative: meta fused into the train step behind lax.cond (here never taken).
  train_fn = step_lib.make_train_step(cohort, method, tx, schedule, AUG, seed=0)
  meta_fn = step_lib.make_meta_step(cohort, method, schedule, AUG, seed=0)

  def fused(state, batch):
    state, metrics = train_fn(state, batch, None)
    do_meta = (state.step - 1) % 1_000_000 == 1  # never true in the timed steps
    state = jax.lax.cond(do_meta, lambda s: meta_fn(s, batch, None), lambda s: s, state)
    return state, metrics

  fused_step = jax.jit(fused, compiler_options=options)
  fused_ms = time_calls(lambda: fused_step(state, data), args.steps)

  # Peak temporary memory of the hyper-gradient with / without remat of each virtual step.
  batch, _ = step_lib.augmented_batch(data, state.step, 0, AUG)
  theta0, inner, outer = method.meta_objectives(state, batch, cohort)
  temp_mb = {}
  for order in meta.SECOND_ORDER:
    for remat in (True, False):
      compiled = (
          jax.jit(
              lambda phi, theta, r=remat, o=order: meta.hypergradient(
                  phi,
                  theta,
                  inner,
                  outer,
                  lr=0.05,
                  weight_decay=5e-4,
                  momentum=0.9,
                  inner_steps=2,
                  remat=r,
                  second_order=o,
              ),
              compiler_options=options,
          )
          .lower(state.method_state['phi'], theta0)
          .compile()
      )
      temp_mb[f"{order}/{'remat' if remat else 'no_remat'}"] = round(
          compiled.memory_analysis().temp_size_in_bytes / 2**20, 1
      )

  print(
      json.dumps(
          {
              'arch': args.arch,
              'peers': args.peers,
              'batch': args.batch,
              'strategy': cohort.strategy,
              'backend': jax.default_backend(),
              'mcl_step_ms': round(mcl_ms, 1),
              'lmcl_step_ms': round(lmcl_ms, 1),
              'meta_step_ms': round(meta_ms, 1),
              **{f'meta_step_ms/{o}': round(ms, 1) for o, ms in meta_ms_by_order.items()},
              'lmcl_step_with_cond_ms': round(fused_ms, 1),
              'meta_over_mcl_step': round(meta_ms / mcl_ms, 2),
              'meta_over_lmcl_step': round(meta_ms / lmcl_ms, 2),
              f'amortised_meta_overhead_every_{args.every}': round(
                  meta_ms / (args.every * lmcl_ms), 3
              ),
              'hypergrad_temp_mib': temp_mb,
              'lmcl_compile_s': round(compile_s, 1),
          }
      )
  )


if __name__ == '__main__':
  main()
