"""Helper of tests/test_sharding.py, run in ONE subprocess with 8 fake CPU devices:

    python tests/support/sharding_equivalence.py OUT.json [--steps N] [--cases 8x1:2,4x2:4,...]

For each case "DATAxPEER:K:STRATEGY[:jit]" (":jit": the partitioner splits the peers instead of
shard_map over 'peer') trains N steps of memory-bank MCL (ResNet-8, 28x28 images, batch 16)
on that mesh and on 1 device, and writes per case the largest relative differences to the
1-device run of the state (params, BatchNorm statistics, optimizer state, memory bank) and the
metrics, twice:
- forced: every step t run on the mesh from the 1-device state t, against the 1-device step t
  (what sharding itself changes: float32 reassociation only);
- free: the mesh's own N-step trajectory against the 1-device trajectory (adds the divergence of
  two float32 trajectories through ReLU kinks, see `with_noise`);
plus the eval counts, the number of times the train step was traced, and the placements
(PartitionSpecs) of params, opt state, memory and batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import jax

jax.config.update('jax_num_cpu_devices', 8)
# float64 (model.dtype and the whole state): the forced single steps are then free of ReLU-kink
# flips (a pre-activation within float32 round-off of 0), which no float32 comparison can avoid.
X64 = '--float32' not in sys.argv
jax.config.update('jax_enable_x64', X64)

import numpy as np  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import tiny_config  # pylint: disable=g-import-not-at-top
from mcl_jax import checkpoint as ckpt_lib, sharding, step as step_lib, train  # pylint: disable=g-import-not-at-top
from mcl_jax import data as data_lib  # pylint: disable=g-import-not-at-top

# The embedded data without its zero-padded random crop, whose constant strips would be ties
# again (with_noise); the flip stays.
NO_CROP = 'fashion_mnist_nocrop'
data_lib.register(NO_CROP, dataclasses.replace(data_lib.get('fashion_mnist'), crop_padding=0))

# DATAxPEER:K:strategy. K = 2 on a 4-wide peer axis is rejected by config validation (tested).
CASES = '8x1:2:unroll,4x2:2:unroll,4x2:4:vmap,2x4:4:vmap,4x2:4:unroll:jit'
TRACES = {'train_step': 0}
_make_train_step = step_lib.make_train_step


def counting_make_train_step(*args, **kwargs):
  fn = _make_train_step(*args, **kwargs)

  def counted(*a, **k):
    TRACES['train_step'] += 1  # runs once per trace, never at execution
    return fn(*a, **k)

  return counted


step_lib.make_train_step = counting_make_train_step


def mcl_config(num_peers: int, strategy: str, data: int, peer: int, peer_shard_map: bool = True):
  return tiny_config(
      **{
          'mesh.peer_shard_map': peer_shard_map,
          'method.name': 'mcl',
          'method.memory_bank': True,
          'method.num_negatives': 16,
          'method.embed_dim': 16,
          'cohort.num_peers': num_peers,
          'cohort.strategy': strategy,
          'mesh.data': data,
          'mesh.peer': peer,
          'batch_size': 16,
          'data.train_examples': 128,
          'data.eval_examples': 32,
          'data.eval_batch_size': 16,
          'optim.lr': 0.01,
          'data.name': NO_CROP,
          'model.dtype': 'float64' if X64 else 'float32',
      }
  )


def with_noise(dataset):
  """The images plus fixed uniform noise in [0, 60). Fashion-MNIST's exactly-zero backgrounds make
  many pixels of an image share one pre-activation, so a ReLU whose input is a tie at 0 flips its
  gradient on float32 round-off: with the raw images two 1-device runs that differ only in
  reduction order (vmap vs unroll) differ by 5e-3 in one peer's BatchNorm-bias update after a
  single step (benchmarks/results/sharding.md). The noise removes the ties (and the configs turn
  off the zero-padded random crop, whose padding strips would be ties again), so the comparison
  measures sharding, not that discontinuity."""
  noise = np.random.default_rng(0).integers(0, 60, dataset.images.shape)
  images = np.clip(dataset.images.astype(np.int32) + noise, 0, 255).astype(np.uint8)
  return dataclasses.replace(dataset, images=images)


def train_steps(config, devices, steps: int, reference_states=None):
  """Trains `steps` steps. With `reference_states` (the 1-device run's host states 0..steps), also
  runs every step from the REFERENCE state t (placed in this mesh's shardings) and returns those
  'forced' results next to the free-running ones."""
  TRACES['train_step'] = 0
  exp = train.Experiment(config, devices=devices)
  exp.train_data = with_noise(exp.train_data)
  state = exp.init_state()
  placements = {'init': sharding.describe(state)}
  states, metrics, batch = [jax.device_get(state)], [], None
  for step in range(steps):
    batch = exp.batch(step)
    state, m = exp.train_step(state, batch, exp.frozen)
    metrics.append(m)
    states.append(jax.device_get(state))
  metrics = [{k: float(v) for k, v in jax.device_get(m).items()} for m in metrics]
  forced = []
  for step, ref_state in enumerate(reference_states or []):
    if step == steps:
      break
    placed = jax.device_put(ref_state, exp.state_sharding)
    new_state, m = exp.train_step(placed, exp.batch(step), exp.frozen)
    forced.append((jax.device_get(new_state), {k: float(v) for k, v in jax.device_get(m).items()}))
  evals = exp.evaluate(state)
  placements.update(final=sharding.describe(state), batch=sharding.describe(batch))
  with tempfile.TemporaryDirectory() as workdir:  # Orbax round trip straight into the shardings
    ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(config), async_save=False)
    ckpt.save(state, {'step': steps})
    restored, _ = ckpt.restore_latest(exp.abstract_state_with_shardings())
    ckpt.close()
  placements['restored'] = sharding.describe(restored)
  restored_equal = all(
      jax.tree.leaves(
          jax.tree.map(
              lambda a, b: bool(np.array_equal(a, b)),
              jax.device_get(restored),
              jax.device_get(state),
          )
      )
  )
  expected = {
      jax.tree_util.keystr(p): str(s.spec)
      for p, s in jax.tree_util.tree_leaves_with_path(exp.state_sharding)
  }
  return dict(
      state=states[-1],
      states=states,
      forced=forced,
      restored_equal=restored_equal,
      metrics=metrics,
      eval=evals,
      traces=TRACES['train_step'],
      placements=placements,
      expected=expected,
      mesh=dict(exp.mesh.shape),
  )


def state_diffs(state, ref_state) -> dict:
  return {
      part: max_rel_diff(getattr(state, part), getattr(ref_state, part))
      for part in ('params', 'batch_stats', 'opt_state', 'method_state')
  }


def metric_diff(metrics, ref_metrics) -> float:
  return max(abs(m[k] - r[k]) / (abs(r[k]) + 1e-3) for m, r in zip(metrics, ref_metrics) for k in r)


def max_rel_diff(a, b) -> float:
  """max over leaves of max|a - b| / max|b| (the error relative to the leaf's scale, which is what
  float32 reassociation produces; elementwise relative errors blow up on entries near zero)."""

  def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)) if x.size else 0.0

  return max(jax.tree.leaves(jax.tree.map(rel, a, b)) or [0.0])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--cases', default=CASES)
  parser.add_argument('--float32', action='store_true', help='model and state in float32')
  args = parser.parse_args()
  assert jax.device_count() == 8, jax.devices()
  reference, results = {}, []
  for case in args.cases.split(','):
    shape, num_peers, strategy, *program = case.split(':')  # program: [] or ['jit']
    data, peer = map(int, shape.split('x'))
    key = (int(num_peers), strategy)
    if key not in reference:
      reference[key] = train_steps(mcl_config(*key, 1, 1), jax.devices()[:1], args.steps)
    ref = reference[key]
    run = train_steps(
        mcl_config(*key, data, peer, peer_shard_map=program != ['jit']),
        jax.devices(),
        args.steps,
        reference_states=ref['states'],
    )
    free = state_diffs(run['state'], ref['state'])
    # Forced: step t of the mesh from the reference state t vs the reference step t.
    forced = [
        state_diffs(new_state, ref['states'][t + 1])
        for t, (new_state, _) in enumerate(run['forced'])
    ]
    results.append(
        dict(
            case=case,
            mesh=run['mesh'],
            restored_equal=run['restored_equal'],
            traces=run['traces'],
            ref_traces=ref['traces'],
            step=int(run['state'].step),
            forced={part: max(f[part] for f in forced) for part in free},
            forced_metrics=metric_diff([m for _, m in run['forced']], ref['metrics']),
            free=free,
            free_metrics=metric_diff(run['metrics'], ref['metrics']),
            eval=max(abs(run['eval'][k] - ref['eval'][k]) for k in ref['eval']),
            metric_names=sorted(ref['metrics'][0]),
            placements=run['placements'],
            expected=run['expected'],
        )
    )
    print(
        json.dumps(
            {
                k: v
                for k, v in results[-1].items()
                if k not in ('placements', 'expected', 'metric_names')
            }
        ),
        flush=True,
    )
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
