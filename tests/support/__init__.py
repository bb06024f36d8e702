"""Helpers shared by the tests and their subprocess scripts (not tests themselves)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  """A run of a few seconds on the embedded data: two ResNet-8 peers, 16-image batches."""
  from mcl_jax import config_lib, methods

  c = config_lib.base_config()
  c.model.arch = 'resnet8'
  c.cohort.num_peers = 2
  # A method.name override selects that method's section (its own keys at their defaults).
  name = overrides.pop('method.name', 'dml')
  c.method = methods.config(name) if name in methods.names() else {'name': name}
  c.batch_size = 16
  c.total_steps = 8
  c.data.train_examples = 128
  c.data.eval_examples = 64
  c.data.eval_batch_size = 32
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.ckpt_every_steps = 100
  c.optim.per_epoch = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def restore_final_state(workdir):
  """(step, state) of the newest checkpoint of a run, as saved (no experiment needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints', 'latest'), item_names=('state', 'meta')
  )
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, state['state']


def reproducible(records):
  """metrics.jsonl rows without the timing scalars (which no two runs share)."""
  from mcl_jax.metrics import TIMING_METRICS  # pylint: disable=g-import-not-at-top

  return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in records]


def start_training(cmd, cwd):
  """Starts a training command; returns (process, output lines up to its first step)."""
  proc = subprocess.Popen(cmd, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('first step'):
      break
  return proc, lines


def max_relative_difference(a, b, floor: float = 1e-12) -> float:
  """max over the float leaves of two pytrees of max|a - b| / max(max|b|, floor) (the leaf's
  scale, at least `floor`); other leaves must be equal (inf otherwise)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def rel(x, y):
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
      return 0.0 if np.array_equal(x, y) else np.inf
    return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), floor))

  return max(jax.tree.leaves(jax.tree.map(rel, a, b)))


def abstract_variables(model, input_shape):
  """The variables of `model.init` on zeros of `input_shape`, as shapes only (nothing compiled)."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  # `train` is bound outside eval_shape: it must stay a Python bool, not a traced argument.
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros(input_shape))


def tree_size(tree):
  """Number of scalars in a pytree of arrays or shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def num_params(variables):
  return tree_size(variables['params'])


def draw_variables(abstract, seed=0):
  """Concrete variables for an abstract tree, drawn with NumPy in the tree's leaf order (no init
  to compile). Kernels N(0, 2 / fan_in); BN scales 1 + N(0, 0.1^2); biases, BN offsets and running
  means N(0, 0.1^2); running variances U(0.5, 1.5)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape)
    return float(name == 'scale') + 0.1 * rng.normal(size=leaf.shape)

  return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(p, x), x.dtype), abstract)
