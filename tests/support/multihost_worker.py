"""One process of the two-process run of tests/test_multihost.py (jax.distributed over localhost).

    python tests/support/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STOP_AFTER_STEPS

Each process has 4 fake CPU devices; the mesh (data=4, peer=2) spans both processes on `data`.
Trains (or resumes) memory-bank MCL in WORKDIR through `mcl_jax.train.run`, stopping after
STOP_AFTER_STEPS steps of this invocation, and prints one JSON line: the process index and counts,
and a checksum of the final params / memory computed on the devices (identical on every process).
"""

from __future__ import annotations

import json
import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # cross-process CPU collectives


def main():
  process_id, num_processes, port, workdir, stop_after = sys.argv[1:6]
  jax.distributed.initialize(
      f'localhost:{port}', num_processes=int(num_processes), process_id=int(process_id)
  )
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from support import tiny_config  # pylint: disable=g-import-not-at-top
  from mcl_jax import checkpoint as ckpt_lib, sharding, train  # pylint: disable=g-import-not-at-top

  config = tiny_config(
      **{
          'method.name': 'mcl',
          'method.memory_bank': True,
          'method.num_negatives': 16,
          'method.embed_dim': 16,
          'cohort.num_peers': 2,
          'cohort.strategy': 'unroll',
          'mesh.peer': 2,
          'batch_size': 16,
          'total_steps': 4,
          'data.train_examples': 128,
          'data.eval_examples': 32,
          'data.eval_batch_size': 16,
          'optim.lr': 0.01,
          'eval_every_steps': 4,
          'log_every_steps': 1,
      }
  )
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  saved = [int(d) for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
  train.run(config, workdir, stop_after_steps=int(stop_after))

  # Read back what was checkpointed, in its shardings, and summarise it on the devices.
  exp = train.Experiment(config)
  ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(config))
  state, _ = ckpt.restore_latest(exp.abstract_state_with_shardings())
  ckpt.close()
  checksum = jax.jit(
      lambda t: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(t)),
      out_shardings=exp.replicated,
  )
  print(
      'RESULT '
      + json.dumps(
          dict(
              process_index=jax.process_index(),
              resumed_from=max(saved, default=0),
              process_count=jax.process_count(),
              devices=jax.device_count(),
              local_devices=jax.local_device_count(),
              mesh=dict(exp.mesh.shape),
              step=int(jax.device_get(state.step)),
              params=float(checksum(state.params)),
              memory=float(checksum(state.method_state['memory'])),
              memory_spec=str(state.method_state['memory'].sharding.spec),
              memory_local_shape=list(
                  state.method_state['memory'].addressable_shards[0].data.shape
              ),
              batch_rows=sharding.process_rows(exp.batch_sharding, config.batch_size).tolist(),
          )
      ),
      flush=True,
  )
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
