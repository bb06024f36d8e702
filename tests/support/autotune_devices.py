"""Helper of tests/test_autotune.py, run in a subprocess with 8 fake CPU devices:

    MCL_JAX_AUTOTUNE_CACHE=CACHE.json python tests/support/autotune_devices.py WORKDIR OUT.json

Trains 2 steps of MCL with K = 4 ResNet-8 peers on a 4 x 2 ('data', 'peer') mesh with
`cohort.strategy=autotune`, then builds the same run with `auto`, and writes to OUT.json the
workdir's autotune.json, the strategies in the cache, what `auto` chose and from where, and the
number of steps done.
"""

import json
import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import tiny_config  # pylint: disable=g-import-not-at-top
from mcl_jax import autotune, train  # pylint: disable=g-import-not-at-top


def config(strategy: str):
  return tiny_config(
      **{
          'method.name': 'mcl',
          'cohort.num_peers': 4,
          'cohort.strategy': strategy,
          'mesh.data': 4,
          'mesh.peer': 2,
          'batch_size': 16,
          'total_steps': 2,
          'eval_every_steps': 2,
          'data.eval_examples': 32,
          'data.eval_batch_size': 16,
      }
  )


def main():
  workdir, out = sys.argv[1], sys.argv[2]
  train.run(config('autotune'), workdir)
  with open(os.path.join(workdir, autotune.WORKDIR_NAME)) as f:
    record = json.load(f)
  with open(autotune.cache_path()) as f:
    cached = [entry['strategy'] for entry in json.load(f).values()]
  auto = train.Experiment(config('auto'))
  step = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints', 'latest')))
  result = {
      'devices': jax.device_count(),
      'record': record,
      'cached': cached,
      'auto': [auto.cohort.strategy, auto.tuning.source],
      'steps_done': step,
  }
  with open(out, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main()
