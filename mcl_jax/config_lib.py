"""The config schema: defaults every experiment config starts from, `:arg` parsing, `smoke`, and
validation before anything compiles.

Experiment configs (configs/*.py) call `base_config()` and override what their paper table needs.
"""
from __future__ import annotations

import ml_collections

# Keys of the method section: every method's weights exist in every config so that
# `--config.method.alpha=...` works for any method and typos are caught by the locked ConfigDict.
METHOD_DEFAULTS = dict(
    name='independent',
    kd_T=3.0,           # temperature of logit KL terms (DML, logit KD, soft contrastive KL)
    dml_weight=1.0,
    tau=0.1,            # contrastive temperature
    alpha=0.1,          # VCL
    gamma=1.0,          # soft VCL
    beta=0.1,           # ICL
    lam=1.0,            # soft ICL
    logit_kd=False,
    include_self_positive=False,
    embed_dim=128,
    memory_bank=False,
    num_positives=1,
    num_negatives=8192,
    memory_momentum=0.5,
    samples_per_class=2,
    class_balanced=False,
    meta_every_steps=50,
    meta_inner_steps=2,
    meta_grad='exact',
    # L-MCL: the virtual steps as straight-line code (fast on XLA:CPU) or a rolled lax.scan whose
    # per-step jax.checkpoint halves the hyper-gradient's memory (BENCHMARKS.md §2).
    meta_unroll=True,
    # L-MCL: how the virtual steps' gradients are differentiated again for the hyper-gradient
    # (mcl_jax.meta.gradient_fn; the same numbers, reverse-over-forward ~3x faster on XLA:CPU).
    meta_second_order='reverse_over_forward',
    meta_weight_decay=5e-4,  # L-MCL: wd of the virtual steps and of phi's SGD (= optim.weight_decay)
    branch_blocks=0,    # L-MCL: blocks per stage of the auxiliary branches (0: as the backbone)
    distill_fraction=1.0,  # CRCD: distillation terms on for this fraction of the steps, then CE only
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_epochs = 1.0
  c.total_steps = -1            # > 0 overrides total_epochs
  c.batch_size = 128            # global batch
  c.smoke = False

  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', data_dir='', crop_padding=4, flip=True,
      train_examples=-1,        # > 0: use only the first N (after a fixed shuffle); smoke sets it
      eval_examples=-1,         # > 0: evaluate on the first N test examples
      eval_batch_size=1000))
  c.model = ml_collections.ConfigDict(dict(arch='resnet32', archs=(), dtype='float32'))
  c.cohort = ml_collections.ConfigDict(dict(num_peers=2, strategy='auto'))
  c.method = ml_collections.ConfigDict(METHOD_DEFAULTS)
  c.optim = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, wd_mask='all',
      schedule='cosine', per_epoch=True, warmup_epochs=0.0, milestones=(), decay_factor=0.1,
      # Larger global batches (more hosts): 'linear' uses lr * batch_size / lr_reference_batch
      # (Goyal et al. 2017; pair it with warmup_epochs ~5 beyond 4x), 'none' uses lr as given.
      lr_scaling='none', lr_reference_batch=256))
  # peer_shard_map: with mesh.peer > 1, each device applies its own peers under jax.shard_map
  # over 'peer' (False: jit's partitioner splits the stacked cohort; BENCHMARKS.md compares them).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, peer=1, peer_shard_map=True))
  c.teacher = ml_collections.ConfigDict(dict(arch='', checkpoint=''))
  # Distillation methods size their teacher-side heads from it: set teacher.arch, not this.
  c.method.teacher_arch = c.teacher.get_ref('arch')

  c.log_every_steps = 50
  c.ckpt_every_steps = 1000
  c.eval_every_steps = -1       # -1: once per epoch
  c.keep_checkpoints = 2
  c.xla_cpu_fast_path = True    # CPU compile option of mcl_jax.step.CPU_COMPILER_OPTIONS
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
def set_sgd(c: ml_collections.ConfigDict, *, batch_size: int, epochs: float, lr: float,
            weight_decay: float, nesterov: bool, schedule: str, per_epoch: bool = True,
            milestones=()) -> None:
  """Batch, duration and SGD (momentum 0.9): `schedule` 'cosine' (stepped per epoch, as the
  authors' code, or per step) or 'multistep' (x0.1 at the `milestones` epochs)."""
  c.batch_size, c.total_epochs = batch_size, float(epochs)
  o = c.optim
  o.lr, o.momentum, o.nesterov, o.weight_decay, o.schedule = lr, 0.9, nesterov, weight_decay, schedule
  if schedule == 'cosine':
    o.per_epoch = per_epoch
  else:
    o.milestones, o.decay_factor = tuple(milestones), 0.1


