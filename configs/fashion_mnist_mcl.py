r"""Quick start: a cohort of two peers on the embedded Fashion-MNIST subset (20k train, 10k test).

    python -m mcl_jax.main --config configs/fashion_mnist_mcl.py --workdir /tmp/fmnist_mcl

Arguments (`--config configs/fashion_mnist_mcl.py:method=dml,peers=2`): method, arch, peers,
epochs, seed, smoke. Expected (measured on the 2-core CPU, see README): see README's results table.
"""

from mcl_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, method='mcl', arch='resnet8', peers=2, epochs=10.0, seed=0, smoke=False
  )
  c = config_lib.base_config()
  c.seed = args['seed']
  c.data.name = 'fashion_mnist'  # on device: pad-2 random crop + flip (the source's)
  c.model.arch = args['arch']
  c.cohort.num_peers = args['peers']
  c.method = methods.config(args['method'])  # the method's default hyper-parameters
  config_lib.set_sgd(
      c,
      batch_size=128,
      epochs=args['epochs'],
      lr=0.1,
      weight_decay=5e-4,
      nesterov=True,
      schedule='cosine',
      per_epoch=False,
  )
  c.log_every_steps, c.ckpt_every_steps = 50, 500
  c.eval_every_steps = -1
  return config_lib.finish(c, args['smoke'])
