"""The L-MCL meta step on a (data 4, peer 2) mesh of 8 fake CPU devices, as one program and per
step, against the per-step meta step on 1 device (run by tests/test_methods_lmcl.py in a
subprocess, which reads the JSON this writes to argv[1]).

Every meta step starts from the same state: a fresh one at step 1 (the meta step follows a train
step; no train step is run, to save its compile). The 1-device reference is the per-step round,
which compiles in less time than the one program; tests/test_methods_lmcl.py checks the two
programs against each other on 1 device. float64 (model and state) and the sharding tests' data
(no zero-padded crop, fixed noise): sharding reorders the reductions, and a ReLU input tied at 0
flips its gradient on round-off, which would move the hyper-gradient by far more than round-off
(tests/support/sharding_equivalence.py). Per program: the largest difference of phi's movement
from the reference's (and from the one program's on the mesh), relative to the reference's
largest, whether every other leaf of the state is unchanged, and whether every leaf keeps its mesh
placement. The method's own parameters (embedding heads, phi) stay float32 in a float64 model, so
the mesh's reordered sums move phi by up to ~1e-4 of its movement (measured 1.9e-6 for both
programs from this fresh state, 6.4e-5 from a trained one); the two programs on one mesh agree to
~1e-8 (measured 8.1e-9).
"""

import json
import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_enable_x64', True)

import numpy as np  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import tiny_config  # pylint: disable=g-import-not-at-top
from mcl_jax import train  # pylint: disable=g-import-not-at-top

# The sharding tests' data: no zero-padded crop, fixed noise (no ReLU ties at exactly 0).
from support.sharding_equivalence import NO_CROP, with_noise  # pylint: disable=g-import-not-at-top


def config(program: str, data: int, peer: int):
  return tiny_config(
      **{
          'method.name': 'lmcl',
          'method.meta_program': program,
          'method.embed_dim': 16,
          'mesh.data': data,
          'mesh.peer': peer,
          'batch_size': 16,
          'data.train_examples': 128,
          'data.name': NO_CROP,
          'model.dtype': 'float64',
      }
  )


def experiment(program: str, devices, data: int, peer: int):
  exp = train.Experiment(config(program, data, peer), devices=devices)
  exp.train_data = with_noise(exp.train_data)
  return exp


def meta_round(exp, host_state):
  """(phi's movement, the rest unchanged, placements kept) of a meta step from `host_state`."""
  state = jax.device_put(host_state, exp.state_sharding)
  after = exp.meta_step(state, exp.batch(0), exp.frozen)
  rest_same = all(
      np.array_equal(np.asarray(a), b)
      for name in ('params', 'batch_stats', 'opt_state')
      for a, b in zip(
          jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(host_state, name))
      )
  )
  placed = all(
      a.sharding.is_equivalent_to(s, a.ndim)
      for a, s in zip(jax.tree.leaves(after), jax.tree.leaves(exp.state_sharding))
  )
  moved = [
      np.asarray(a) - b
      for a, b in zip(
          jax.tree.leaves(after.method_state['phi']),
          jax.tree.leaves(host_state.method_state['phi']),
      )
  ]
  return moved, rest_same, placed


def main():
  # A fresh state at step 1 (as after the first train step); every meta step below starts from it.
  single = experiment('per_step', jax.devices()[:1], 1, 1)
  host_state = jax.device_get(single.init_state().replace(step=np.asarray(1, np.int32)))
  reference, _, _ = meta_round(single, host_state)
  scale = max(float(np.max(np.abs(m))) for m in reference)
  difference = lambda x, y: max(  # noqa: E731
      float(np.max(np.abs(a - b))) / scale for a, b in zip(x, y)
  )
  results, on_mesh = [], {}
  for program in ('one', 'per_step'):
    moved, rest_same, placed = meta_round(experiment(program, jax.devices(), 4, 2), host_state)
    on_mesh[program] = moved
    results.append(
        {
            'program': program,
            'devices': jax.device_count(),
            'phi_moved_scale': scale,
            'relative_difference': difference(moved, reference),
            'relative_difference_to_one_on_mesh': difference(moved, on_mesh['one']),
            'rest_unchanged': rest_same,
            'placements_kept': placed,
        }
    )
  with open(sys.argv[1], 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main()