def set_mcl_weights(method: ml_collections.ConfigDict, *, tau: float, kd_T: float = 3.0,
                    alpha: float = 0.1, gamma: float = 1.0, beta: float = 0.1,
                    lam: float = 1.0) -> None:
  """MCL's contrastive temperature and loss weights (mcl.md §4): VCL alpha, SoftVCL gamma, ICL
  beta, SoftICL lam, KL temperature kd_T."""
  method.tau, method.kd_T = tau, kd_T
  method.alpha, method.gamma, method.beta, method.lam = alpha, gamma, beta, lam


def set_cifar100(c: ml_collections.ConfigDict) -> None:
  """CIFAR-100 from tfds (data.md), the long-run logging of the CIFAR recipes."""
  c.data.name, c.data.eval_batch_size = 'cifar100', 500
  c.log_every_steps, c.ckpt_every_steps = 100, 2000


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


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every value that can be checked without compiling; raises ConfigError listing them all.

  Data availability (a tfds `data_dir` that is not prepared) is checked too, since it is the most
  common way a long job dies late.
  """
  from mcl_jax import cohort as cohort_lib, data, meta, methods, models  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  problems = []

  def check(ok, key, value, allowed):
    if not ok:
      problems.append(f'{key}={value!r}: {allowed}')

  check(c.cohort.num_peers >= 1, 'cohort.num_peers', c.cohort.num_peers, 'must be >= 1')
  check(c.cohort.strategy in cohort_lib.STRATEGIES, 'cohort.strategy', c.cohort.strategy,
        f'must be one of {cohort_lib.STRATEGIES}')
  check(c.batch_size >= 1, 'batch_size', c.batch_size, 'must be >= 1')
  check(c.total_steps > 0 or c.total_epochs > 0, 'total_epochs', c.total_epochs,
        'must be > 0 (or set total_steps > 0)')
  for key in ('log_every_steps', 'ckpt_every_steps'):
    check(c[key] >= 1, key, c[key], 'must be >= 1')
  check(c.eval_every_steps == -1 or c.eval_every_steps >= 1, 'eval_every_steps',
        c.eval_every_steps, 'must be >= 1, or -1 for once per epoch')
  check(c.keep_checkpoints >= 1, 'keep_checkpoints', c.keep_checkpoints, 'must be >= 1')
  check(c.method.name in methods.available(), 'method.name', c.method.name,
        f'must be one of {methods.available()}')
  check(c.method.kd_T > 0, 'method.kd_T', c.method.kd_T, 'must be > 0')
  check(c.method.tau > 0, 'method.tau', c.method.tau, 'must be > 0')
  check(c.method.meta_grad in meta.MODES, 'method.meta_grad', c.method.meta_grad,
        f'must be one of {meta.MODES}')
  check(c.method.meta_second_order in meta.SECOND_ORDER, 'method.meta_second_order',
        c.method.meta_second_order, f'must be one of {meta.SECOND_ORDER}')
  for key in ('dml_weight', 'alpha', 'gamma', 'beta', 'lam'):  # loss weights
    check(c.method[key] >= 0, f'method.{key}', c.method[key], 'must be >= 0')
  for key in ('embed_dim', 'num_positives', 'num_negatives', 'samples_per_class',
              'meta_inner_steps'):
    check(c.method[key] >= 1, f'method.{key}', c.method[key], 'must be >= 1')
  check(c.method.meta_every_steps >= 0, 'method.meta_every_steps', c.method.meta_every_steps,
        'must be >= 0')
  check(0 <= c.method.memory_momentum <= 1, 'method.memory_momentum', c.method.memory_momentum,
        'must be in [0, 1]')
  check(c.seed >= 0, 'seed', c.seed, 'must be >= 0')
  check(c.data.crop_padding >= 0, 'data.crop_padding', c.data.crop_padding,
        'must be >= 0 (0: no random crop)')
  check(c.data.eval_batch_size >= 1, 'data.eval_batch_size', c.data.eval_batch_size,
        'must be >= 1')
  archs = list(c.model.archs) or [c.model.arch]
  for arch in archs:
    check(arch in models.ARCHS, 'model.archs' if c.model.archs else 'model.arch', arch,
          f'must be one of {models.ARCHS}')
  if c.model.archs:
    check(len(c.model.archs) == c.cohort.num_peers, 'cohort.num_peers', c.cohort.num_peers,
          f'must equal len(model.archs)={len(c.model.archs)} for a heterogeneous cohort')
  check(c.model.dtype in ('float32', 'bfloat16', 'float64'), 'model.dtype', c.model.dtype,
        "must be 'float32' or 'bfloat16' ('float64' with jax_enable_x64, for exactness tests)")
  if c.model.dtype == 'float64':
    check(jax.config.jax_enable_x64, 'model.dtype', c.model.dtype,
          'needs jax.config.update("jax_enable_x64", True) first')
  check(c.optim.schedule in ('cosine', 'multistep', 'constant'), 'optim.schedule',
        c.optim.schedule, "must be 'cosine', 'multistep' or 'constant'")
  check(c.optim.lr > 0, 'optim.lr', c.optim.lr, 'must be > 0')
  check(0 <= c.optim.momentum < 1, 'optim.momentum', c.optim.momentum, 'must be in [0, 1)')
  check(c.optim.weight_decay >= 0, 'optim.weight_decay', c.optim.weight_decay, 'must be >= 0')
  check(c.optim.wd_mask in ('all', 'no_bn_bias'), 'optim.wd_mask', c.optim.wd_mask,
        "must be 'all' or 'no_bn_bias'")
  check(c.optim.lr_scaling in ('none', 'linear'), 'optim.lr_scaling', c.optim.lr_scaling,
        "must be 'none' or 'linear'")
  check(c.optim.lr_reference_batch >= 1, 'optim.lr_reference_batch', c.optim.lr_reference_batch,
        'must be >= 1')
  check(c.optim.warmup_epochs >= 0, 'optim.warmup_epochs', c.optim.warmup_epochs, 'must be >= 0')
  check(c.optim.decay_factor > 0, 'optim.decay_factor', c.optim.decay_factor, 'must be > 0')
  milestones = list(c.optim.milestones)
  check(milestones == sorted(milestones) and all(m > 0 for m in milestones), 'optim.milestones',
        c.optim.milestones, 'must be increasing epochs > 0, e.g. (150, 180, 210)')

  num_devices = num_devices or jax.device_count()
  peer = c.mesh.peer
  data_axis = c.mesh.data if c.mesh.data > 0 else num_devices // max(peer, 1)
  check(peer >= 1, 'mesh.peer', peer, 'must be >= 1')
  check(isinstance(c.mesh.get('peer_shard_map', True), bool), 'mesh.peer_shard_map',
        c.mesh.get('peer_shard_map'), 'must be True or False')
  check(data_axis * peer <= num_devices and data_axis >= 1, 'mesh.data', c.mesh.data,
        f'mesh data x peer = {data_axis} x {peer} needs more than the {num_devices} devices here')
  check(c.batch_size % max(data_axis, 1) == 0, 'batch_size', c.batch_size,
        f'must be divisible by the {data_axis} devices of the mesh data axis '
        f'(e.g. batch_size={max(data_axis, 1) * max(c.batch_size // max(data_axis, 1), 1)})')
  check(peer >= 1 and c.cohort.num_peers % peer == 0, 'cohort.num_peers', c.cohort.num_peers,
        f'must be divisible by mesh.peer={peer}')

  check(c.data.name in data.NAMES, 'data.name', c.data.name, f'must be one of {data.NAMES}')
  if problems:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(problems))
  # Last: data availability raises its own FileNotFoundError naming the preparing command.
  data.check_available(c.data.name, c.data.data_dir or None)
