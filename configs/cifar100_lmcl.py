r"""CIFAR-100 L-MCL (Yang et al., TPAMI 2023), docs/methods.md#l-mcl and docs/methods.md#recipes.

One table row per command (data prepared once with
`tfds build cifar100 --data_dir=$TFDS_DATA_DIR --file_format=array_record`):

    # homogeneous pair
    python -m mcl_jax.main --config configs/cifar100_lmcl.py:arch=resnet32 \
        --workdir workdirs/c100_r32_lmcl --config.data.data_dir=$TFDS_DATA_DIR
    # heterogeneous pair (model.archs = (arch, arch2))
    python -m mcl_jax.main --config configs/cifar100_lmcl.py:arch=resnet32,arch2=resnet110 \
        --workdir workdirs/c100_r32_r110_lmcl --config.data.data_dir=$TFDS_DATA_DIR

Arguments: arch, arch2 (second peer of a heterogeneous pair; empty = homogeneous), baseline (one
network of `arch`, CE only, the same recipe: the baseline column), meta_grad
(exact | official: the authors' hyper-gradient recursion,
docs/methods.md#l-mcl-hyper-gradient-exact-vs-official), seed, smoke.
K = 2 peers, S = 3 stages, tau 0.1, T 3, alpha = beta = 0.1, gamma = lam = 1, meta every 50
steps with 2 inner steps; SGD-Nesterov 0.1, wd 5e-4, batch 128 (64 classes x 2), 300 epochs,
per-epoch cosine.

Expected best-peer top-1 (the paper's README; `python -m mcl_jax.rows --paper lmcl` lists them all):
| arch(, arch2)         | baseline        | L-MCL           |
| resnet32              | 70.91           | 75.82           |
| resnet56              | 73.15           | 77.51           |
| resnet110             | 75.29           | 79.48           |
| wrn_16_2              | 72.55           | 77.31           |
| wrn_40_2              | 76.89           | 80.96           |
| shufflenetv2_0_5      | 67.39           | 72.61           |
| shufflenetv2_1_0      | 70.93           | 77.25           |
| hcgnet_a1             | 77.42           | 81.66           |
| hcgnet_a2             | 79.00           | 83.14           |
| resnet32, resnet110   | 70.91 & 75.29   | 75.82 & 79.71   |
| resnet56, resnet110   | 73.15 & 75.29   | 77.04 & 79.56   |
| wrn_16_2, wrn_40_2    | 72.55 & 76.89   | 76.88 & 80.24   |
| wrn_40_2, wrn_28_4    | 76.89 & 79.17   | 80.42 & 82.61   |
| resnet56, wrn_40_2    | 73.15 & 76.89   | 77.54 & 80.72   |
| resnet110, wrn_28_4   | 75.29 & 79.17   | 80.02 & 82.84   |
| shufflenetv2_1_0, resnet110 | 70.93 & 75.29 | 76.85 & 79.17 |
| shufflenetv2_1_0, wrn_40_2  | 70.93 & 76.89 | 77.06 & 80.29 |
Not yet reproduced here (no CIFAR-100 on this machine).
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, arch='resnet32', arch2='', baseline=False, meta_grad='exact', seed=0, smoke=False
  )
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_cifar100(c)
  c.model.arch = args['arch']
  if args['arch2']:
    c.model.archs = (args['arch'], args['arch2'])
  c.cohort.num_peers = 2
  c.method = methods.config(
      'lmcl', tau=0.1, meta_every_steps=50, meta_inner_steps=2, meta_grad=args['meta_grad']
  )
  if args['baseline']:
    c.model.archs, c.cohort.num_peers = (), 1
    c.method = methods.config('independent')
  # The authors' code steps the cosine once per epoch (docs/methods.md#learning-rate-schedule).
  config_lib.set_sgd(
      c, batch_size=128, epochs=300, lr=0.1, weight_decay=5e-4, nesterov=True, schedule='cosine'
  )
  if not args['baseline']:
    c.method.meta_weight_decay = c.optim.weight_decay
  return config_lib.finish(c, args['smoke'])
