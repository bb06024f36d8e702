"""Evaluate a checkpoint: `python -m mcl_jax.evaluate --workdir DIR [--step N] [--split test]`.

Rebuilds the run from its own `config.json`, restores the newest valid checkpoint (or the one of
step N, from the `latest` or the `best` series) and prints one JSON line with the step, the split
and the metrics under the names of `metrics.jsonl`: `eval/peer_<k>/top1`, `eval/peer_<k>/top5`,
`eval/ensemble/top1`, `eval/best_peer/top1`. On the test split these equal the values logged at
that step.
"""

from __future__ import annotations

import argparse
import json
import os

import ml_collections

from mcl_jax import checkpoint as ckpt_lib, cli, plugins, train, workdir as workdir_lib

SPLITS = ('test', 'train')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config (`<workdir>/config.json`, written by `train.run`: the config in effect, with
  any accepted change recorded in `config_changes.jsonl`, see mcl_jax.workdir)."""
  workdir_lib.require(workdir, workdir_lib.CONFIG_NAME)  # WorkdirError naming what is missing
  path = os.path.join(workdir, workdir_lib.CONFIG_NAME)
  plugins.load(workdir)  # the user methods / models / data sets the run was trained with
  with open(path) as f:
    return ml_collections.ConfigDict(train.upgrade_saved_config(json.load(f)))


def restore(workdir: str, step: int | None = None):
  """(experiment, state) of the run in `workdir` at `step` (None: the newest valid checkpoint).

  Raises CheckpointError when there is no such checkpoint or it cannot be restored, WorkdirError
  when `workdir` is not a run; reads only (creates nothing in the workdir).
  """
  config = load_config(workdir)
  saved = workdir_lib.saved_steps(workdir)
  if not saved:
    raise ckpt_lib.CheckpointError(
        f'{workdir} holds no checkpoint yet; train first (or longer) with '
        f'`python -m mcl_jax.main --workdir {workdir} ...`.'
    )
  if step is not None and step not in saved:
    raise ckpt_lib.CheckpointError(
        f'No checkpoint of step {step} in {os.path.join(workdir, "checkpoints")}; saved steps: '
        f'{saved}.'
    )
  exp = train.Experiment(config)
  ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(config), async_save=False)
  try:
    abstract = exp.abstract_state_with_shardings()
    restored = ckpt.restore_latest(abstract) if step is None else ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  if restored is None:
    raise ckpt_lib.CheckpointError(
        f'{workdir} holds no checkpoint yet; train first with '
        f'`python -m mcl_jax.main --workdir {workdir} ...`.'
    )
  return exp, restored[0]


def evaluate(workdir: str, step: int | None = None, split: str = 'test') -> dict:
  """{'step', 'split', 'eval/...' metrics} of the checkpoint of `step` on `split`."""
  if split not in SPLITS:
    raise ValueError(f'--split={split!r}: must be one of {SPLITS}.')
  exp, state = restore(workdir, step)
  dataset = exp.test_data if split == 'test' else exp.train_data
  return {'step': int(state.step), 'split': split, **exp.evaluate(state, dataset)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='run directory (holds config.json)')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--split', default='test', choices=SPLITS)
  args = parser.parse_args(argv)
  with cli.user_errors(
      'mcl_jax.evaluate', ckpt_lib.CheckpointError, workdir_lib.WorkdirError, OSError, ValueError
  ):
    print(json.dumps(evaluate(args.workdir, args.step, args.split)), flush=True)


if __name__ == '__main__':
  main()
