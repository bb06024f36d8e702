r"""Self-supervised MCL on ImageNet (Yang et al., the paper's self-supervised experiment): two
ResNet-18 MoCo learners teaching each other, no labels; docs/methods.md#self-supervised-mcl.

    python -m mcl_jax.main --config configs/imagenet_moco_mcl.py \
        --workdir gs://BUCKET/moco_mcl_r18 --config.data.data_dir=$TFDS_DATA_DIR
    python -m mcl_jax.main --config configs/imagenet_moco_mcl.py:peers=1 \
        --workdir gs://BUCKET/moco_r18 --config.data.data_dir=$TFDS_DATA_DIR   # MoCo baseline

then the protocol, a linear classifier on the frozen backbone of peer 0 (mcl_jax/linear_eval.py,
configs/linear_eval.py: SGD lr 30, 100 epochs, x0.1 at 60 and 80):

    python -m mcl_jax.linear_eval --workdir gs://BUCKET/moco_mcl_r18 --peer 0

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record`. The
authors' recipe: batch 256, SGD lr 0.03, momentum 0.9 (no Nesterov), weight decay 1e-4, 200
epochs, lr x0.1 at epochs 120 and 160; MoCo v1 views (RandomResizedCrop 224 with area 0.2-1,
greyscale p 0.2, colour jitter 0.4/0.4/0.4/0.4, flip); D 128, a queue of 65,536 keys, key
momentum 0.999, tau 0.07, kd_T 3, all four loss weights 1, shuffle-BN (BatchNorm over 8
sub-batches of 32, as their 8 GPUs).

The two crops of every image are drawn on the host from the full-resolution image (the method's
`host_views`: the grain pipeline, seeded from the run's seed and the stream position, so a resumed
run sees the same views); the colour part of the views runs on device. The untrained classifiers
are what the loop's evaluation measures (`knn_bank_examples=0`: the kNN evaluation needs in-memory
data): the number to read is the linear evaluation's.

Reported linear-evaluation top-1 on ImageNet (the paper): MoCo ResNet-18 47.45 +- 0.11, MCL(x2)
48.04 +- 0.13 (peer 0). Not reproduced here (no ImageNet on this machine).

Arguments (`--config configs/imagenet_moco_mcl.py:peers=1,seed=1`): arch (resnet18 or any
single-branch ImageNet net of the zoo), peers (1 = MoCo, 2 = MCL), seed, smoke. Method keys go on
the command line, e.g. `--config.method.mlp_head=True`.
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(arg, arch='resnet18', peers=2, seed=0, smoke=False)
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.model.arch = args['arch']
  c.cohort.num_peers = args['peers']
  c.method = methods.config(
      'moco_mcl',
      tau=0.07,
      kd_T=3.0,
      queue_size=65536,
      key_momentum=0.999,
      embed_dim=128,
      bn_groups=8,
      augmentation='v1',
      knn_bank_examples=0,  # streamed data: no kNN bank
  )
  config_lib.set_sgd(
      c,
      batch_size=256,
      epochs=200,
      lr=0.03,
      weight_decay=1e-4,
      nesterov=False,
      schedule='multistep',
      milestones=(120, 160),
  )
  # The classifiers are not trained: evaluate them rarely (a check that the run is alive).
  c.eval_every_steps = 50000
  return config_lib.finish(c, args['smoke'])
