r"""The `moco_mcl` train step relative to a supervised MCL step at the same K and batch, and to
K = 1 (MoCo), in one process.

    python benchmarks/moco_step.py [--rounds 4] [--steps 3] [--shapes fashion_mnist,rgb32]

Two shapes, batch 128, each with `moco_mcl` K = 1, `moco_mcl` K = 2 and `mcl` K = 2:

* `fashion_mnist`: configs/fashion_mnist_moco_mcl.py (ResNet-8, 28x28x1, grey views, a queue of
  4,096) against configs/fashion_mnist_mcl.py (pad-2 crop + flip, the method's defaults);
* `rgb32`: the same configs with ResNet-32 on random 32x32x3 images of 100 classes (a registered
  in-memory source with CIFAR's pad-4 crop + flip), MoCo v1 views (colour jitter with hue).

A `moco_mcl` step augments two views on device, runs every peer's query encoder on one (with
BatchNorm over 8 sub-batches) and its key encoder on the other (forward only), and scores each
query against K queues; an `mcl` step runs every peer once. Every jitted step is built and warmed
up first, then all six are timed round-robin (`--rounds` rounds of `--steps` steps each), so
drifts of a shared machine hit them alike. Prints one JSON line: the median step ms of each, the
ratios moco(K=2) / mcl(K=2) and moco(K=2) / moco(K=1) per shape, and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'configs'))
import fashion_mnist_mcl  # pylint: disable=g-import-not-at-top
import fashion_mnist_moco_mcl  # pylint: disable=g-import-not-at-top
from mcl_jax import data, train  # pylint: disable=g-import-not-at-top
from timing import loadavg, time_round_robin, warm_up  # pylint: disable=g-import-not-at-top

RGB32 = 'bench_rgb32'
# shape -> (arch, data set, MoCo recipe)
SHAPES = {
    'fashion_mnist': ('resnet8', 'fashion_mnist', 'grey'),
    'rgb32': ('resnet32', RGB32, 'v1'),
}
RUNS = (('moco_mcl', 1), ('moco_mcl', 2), ('mcl', 2))


def register_rgb32(count: int = 2560) -> None:
  """Random uint8 32x32x3 images, 100 classes, CIFAR's on-device augmentation."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (count, 32, 32, 3), np.uint8)
  labels = np.arange(count) % 100
  source = data.InMemorySource(
      RGB32,
      train=(images, labels),
      test=(images[:256], labels[:256]),
      num_classes=100,
      crop_padding=4,
      flip=True,
  )
  data.register(RGB32, source, replace=True)


def config_for(shape: str, method: str, peers: int):
  arch, data_name, recipe = SHAPES[shape]
  if method == 'moco_mcl':
    config = fashion_mnist_moco_mcl.get_config(f'peers={peers}')
    config.method.augmentation = recipe
    config.method.knn_bank_examples = 0  # no kNN bank: only the train step is timed
  else:
    config = fashion_mnist_mcl.get_config(f'method={method},peers={peers}')
  config.model.arch, config.data.name = arch, data_name
  return config


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=4)
  ap.add_argument('--steps', type=int, default=3, help='steps per run per round')
  ap.add_argument('--shapes', default=','.join(SHAPES), help=f'of {list(SHAPES)}')
  args = ap.parse_args(argv)
  shapes = [s for s in args.shapes.split(',') if s]
  register_rgb32()
  load_before = loadavg()
  runs, compile_s = {}, {}
  for shape in shapes:
    for method, peers in RUNS:
      label = f'{shape}/{method}_k{peers}'
      exp = train.Experiment(config_for(shape, method, peers))
      state, seconds = warm_up(exp, exp.init_state())
      runs[label], compile_s[label] = (exp, state), round(seconds, 1)
      print(f'built {label} ({seconds:.1f} s for compile + 2 steps)', file=sys.stderr, flush=True)
  times = time_round_robin(runs, args.rounds, args.steps)
  median = {label: round(1e3 * statistics.median(t), 1) for label, t in times.items()}
  ratios = {}
  for shape in shapes:
    moco1, moco2, mcl2 = (median[f'{shape}/{m}_k{k}'] for m, k in RUNS)
    ratios[f'{shape}/moco_k2_over_mcl_k2'] = round(moco2 / mcl2, 2)
    ratios[f'{shape}/moco_k2_over_moco_k1'] = round(moco2 / moco1, 2)
  print(
      json.dumps(
          {
              'benchmark': 'moco_step',
              'date': datetime.date.today().isoformat(),
              'batch': 128,
              'step_ms_median': median,
              'ratios': ratios,
              'warm_up_s': compile_s,
              'rounds': args.rounds,
              'steps_per_round': args.steps,
              'loadavg_before': load_before,
              'loadavg_after': loadavg(),
          }
      )
  )


if __name__ == '__main__':
  main()
