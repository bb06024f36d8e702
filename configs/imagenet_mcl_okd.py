r"""ImageNet MCL-OKD (Yang, Xu, An, ICASSP 2021), the official code's ImageNet protocol
(docs/methods.md#mcl-okd): ResNet-34 with the stem and the first two stages shared and M = 4
branches (each owns stages 3-4, the pool and the classifier), CE + DOT + 0.025 MCL, NCE K = 16384,
T = 0.07, momentum 0.5, F = 128, KD T = 3; 100 epochs, batch 128, SGD Nesterov 0.9, wd 1e-4,
lr 0.025 (1 + cos(pi e / E)) per epoch.

    python -m mcl_jax.main --config configs/imagenet_mcl_okd.py:arch=resnet34 \
        --workdir gs://BUCKET/mcl_okd_r34 --config.data.data_dir=$TFDS_DATA_DIR

Data: `tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record`. Arguments:
arch (resnet34 | resnet18 | resnet50: the ImageNet ResNets split after stage 2), branches
(2 | 3 | 4), baseline (the plain ResNet, CE only, same recipe), seed, smoke.
Expected top-1 (100 - the official README's error): baseline 74.57, MCL-OKD 75.36 (the last
branch, `eval/peer_3/top1`), MCL-OKD (Ens) 76.74 (`eval/ensemble/top1`). Not reproduced here (no
ImageNet on this machine).
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(arg, arch='resnet34', branches=4, baseline=False, seed=0, smoke=False)
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_imagenet(c)
  c.cohort.num_peers = 1  # one multi-branch network; its branches are the peers
  if args['baseline']:
    c.model.arch = args['arch']
    c.method = methods.config('independent')
  else:
    c.model.arch = f"{args['arch']}_okd{args['branches']}"
    c.method = methods.config(
        'mcl_okd', tau=0.07, num_negatives=256 if args['smoke'] else 16384, memory_momentum=0.5
    )
  config_lib.set_sgd(
      c, batch_size=128, epochs=100, lr=0.05, weight_decay=1e-4, nesterov=True, schedule='cosine'
  )
  return config_lib.finish(c, args['smoke'])
