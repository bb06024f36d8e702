r"""Self-supervised MCL on the embedded Fashion-MNIST (20k training images, no labels used): two
ResNet-8 MoCo learners teaching each other, or one (`peers=1`: the MoCo baseline).

    python -m mcl_jax.main --config configs/fashion_mnist_moco_mcl.py --workdir /tmp/fm_moco_mcl
    python -m mcl_jax.main --config configs/fashion_mnist_moco_mcl.py:peers=1 --workdir /tmp/fm_moco

The recipe: the authors' MoCo settings (tau 0.07, kd_T 3, all loss weights 1, projection to 128,
shuffle-BN over 8 sub-batches, SGD momentum 0.9 without Nesterov), scaled to this data set: batch
128, lr 0.06 with a per-step cosine, weight decay 5e-4, a queue of 4,096 keys (MoCo's 65,536 would
be three times the training set) and key momentum 0.99 (0.999 averages over more steps than
this run has), grey views (random resized crop, flip, brightness/contrast jitter). Evaluation
every 2 epochs: each peer's backbone features, 200-nearest-neighbour vote against 10,000
training images (`eval/peer_k/top1`; the classifiers are never trained). The protocol of the
papers, a linear classifier on the frozen backbone, runs on the finished workdir.

Then the linear evaluation of each peer (README, "Self-supervised MCL and linear evaluation"):

    python -m mcl_jax.linear_eval --workdir /tmp/fm_moco_mcl --peer 0 --config configs/linear_eval.py:cached

Expected (measured, seeds 0-2, ~9 min (MoCo) / ~20 min (MoCo-MCL x2) of training on the shared
2-core CPU, README's table): linear-evaluation top-1 MoCo 81.80 +- 0.50, MoCo-MCL x2 peer 0
80.96 +- 0.41 (paired difference -0.84 +- 0.88); kNN monitor 77.44 +- 0.44 vs 76.75 +- 0.52.

Arguments (`--config configs/fashion_mnist_moco_mcl.py:peers=1,seed=1`): peers (1 = MoCo, 2 =
MCL), epochs (default 10), seed, smoke. Method keys go on the command line, e.g.
`--config.method.icl_weight=0.0`.
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(arg, peers=2, epochs=10.0, seed=0, smoke=False)
  c = config_lib.base_config()
  c.seed = args['seed']
  c.model.arch = 'resnet8'
  c.cohort.num_peers = args['peers']
  config_lib.set_fashion_mnist(c, args['epochs'])
  c.optim.lr, c.optim.nesterov = 0.06, False
  c.method = methods.config('moco_mcl', queue_size=4096, key_momentum=0.99, augmentation='grey')
  steps_per_epoch = 20000 // c.batch_size
  c.eval_every_steps = 2 * steps_per_epoch
  c.ckpt_every_steps = c.eval_every_steps
  c = config_lib.finish(c, args['smoke'])
  if args['smoke']:  # the queue holds a whole number of the smoke run's smaller batches
    c.method.queue_size = 8 * c.batch_size
    c.method.knn_bank_examples = -1  # the smoke run's 512 training images
  return c
