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
  c.model.arch = args['arch']
  c.cohort.num_peers = args['peers']
  c.method = methods.config(args['method'])  # the method's default hyper-parameters
  config_lib.set_fashion_mnist(c, args['epochs'])
  return config_lib.finish(c, args['smoke'])
