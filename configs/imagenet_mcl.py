r"""ImageNet MCL with per-peer memory banks (Yang et al., AAAI 2022),
docs/methods.md#mcl-memory-bank and docs/methods.md#recipes.

    python -m mcl_jax.main --config configs/imagenet_mcl.py:arch=resnet18,peers=2 \
        --workdir gs://BUCKET/mcl_r18x2 --config.data.data_dir=$TFDS_DATA_DIR

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record` (tar files
in $TFDS_DATA_DIR/downloads/manual first). Arguments: arch (resnet18 | resnet34 | any ImageNet
net of the zoo), peers (the number of independent networks; default 2, or 1 with branches),
branches (1: plain networks; 2 | 3 | 4: each network is the authors' shared-trunk multi-branch net
`<arch>_okd<branches>`, conv1 .. layer2 shared and layer3, layer4, classifier per branch, its
branches the MCL peers, each with its own head and memory bank;
docs/methods.md#mcl-multi-branch-networks), logit_kd, baseline (one network, CE only: the
baseline column, and the teacher runs of configs/imagenet_ckd.py / imagenet_crcd.py), seed, smoke.

The authors' code builds MCL(x2) as two independent networks and MCL(x4) as one four-branch
network (its `--number-net 4`): the rows use `peers=2` for x2 and `branches=4` for x4; `peers=4`
trains four independent networks instead.

Expected top-1 (the paper's README): ResNet-18 69.76 -> 70.32 (x2, `peers=2`), 70.77 (x4,
`branches=4`), 70.82 (x4+KD, `branches=4,logit_kd`); ResNet-34 73.30 -> 74.13 (x2), 74.34 (x4).
Not reproduced here (no ImageNet on this machine).
Training streams ImageNet through grain (`mcl_jax/data/streaming.py`, sharded per process);
the memory bank's class index reads the training labels once and caches them in the workdir.
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg,
      arch='resnet18',
      peers=0,  # 0: 2 plain networks, or 1 multi-branch network
      branches=1,
      logit_kd=False,
      baseline=False,
      seed=0,
      smoke=False,
  )
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.model.arch, c.cohort.num_peers = config_lib.mcl_cohort(
      args['arch'], args['peers'], args['branches'], args['baseline']
  )
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
