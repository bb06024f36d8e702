r"""Small-data benchmark on the embedded Fashion-MNIST: the papers' regime of networks that fit
their training set, at about the quick start's compute.

MEASURED CURVES: see below (filled in from the measurement runs).

    python -m mcl_jax.main --config configs/fashion_mnist_small.py:method=independent --workdir /tmp/fm_small

Arguments (`--config configs/fashion_mnist_small.py:method=mcl,peers=4,seed=1`): method
(independent | dml | mcl | lmcl | mcl_okd), arch (default resnet8), peers (cohort size; for
mcl_okd the number of branches of one `<arch>_okd<peers>` network), images (training images,
default 1000), epochs (default 200), seed, smoke. Method switches go on the command line, e.g.
`--config.method.logit_kd=True` (MCL + logit KD), `--config.method.dot_weight=0.0
--config.method.contrast_weight=0.0` (MCL-OKD's branches with CE only),
`--config.method.meta_learned_weights=False` (L-MCL with fixed layer weights of 1). The whole
comparison, resumable: scripts/fashion_mnist_small_comparison.sh.
"""

from mcl_jax import config_lib, methods

METHODS = ('independent', 'dml', 'mcl', 'lmcl', 'mcl_okd')


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg,
      method='independent',
      arch='resnet8',
      peers=2,
      images=1000,
      epochs=200.0,
      seed=0,
      smoke=False,
  )
  if args['method'] not in METHODS:
    raise ValueError(f"method={args['method']!r}: use one of {METHODS}.")
  c = config_lib.base_config()
  c.seed = args['seed']
  config_lib.set_fashion_mnist(c, args['epochs'])  # batch 128, SGD-Nesterov 0.1, wd 5e-4, cosine
  c.data.train_examples = args['images']  # a fixed, seed-independent subset of the 20k
  c.data.train_eval_examples = -1  # train_eval/*: every evaluation also on all training images
  c.model.arch = args['arch']
  c.cohort.num_peers = args['peers']
  c.method = methods.config(args['method'])  # the method's default hyper-parameters
  if args['method'] == 'mcl_okd':  # one multi-branch network, its branches are the peers
    c.model.arch = f"{args['arch']}_okd{args['peers']}"
    c.cohort.num_peers = 1
  steps_per_epoch = args['images'] // c.batch_size
  # 10 evaluations (test set + training images) and checkpoints per run; a log line every 5
  # epochs.
  c.eval_every_steps = max(1, round(args['epochs'] * steps_per_epoch / 10))
  c.ckpt_every_steps = c.eval_every_steps
  c.log_every_steps = max(1, 5 * steps_per_epoch)
  return config_lib.finish(c, args['smoke'])
