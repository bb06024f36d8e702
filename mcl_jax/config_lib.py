"""The config schema: defaults every experiment config starts from, `:arg` parsing, `smoke`, and
validation before anything compiles.

Experiment configs (configs/*.py) call `base_config()` and override what their paper table needs.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_epochs = 1.0
  c.total_steps = -1  # > 0 overrides total_epochs
  c.batch_size = 128  # global batch
  c.smoke = False

  c.data = ml_collections.ConfigDict(
      dict(
          name='fashion_mnist',  # a registered data source (mcl_jax.data), which owns its
          data_dir='',  # normalisation and its augmentation
          train_examples=-1,  # > 0: use only the first N (after a fixed shuffle); smoke sets it
          eval_examples=-1,  # > 0: evaluate on the first N test examples
          # != 0: each evaluation also runs on the un-augmented training images (-1: all of
          # them, N > 0: a fixed N of them), logged as train_eval/*; 0: off
          train_eval_examples=0,
          eval_batch_size=1000,
      )
  )
  c.model = ml_collections.ConfigDict(dict(arch='resnet32', archs=(), dtype='float32'))
  c.cohort = ml_collections.ConfigDict(dict(num_peers=2, strategy='auto'))
  # The selected method's own keys (mcl_jax.methods.config(name, ...)); `independent` has none.
  c.method = ml_collections.ConfigDict({'name': 'independent'})
  c.optim = ml_collections.ConfigDict(
      dict(
          lr=0.1,
          momentum=0.9,
          nesterov=True,
          weight_decay=5e-4,
          wd_mask='all',
          schedule='cosine',
          per_epoch=True,
          warmup_epochs=0.0,
          milestones=(),
          decay_factor=0.1,
          # Larger global batches (more hosts): 'linear' uses lr * batch_size / lr_reference_batch
          # (Goyal et al. 2017; pair it with warmup_epochs ~5 beyond 4x), 'none' uses lr as given.
          lr_scaling='none',
          lr_reference_batch=256,
      )
  )
  # peer_shard_map: with mesh.peer > 1, each device applies its own peers under jax.shard_map
  # over 'peer' (False: jit's partitioner splits the stacked cohort; BENCHMARKS.md compares them).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, peer=1, peer_shard_map=True))
  c.teacher = ml_collections.ConfigDict(dict(arch='', checkpoint=''))

  c.log_every_steps = 50
  c.ckpt_every_steps = 1000
  c.eval_every_steps = -1  # -1: once per epoch
  c.keep_checkpoints = 2
  c.xla_cpu_fast_path = True  # CPU compile option of mcl_jax.step.CPU_COMPILER_OPTIONS
  # Native 3x3 convolutions (AVX-512, their gradients too) in the train and eval steps of a
  # 1-device CPU run (mcl_jax.kernels; used only where they build and the CPU has AVX-512).
  c.cpu_kernels = True
  return c


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses the `:<args>` of `--config file.py:<args>`: `key=value` pairs and bare flags.

  Values are converted to the type of the default (bool flags may be bare). Unknown keys raise.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in filter(None, (s.strip() for s in arg.split(','))):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; allowed: {sorted(defaults)}.')
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f'Config argument {key!r} needs a value ({key}=...).')
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


# ---- Building blocks of the shipped recipes (configs/*.py) ------------------------------------ #
def set_sgd(
    c: ml_collections.ConfigDict,
    *,
    batch_size: int,
    epochs: float,
    lr: float,
    weight_decay: float,
    nesterov: bool,
    schedule: str,
    per_epoch: bool = True,
    milestones=(),
) -> None:
  """Batch, duration and SGD (momentum 0.9): `schedule` 'cosine' (stepped per epoch, as the
  authors' code, or per step) or 'multistep' (x0.1 at the `milestones` epochs)."""
  c.batch_size, c.total_epochs = batch_size, float(epochs)
  o = c.optim
  o.lr, o.momentum, o.nesterov, o.weight_decay, o.schedule = (
      lr,
      0.9,
      nesterov,
      weight_decay,
      schedule,
  )
  if schedule == 'cosine':
    o.per_epoch = per_epoch
  else:
    o.milestones, o.decay_factor = tuple(milestones), 0.1


def set_cifar100(c: ml_collections.ConfigDict) -> None:
  """CIFAR-100 from tfds (docs/data.md), the long-run logging of the CIFAR recipes."""
  c.data.name, c.data.eval_batch_size = 'cifar100', 500
  c.log_every_steps, c.ckpt_every_steps = 100, 2000


def set_imagenet(c: ml_collections.ConfigDict) -> None:
  """ImageNet from tfds, streamed (RandomResizedCrop + flip on the host, nothing on device),
  bfloat16 compute, the long-run logging of the ImageNet recipes."""
  c.data.name, c.data.eval_batch_size = 'imagenet2012', 500
  c.model.dtype = 'bfloat16'
  c.log_every_steps, c.ckpt_every_steps, c.eval_every_steps = 100, 2000, 5000


def set_fashion_mnist(c: ml_collections.ConfigDict, epochs: float) -> None:
  """The embedded Fashion-MNIST recipe of the CPU benchmarks: batch 128, SGD-Nesterov lr 0.1,
  weight decay 5e-4, cosine stepped per step, for `epochs` epochs; log every 50 steps."""
  c.data.name = 'fashion_mnist'  # on device: pad-2 random crop + flip (the source's)
  set_sgd(
      c,
      batch_size=128,
      epochs=epochs,
      lr=0.1,
      weight_decay=5e-4,
      nesterov=True,
      schedule='cosine',
      per_epoch=False,
  )
  c.log_every_steps, c.ckpt_every_steps = 50, 500


def mcl_cohort(arch: str, peers: int, branches: int, baseline: bool) -> tuple[str, int]:
  """(model.arch, cohort.num_peers) of the MCL recipes' `peers` / `branches` arguments.

  branches=1: `peers` independent `arch` networks (0: the default, 2). branches=M > 1: `peers`
  (0: the default, 1) shared-trunk networks `<arch>_okd<M>` (mcl_jax/models/okd.py), each of whose
  M branches is a peer of the losses: the authors' MCL(x4) networks for M = 4
  (docs/methods.md#mcl-multi-branch-networks). baseline: one plain `arch` network.
  """
  if branches < 1 or peers < 0:
    raise ValueError(
        f'Config arguments branches={branches} (must be >= 1) and peers={peers} (must be >= 0; '
        '0 picks the default).'
    )
  if baseline:
    return arch, 1
  if branches == 1:
    return arch, peers or 2
  return f'{arch}_okd{branches}', peers or 1


def finish(c: ml_collections.ConfigDict, smoke: bool) -> ml_collections.ConfigDict:
  """The config as returned by `get_config`: shrunk by `apply_smoke` when asked."""
  return apply_smoke(c) if smoke else c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to about a minute on a 2-core CPU through the same code path: few steps,
  few images, small eval; never changes the data source, the models or the method."""
  c.smoke = True
  c.total_steps = 12
  c.batch_size = min(c.batch_size, 32)
  c.data.train_examples = 512
  c.data.eval_examples = 200
  c.data.eval_batch_size = 100
  c.log_every_steps = 4
  c.eval_every_steps = 6
  c.ckpt_every_steps = 6
  return c


class ConfigError(ValueError):
  """An invalid config; the message names every bad key, its value and what is allowed."""


def raise_problems(found: list[str]) -> None:
  if found:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(found))


def problems(c: ml_collections.ConfigDict, num_devices: int | None = None) -> list[str]:
  """The problems, one line each, with the keys this module owns (run length, batch, data,
  optimizer, mesh, logging), checkable without compiling. The method, model and cohort sections
  are checked by their owners (mcl_jax.train.validate puts everything together)."""
  from mcl_jax import data  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  problems = []

  def check(ok, key, value, allowed):
    if not ok:
      problems.append(f'{key}={value!r}: {allowed}')

  check(c.batch_size >= 1, 'batch_size', c.batch_size, 'must be >= 1')
  check(
      c.total_steps > 0 or c.total_epochs > 0,
      'total_epochs',
      c.total_epochs,
      'must be > 0 (or set total_steps > 0)',
  )
  for key in ('log_every_steps', 'ckpt_every_steps'):
    check(c[key] >= 1, key, c[key], 'must be >= 1')
  check(
      c.eval_every_steps == -1 or c.eval_every_steps >= 1,
      'eval_every_steps',
      c.eval_every_steps,
      'must be >= 1, or -1 for once per epoch',
  )
  check(c.keep_checkpoints >= 1, 'keep_checkpoints', c.keep_checkpoints, 'must be >= 1')
  check(c.seed >= 0, 'seed', c.seed, 'must be >= 0')
  for key in ('crop_padding', 'flip'):  # removed keys, still set by an older config file
    check(
        key not in c.data,
        f'data.{key}',
        c.data.get(key),
        'is no longer a config key: the data source owns its augmentation. Remove it, or register '
        'a variant, e.g. data.register(name, dataclasses.replace(data.get(...), crop_padding=0))',
    )
  check(c.data.eval_batch_size >= 1, 'data.eval_batch_size', c.data.eval_batch_size, 'must be >= 1')
  train_eval = c.data.get('train_eval_examples', 0)
  check(
      isinstance(train_eval, int) and train_eval >= -1,
      'data.train_eval_examples',
      train_eval,
      'must be -1 (the whole training set), 0 (off) or a number of training examples > 0',
  )
  check(
      c.optim.schedule in ('cosine', 'multistep', 'constant'),
      'optim.schedule',
      c.optim.schedule,
      "must be 'cosine', 'multistep' or 'constant'",
  )
  check(c.optim.lr > 0, 'optim.lr', c.optim.lr, 'must be > 0')
  check(0 <= c.optim.momentum < 1, 'optim.momentum', c.optim.momentum, 'must be in [0, 1)')
  check(c.optim.weight_decay >= 0, 'optim.weight_decay', c.optim.weight_decay, 'must be >= 0')
  check(
      c.optim.wd_mask in ('all', 'no_bn_bias'),
      'optim.wd_mask',
      c.optim.wd_mask,
      "must be 'all' or 'no_bn_bias'",
  )
  check(
      c.optim.lr_scaling in ('none', 'linear'),
      'optim.lr_scaling',
      c.optim.lr_scaling,
      "must be 'none' or 'linear'",
  )
  check(
      c.optim.lr_reference_batch >= 1,
      'optim.lr_reference_batch',
      c.optim.lr_reference_batch,
      'must be >= 1',
  )
  check(c.optim.warmup_epochs >= 0, 'optim.warmup_epochs', c.optim.warmup_epochs, 'must be >= 0')
  check(c.optim.decay_factor > 0, 'optim.decay_factor', c.optim.decay_factor, 'must be > 0')
  milestones = list(c.optim.milestones)
  check(
      milestones == sorted(milestones) and all(m > 0 for m in milestones),
      'optim.milestones',
      c.optim.milestones,
      'must be increasing epochs > 0, e.g. (150, 180, 210)',
  )

  num_devices = num_devices or jax.device_count()
  peer = c.mesh.peer
  data_axis = c.mesh.data if c.mesh.data > 0 else num_devices // max(peer, 1)
  check(peer >= 1, 'mesh.peer', peer, 'must be >= 1')
  check(
      isinstance(c.get('cpu_kernels', True), bool),
      'cpu_kernels',
      c.get('cpu_kernels'),
      'must be True or False',
  )
  check(
      isinstance(c.mesh.get('peer_shard_map', True), bool),
      'mesh.peer_shard_map',
      c.mesh.get('peer_shard_map'),
      'must be True or False',
  )
  check(
      data_axis * peer <= num_devices and data_axis >= 1,
      'mesh.data',
      c.mesh.data,
      f'mesh data x peer = {data_axis} x {peer} needs more than the {num_devices} devices here',
  )
  check(
      c.batch_size % max(data_axis, 1) == 0,
      'batch_size',
      c.batch_size,
      f'must be divisible by the {data_axis} devices of the mesh data axis '
      f'(e.g. batch_size={max(data_axis, 1) * max(c.batch_size // max(data_axis, 1), 1)})',
  )
  check(
      peer >= 1 and c.cohort.num_peers % peer == 0,
      'cohort.num_peers',
      c.cohort.num_peers,
      f'must be divisible by mesh.peer={peer}',
  )

  check(
      c.data.name in data.names(),
      'data.name',
      c.data.name,
      f'must be one of the registered data sets {data.names()} (or register yours with '
      'mcl_jax.data.register(name, source) in the config file)',
  )
  return problems
