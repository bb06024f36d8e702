r"""ImageNet L-MCL (Yang et al., TPAMI 2023), docs/methods.md#l-mcl and docs/methods.md#recipes.

    python -m mcl_jax.main --config configs/imagenet_lmcl.py:arch=resnet34 \
        --workdir gs://BUCKET/lmcl_r34 --config.data.data_dir=$TFDS_DATA_DIR
    python -m mcl_jax.main --config configs/imagenet_lmcl.py:arch=resnet18,arch2=resnet50 \
        --workdir gs://BUCKET/lmcl_r18_r50 --config.data.data_dir=$TFDS_DATA_DIR

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record`. Arguments:
arch, arch2 (heterogeneous pair), baseline (one network of `arch`, CE only, the same recipe: the
baseline column), meta_grad, seed, smoke. S = 4 stages (branches on the outputs of
stages 1-3, one block per branch stage as the authors' ImageNet models), alpha = beta = 0.01,
gamma = lam = 1, tau 0.07, T 3, meta every 500 steps, SGD-Nesterov 0.1, wd 1e-4, batch 256,
100 epochs, x0.1 at 30, 60, 90. Contrast against per-peer memory banks as the paper
(docs/methods.md#l-mcl-memory-bank): P = 1 same-class slot, Q = 8192 negatives drawn with
replacement, momentum 0.5; every stage of peer k queries M_k, which is updated with the
final-stage embeddings. Memory: 2 x 1.28M x 128 fp32 = 1.3 GB, split P('peer', 'data') over the
mesh.

Expected top-1 (the paper's README, memory-bank variant): ResNet-34 73.68 -> 75.12;
ResNet-50 76.28 -> 78.35; ShuffleNetV2 1x (`shufflenetv2_1_0_imagenet`) 64.25 -> 65.91;
ResNet-18 & ResNet-50 69.95 & 76.28 -> 71.69 & 77.34; ShuffleNetV2 & ResNet-18 64.25 & 69.95 ->
66.06 & 71.16; ShuffleNetV2 & ResNet-50 64.25 & 76.28 -> 66.44 & 76.57
(`python -m mcl_jax.rows --paper lmcl`). Not reproduced here (no ImageNet on this machine).
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, arch='resnet34', arch2='', baseline=False, meta_grad='exact', seed=0, smoke=False
  )
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.model.arch = args['arch']
  if args['arch2']:
    c.model.archs = (args['arch'], args['arch2'])
  c.cohort.num_peers = 2
  c.method = methods.config(
      'lmcl',
      branch_blocks=1,
      tau=0.07,
      alpha=0.01,
      beta=0.01,
      meta_every_steps=500,
      meta_inner_steps=2,
      meta_grad=args['meta_grad'],
      memory_bank=True,
      num_positives=1,
      num_negatives=8192,
      memory_momentum=0.5,
  )
  if args['baseline']:
    c.model.archs, c.cohort.num_peers = (), 1
    c.method = methods.config('independent')
  config_lib.set_sgd(
      c,
      batch_size=256,
      epochs=100,
      lr=0.1,
      weight_decay=1e-4,
      nesterov=True,
      schedule='multistep',
      milestones=(30, 60, 90),
  )
  if not args['baseline']:
    c.method.meta_weight_decay = c.optim.weight_decay
  return config_lib.finish(c, args['smoke'])
