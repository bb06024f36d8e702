r"""ImageNet MCL with per-peer memory banks (Yang et al., AAAI 2022),
docs/methods.md#mcl-memory-bank and docs/methods.md#recipes.

    python -m mcl_jax.main --config configs/imagenet_mcl.py:arch=resnet18,peers=2 \
        --workdir gs://BUCKET/mcl_r18x2 --config.data.data_dir=$TFDS_DATA_DIR

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record` (tar files
in $TFDS_DATA_DIR/downloads/manual first). Arguments: arch (resnet18 | resnet34 | any ImageNet
net of the zoo), peers (2 | 4), logit_kd, baseline (one network, CE only: the baseline column,
and the teacher runs of configs/imagenet_ckd.py / imagenet_crcd.py), seed, smoke.

Expected top-1 (the paper's README): ResNet-18 69.76 -> 70.32 (x2), 70.77 (x4), 70.82 (x4+KD);
ResNet-34 73.30 -> 74.13 (x2), 74.34 (x4). Not reproduced here (no ImageNet on this machine).
Training streams ImageNet through grain (`mcl_jax/data/streaming.py`, sharded per process);
the memory bank's class index reads the training labels once and caches them in the workdir.
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, arch='resnet18', peers=2, logit_kd=False, baseline=False, seed=0, smoke=False
  )
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.model.arch = args['arch']
  c.cohort.num_peers = 1 if args['baseline'] else args['peers']
  c.method = methods.config(
      'mcl',
      tau=0.07,
      memory_bank=True,
      num_positives=1,
      num_negatives=8192,
      memory_momentum=0.5,
      logit_kd=args['logit_kd'],
  )
  if args['baseline']:
    c.method = methods.config('independent')
  config_lib.set_sgd(
      c,
      batch_size=256,
      epochs=90,
      lr=0.1,
      weight_decay=1e-4,
      nesterov=True,
      schedule='multistep',
      milestones=(30, 60),
  )
  return config_lib.finish(c, args['smoke'])
