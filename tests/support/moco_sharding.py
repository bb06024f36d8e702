"""Helper of tests/test_methods_moco.py, run in a subprocess with 8 fake CPU devices:

    python tests/support/moco_sharding.py OUT.json

Trains 2 steps of self-supervised MCL (K = 2, ResNet-8, batch 16, 4 BatchNorm sub-batches,
float64) on the meshes data x peer = 4x2 and 8x1 and on 1 device, with the helpers of
sharding_equivalence.py, and writes per mesh the largest relative state and metric differences
to the 1-device run (free 2-step trajectory and forced single steps), the trace count, whether
an Orbax round trip restores the state exactly, and the placements of the method state.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharding_equivalence as se  # pylint: disable=g-import-not-at-top  (8 devices, x64)

import jax  # pylint: disable=g-import-not-at-top

from mcl_jax import methods  # pylint: disable=g-import-not-at-top


def moco_config(data: int, peer: int):
  """sharding_equivalence's run (K = 2, float64, noisy un-cropped images) with this method."""
  config = se.mcl_config(2, 'unroll', data, peer)
  config.method = methods.config(
      'moco_mcl',
      queue_size=32,
      bn_groups=4,
      augmentation='grey',
      embed_dim=16,
      key_momentum=0.9,
      knn_bank_examples=0,
  )
  return config


def main():
  steps = 2
  reference = se.train_steps(moco_config(1, 1), jax.devices()[:1], steps)
  results = {}
  for data, peer in ((4, 2), (8, 1)):
    run = se.train_steps(moco_config(data, peer), jax.devices(), steps, reference['states'])
    forced = [
        max(se.state_diffs(state, reference['states'][t + 1]).values())
        for t, (state, _) in enumerate(run['forced'])
    ]
    results[f'{data}x{peer}'] = dict(
        free=max(se.state_diffs(run['state'], reference['state']).values()),
        forced=max(forced),
        metrics=se.metric_diff(run['metrics'], reference['metrics']),
        traces=run['traces'],
        restored_equal=run['restored_equal'],
        placements={
            k: v for k, v in run['placements']['final'].items() if k.startswith('.method_state')
        },
    )
  with open(sys.argv[1], 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main()
