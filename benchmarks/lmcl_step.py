r"""Times our L-MCL train step and meta step the way the authors' comparator times theirs.

    python benchmarks/lmcl_step.py --arch resnet32 --peers 2 --batch 128 --steps 10

The comparator is a standalone script outside this repository that runs the authors' own
L-MCL code (winycg/L-MCL, `main_layer_mcl_cifar_meta.py`) on CPU; benchmarks/suite.py runs both
interleaved. Prints one JSON line with its keys: `train_step_ms_median` (the jitted L-MCL train
step: augmentation, every peer with its auxiliary branches, the loss with the meta-learned layer
weights, backward, SGD-Nesterov), `meta_step_ms_median` (the jitted, donated meta step: 2 virtual
contrastive steps + 1 CE step and the exact hyper-gradient of phi, as the loop runs it after the
train step every `meta_every_steps`), `meta_over_train` and `amortised_step_ms_at_50` (train +
meta / 50, the authors' meta_freq). Fixed random CIFAR-shaped batch with two images per class (the
authors' MPerClassSampler, m = 2), as benchmarks/cohort_step.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax

from cohort_step import build_meta_step, build_step, time_step
from mcl_jax import methods, step as step_lib
from timing import loadavg


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--arch', default='resnet32')
  ap.add_argument('--peers', type=int, default=2)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--strategy', default='auto')
  ap.add_argument('--steps', type=int, default=10, help='timed train steps')
  ap.add_argument('--meta-steps', type=int, default=None, help='timed meta steps (--steps)')
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--every', type=int, default=50, help='meta_every_steps of the amortised cost')
  ap.add_argument(
      '--meta-program',
      default=None,
      choices=('auto', 'one', 'per_step'),
      help="the meta round as one program or per step (default: the method's, auto)",
  )
  args = ap.parse_args(argv)
  meta_steps = args.steps if args.meta_steps is None else args.meta_steps
  load_start = loadavg()

  cohort, state, train_step, data = build_step(
      args.arch, args.peers, 'lmcl', args.strategy, args.batch
  )
  compile_s, train_ms, state = time_step(train_step, state, data, args.steps, args.warmup)
  method_config = methods.config(
      'lmcl', **({'meta_program': args.meta_program} if args.meta_program else {})
  )
  program = step_lib.meta_program(methods.build(method_config))
  meta_step = build_meta_step(cohort, method_config, donate=True)
  t0 = time.perf_counter()
  state = jax.block_until_ready(meta_step(state, data, None))
  meta_compile_s = time.perf_counter() - t0
  meta_ms = []
  for _ in range(meta_steps):
    t0 = time.perf_counter()
    state = jax.block_until_ready(meta_step(state, data, None))
    meta_ms.append((time.perf_counter() - t0) * 1e3)

  train, meta = statistics.median(train_ms), statistics.median(meta_ms)
  print(
      json.dumps(
          {
              'framework': 'jax',
              'impl': 'mcl_jax lmcl',
              'arch': args.arch,
              'peers': args.peers,
              'batch': args.batch,
              'strategy': cohort.strategy,
              'backend': jax.default_backend(),
              'train_step_ms_median': round(train, 2),
              'meta_step_ms_median': round(meta, 2),
              'meta_over_train': round(meta / train, 2),
              f'amortised_step_ms_at_{args.every}': round(train + meta / args.every, 2),
              'train_compile_s': round(compile_s, 1),
              'meta_program': program,
              # the first meta step: its compile (every program of it) and one run
              'meta_compile_s': round(meta_compile_s, 1),
              'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              'steps': len(train_ms),
              'meta_steps': len(meta_ms),
              'train_step_ms_all': [round(t, 1) for t in train_ms],
              'meta_step_ms_all': [round(t, 1) for t in meta_ms],
              'loadavg_start': load_start,
              'loadavg_end': loadavg(),
          }
      )
  )


if __name__ == '__main__':
  main()
