r"""The peer axis as shard_map vs left to jit's partitioner, on 8 fake CPU devices.

    python benchmarks/sharded_step.py [ROUNDS]

Memory-bank MCL, K = 4 ResNet-8 peers, Fashion-MNIST, batch 64, meshes (4, 2) and (2, 4), cohort
strategies unroll and vmap, `mesh.peer_shard_map` True / False; plus the 1-device step of the same
config as the reference. Every step is built first, then timed round-robin (ROUNDS rounds of 3
steps). Prints one JSON line per variant: median step ms and the ratio to the 1-device step.

The 8 "devices" are threads of one 2-core CPU here, so this measures the programs' overheads, not
a speed-up: what it can show is whether the shard_map program costs more than the partitioned
one. Re-run on real accelerators before choosing from it there.
"""

import json
import os
import statistics
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from conftest import tiny_config  # pylint: disable=g-import-not-at-top
from mcl_jax import train  # pylint: disable=g-import-not-at-top
from timing import time_round_robin, warm_up  # pylint: disable=g-import-not-at-top

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4


def config(data, peer, strategy, shard_map):
  return tiny_config(
      **{
          'method.name': 'mcl',
          'method.memory_bank': True,
          'method.num_negatives': 256,
          'method.embed_dim': 64,
          'cohort.num_peers': 4,
          'cohort.strategy': strategy,
          'mesh.data': data,
          'mesh.peer': peer,
          'mesh.peer_shard_map': shard_map,
          'batch_size': 64,
          'data.train_examples': 2048,
      }
  )


def main():
  variants = {'1 device, unroll': (config(1, 1, 'unroll', True), jax.devices()[:1])}
  for data, peer in ((4, 2), (2, 4)):
    for strategy in ('unroll', 'vmap'):
      for shard_map in (True, False):
        label = f"{data}x{peer} {strategy} {'shard_map' if shard_map else 'partitioner'}"
        variants[label] = (config(data, peer, strategy, shard_map), jax.devices())
  runs, compile_s = {}, {}
  for label, (cfg, devices) in variants.items():
    exp = train.Experiment(cfg, devices=devices)
    state, compile_s[label] = warm_up(exp, exp.init_state())
    runs[label] = (exp, state)
  times = time_round_robin(runs, ROUNDS)
  base = statistics.median(times['1 device, unroll'])
  for label, seconds in times.items():
    ms = 1e3 * statistics.median(seconds)
    print(
        json.dumps(
            {
                'variant': label,
                'step_ms_median': round(ms, 1),
                'relative_to_1_device': round(ms / (1e3 * base), 2),
                'compile_and_2_steps_s': round(compile_s[label], 1),
            }
        )
    )


if __name__ == '__main__':
  main()
