"""Entry point: `python -m mcl_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.k=v]`.

Running again with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/fashion_mnist_mcl.py:smoke',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', os.environ.get('MCL_JAX_DISTRIBUTED', '0') == '1',
    'Call jax.distributed.initialize() (multi-host; also MCL_JAX_DISTRIBUTED=1).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('Both --config and --workdir are required.')
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from mcl_jax import checkpoint, config_lib, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, FileNotFoundError, checkpoint.CheckpointError,
          train.NonFiniteLossError, OSError) as e:
    print(f'mcl_jax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
