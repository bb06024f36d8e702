"""THE training loop, top to bottom: config -> data -> cohort/method -> state (init or resume) ->
jitted step -> log / eval / checkpoint.

One jitted program per train step for the whole cohort; the host only picks batch indices (a pure
function of seed and step), dispatches asynchronously, and syncs at log, eval and checkpoint points.
"""

from __future__ import annotations

import dataclasses
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import autotune
from mcl_jax import checkpoint as ckpt_lib
from mcl_jax import cohort as cohort_lib
from mcl_jax import config_lib, data, methods, optim, plugins, sharding, step as step_lib
from mcl_jax import workdir as workdir_lib
from mcl_jax.metrics import MetricWriter, Progress


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf; the message names the step and the loss terms."""


# --------------------------------------------------------------------------------------------- #
# Building blocks shared by train, evaluate and the benchmark.
# --------------------------------------------------------------------------------------------- #
def run_identity(config) -> dict:
  """What a checkpoint must match to be resumed by this config."""
  return {
      'archs': list(config.model.archs) or [config.model.arch] * config.cohort.num_peers,
      'method': config.method.name,
      'data': config.data.name,
  }


def schedule_lengths(config, num_train_examples: int) -> tuple[int, int]:
  steps_per_epoch = data.steps_per_epoch(num_train_examples, config.batch_size)
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(
        f'batch_size={config.batch_size} is larger than the {num_train_examples} training '
        f'examples; lower batch_size.'
    )
  total = (
      config.total_steps
      if config.total_steps > 0
      else optim.epochs_to_steps(config.total_epochs, steps_per_epoch)
  )
  return steps_per_epoch, total


def upgrade_saved_config(saved: dict) -> dict:
  """A config.json written by an earlier version, in today's keys: the flat `method` section of
  every method becomes the selected method's own keys (`methods.upgrade`); keys the data source
  now owns (`data.crop_padding`, `data.flip`) are dropped; `data.train_eval_examples`, added
  later, is 0 (off) where it is missing."""
  saved = dict(saved)
  saved['method'] = methods.upgrade(saved['method'])
  saved['data'] = {k: v for k, v in saved['data'].items() if k not in ('crop_padding', 'flip')}
  saved['data'].setdefault('train_eval_examples', 0)
  return saved


def run_info(config, num_train_examples: int, num_classes: int) -> methods.RunInfo:
  """What the method may know of this run (`Method.run`)."""
  steps_per_epoch, total_steps = schedule_lengths(config, num_train_examples)
  return methods.RunInfo(
      num_peers=config.cohort.num_peers,
      archs=cohort_lib.peer_archs(config.model, config.cohort),
      num_classes=num_classes,
      num_train_examples=num_train_examples,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      batch_size=config.batch_size,
      teacher_arch=config.teacher.arch,
      image_shape=(
          tuple(data.dataset_info(config.data.name).image_shape)
          if config.data.name in data.names()
          else ()
      ),
  )


@dataclasses.dataclass(frozen=True)
class AbstractRun:
  """What a config trains, built without its data and allocating nothing (shapes from the data
  set's `dataset_info`): for checks and compile / memory measurements before a run
  (tests/test_configs.py, benchmarks/compile_memory.py). `train_step` is un-jitted."""

  cohort: cohort_lib.Cohort
  method: methods.Method
  train_step: object
  state: step_lib.TrainState  # of jax.ShapeDtypeStruct
  batch: dict  # of jax.ShapeDtypeStruct: 'image' (host views: + 'image2') uint8, 'label', 'index'


def abstract_run(config) -> AbstractRun:
  info = data.dataset_info(config.data.name)
  num_train = info.num_train_examples
  if config.data.train_examples > 0:
    num_train = min(num_train, config.data.train_examples)
  run = run_info(config, num_train, info.num_classes)
  cohort = cohort_lib.build_cohort(config.model, config.cohort, info.num_classes)
  method = methods.build(config.method, run)
  tx, schedule = optim.make_optimizer(
      config.optim, run.total_steps, run.steps_per_epoch, config.batch_size
  )
  create = functools.partial(
      step_lib.create_state,
      cohort,
      method,
      tx,
      sample_images=jnp.zeros((1,) + tuple(info.image_shape), jnp.float32),
      train_labels=np.arange(num_train, dtype=np.int32) % info.num_classes,
  )
  rows = (config.batch_size,)
  image = jax.ShapeDtypeStruct(rows + tuple(info.image_shape), jnp.uint8)
  # A streamed source serves the views a method asks for ('image', 'image2', ...) from the host.
  views = method.host_views if data.get(config.data.name).streamed else None
  images = {key: image for key in data.view_keys(views.count if views else 1)}
  return AbstractRun(
      cohort=cohort,
      method=method,
      train_step=step_lib.make_train_step(
          cohort, method, tx, schedule, data.augment_spec(config), config.seed
      ),
      state=jax.eval_shape(create, jax.random.key(config.seed)),
      batch={
          **images,
          'label': jax.ShapeDtypeStruct(rows, jnp.int32),
          'index': jax.ShapeDtypeStruct(rows, jnp.int32),
      },
  )


def validate(config, num_devices: int | None = None) -> None:
  """Checks the whole config before anything is created or compiled: every section by its owner
  (config_lib: run, data, optimizer, mesh; cohort: model and cohort; the selected method: its own
  keys, against this run), then that the data is available. Raises ConfigError listing every
  problem, or FileNotFoundError naming the command that prepares missing data."""
  found = config_lib.problems(config, num_devices)
  found += cohort_lib.problems(config.model, config.cohort)
  run = None
  if config.data.name in data.names():
    info = data.dataset_info(config.data.name)
    num_train = info.num_train_examples
    if config.data.train_examples > 0:
      num_train = min(num_train, config.data.train_examples)
    if config.data.get('train_eval_examples', 0) and data.get(config.data.name).streamed:
      found.append(
          f'data.train_eval_examples={config.data.train_eval_examples}: evaluating on the '
          f'training set needs an in-memory data source; {config.data.name} is streamed (set 0).'
      )
    try:
      run = run_info(config, num_train, info.num_classes)
    except config_lib.ConfigError as e:
      found.append(str(e))
  found += methods.problems(config.method, run if not found else None)
  config_lib.raise_problems(found)
  # Last: data availability raises its own FileNotFoundError naming the preparing command.
  data.check_available(config.data.name, config.data.data_dir or None)


def _float64_state(init, rng):
  return jax.tree.map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, init(rng)
  )


class Experiment:
  """The pieces of one run, built from a config: data, cohort, method, optimizer, jitted steps."""

  def __init__(self, config, *, devices=None, workdir: str | None = None):
    self.config = config
    self.train_data, self.test_data = data.load_splits(config, workdir)
    self.streaming = isinstance(self.train_data, data.StreamedSplit)
    self.train_eval_data = train_eval_split(
        self.train_data, config.data.get('train_eval_examples', 0)
    )
    self.steps_per_epoch, self.total_steps = schedule_lengths(config, len(self.train_data.labels))
    self.cohort = cohort_lib.build_cohort(config.model, config.cohort, self.train_data.num_classes)
    self.method = methods.build(
        config.method,
        run_info(config, len(self.train_data.labels), self.train_data.num_classes),
    )
    self.tx, self.schedule = optim.make_optimizer(
        config.optim, self.total_steps, self.steps_per_epoch, config.batch_size
    )
    self.mesh = sharding.make_mesh(config.mesh, devices)
    if self.mesh.shape['peer'] > 1 and config.mesh.get('peer_shard_map', True):
      self.cohort = dataclasses.replace(self.cohort, mesh=self.mesh)
    self.aug = data.augment_spec(config)  # owned by the data source

    sample = jnp.zeros((1,) + tuple(self.train_data.image_shape), jnp.float32)
    self._init = functools.partial(
        step_lib.create_state,
        self.cohort,
        self.method,
        self.tx,
        sample_images=sample,
        train_labels=self.train_data.labels,
    )
    if config.model.dtype == 'float64':  # exactness tests: the whole state in float64 too
      self._init = functools.partial(_float64_state, self._init)
    self.abstract_state = jax.eval_shape(self._init, jax.random.key(0))
    self.state_sharding = sharding.state_sharding(
        self.mesh,
        self.abstract_state,
        step_lib.state_layout(self.cohort, self.method, self.tx, self.abstract_state),
    )
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)

    self.compiler_options = step_lib.compiler_options(enabled=config.xla_cpu_fast_path)
    # One device only: XLA cannot partition a custom call, so a mesh keeps lax's convolutions.
    self.cpu_kernels = bool(config.get('cpu_kernels', True)) and self.mesh.size == 1
    self.frozen = jax.device_put(self.method.load_frozen(config), self.replicated)
    self._take = jax.jit(
        lambda images, labels, idx: {'image': images[idx], 'label': labels[idx], 'index': idx},
        out_shardings=self.batch_sharding,
    )
    self.sampler = (
        None
        if self.streaming
        else data.BatchSampler(
            self.train_data.labels,
            config.batch_size,
            config.seed,
            class_balanced=self.method.class_balanced,
            samples_per_class=self.method.samples_per_class,
        )
    )
    self._train_images = self._train_labels = None
    self._stream, self._stream_step = None, None

    # The cohort strategy: `auto` / `autotune` are resolved from this run's record, the machine
    # cache or a measurement (mcl_jax/autotune.py; None: an explicit strategy).
    self.tuning, tuned_steps = autotune.choose(
        config,
        key=autotune.tuning_key(
            config, self.mesh, self.train_data.image_shape, self.compiler_options
        ),
        workdir=workdir,
        build_step=lambda strategy: self.jit_train_step(
            dataclasses.replace(self.cohort, strategy=strategy)
        ),
        make_state=self.init_state,
        batch=lambda: self.batch(0),
        frozen=self.frozen,
    )
    self._stream, self._stream_step = None, None  # a stream started by the measurement restarts
    if self.tuning is not None:
      self.cohort = dataclasses.replace(self.cohort, strategy=self.tuning.strategy)
    self.train_step = tuned_steps.get(self.cohort.strategy) or self.jit_train_step(self.cohort)
    self.meta_step = None
    if self.method.meta_every_steps > 0:
      meta_args = (self.cohort, self.method, self.schedule, self.aug, config.seed)
      if step_lib.meta_program(self.method) == 'per_step':
        self.meta_step = step_lib.make_per_step_meta_step(
            *meta_args,
            wd_mask=config.optim.wd_mask,
            jit=functools.partial(jax.jit, compiler_options=self.compiler_options),
            state_sharding=self.state_sharding,
        )
      else:
        self.meta_step = jax.jit(
            step_lib.make_meta_step(*meta_args, wd_mask=config.optim.wd_mask),
            in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
            out_shardings=self.state_sharding,
            donate_argnums=0,
            compiler_options=self.compiler_options,
        )
    self.eval_step = jax.jit(
        step_lib.make_eval_step(self.cohort, self.aug, self.method, cpu_kernels=self.cpu_kernels),
        out_shardings=self.replicated,
        compiler_options=self.compiler_options,
    )
    # Methods that do not train the classifiers (self-supervised) are evaluated by k-nearest
    # neighbours in each peer's feature space, against a bank of training images.
    self.knn = self.method.knn_eval
    if self.knn is not None:
      if self.streaming:
        raise config_lib.ConfigError(
            f'Invalid config: the kNN evaluation of method {config.method.name} needs an '
            f'in-memory data source; {config.data.name} is streamed (set '
            f'method.knn_bank_examples=0).'
        )
      self.knn_bank_data = train_eval_split(self.train_data, self.knn.bank_examples)
      self.feature_step = jax.jit(
          step_lib.make_feature_step(self.cohort, self.aug),
          compiler_options=self.compiler_options,
      )
      self.eval_step = jax.jit(
          step_lib.make_knn_eval_step(
              self.cohort,
              self.aug,
              self.train_data.num_classes,
              self.knn.k,
              self.knn.temperature,
          ),
          out_shardings=self.replicated,
          compiler_options=self.compiler_options,
      )

  def jit_train_step(self, cohort):
    """The run's jitted (donated, sharded) train step, applying the peers as `cohort` says."""
    return jax.jit(
        step_lib.make_train_step(
            cohort,
            self.method,
            self.tx,
            self.schedule,
            self.aug,
            self.config.seed,
            cpu_kernels=self.cpu_kernels,
        ),
        in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=0,
        compiler_options=self.compiler_options,
    )

  def init_state(self):
    """A fresh state created directly in its sharding (never materialised on one device)."""
    rng = jax.random.key(self.config.seed)
    return jax.jit(self._init, out_shardings=self.state_sharding)(rng)

  def abstract_state_with_shardings(self):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state,
        self.state_sharding,
    )

  def batch(self, step: int):
    """The training batch of `step`: indices chosen on the host, images gathered on device; or,
    for streamed data, the next batch of the (deterministic, resumable) input stream."""
    if self.streaming:
      return self._streamed_batch(step)
    if self._train_images is None:  # The in-memory training set lives on the devices.
      self._train_images = sharding.host_to_global(self.train_data.images, self.replicated)
      self._train_labels = sharding.host_to_global(self.train_data.labels, self.replicated)
      self._rows = sharding.process_rows(self.batch_sharding, self.config.batch_size)
    # Every process draws the same global indices and hands over only its rows of them; each
    # device then gathers its slice of the batch locally (multi-host: sharding.global_batch).
    idx = self.sampler.indices(step).astype(np.int32)[self._rows]
    idx = sharding.global_batch(idx, self.batch_sharding, self.config.batch_size)
    return self._take(self._train_images, self._train_labels, idx)

  def _streamed_batch(self, step: int):
    if self._stream is None or step != self._stream_step:  # (re)start the stream at `step`
      self._stream = self.train_data.batches(
          self.config.batch_size, self.config.seed, start_step=step, views=self.method.host_views
      )
    self._stream_step = step + 1
    return sharding.global_batch(next(self._stream), self.batch_sharding, self.config.batch_size)

  def eval_batches(self, dataset, batch_size: int):
    """Global eval batches with a 'mask' for the padding of the last one."""
    if isinstance(dataset, data.StreamedSplit):
      for local in dataset.batches(batch_size, seed=0, train=False):
        yield sharding.global_batch(local, self.batch_sharding, batch_size)
      return
    for start in range(0, len(dataset.labels), batch_size):
      images, labels = (
          dataset.images[start : start + batch_size],
          dataset.labels[start : start + batch_size],
      )
      pad = batch_size - len(labels)
      batch = {
          'image': np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)),
          'label': np.pad(labels, (0, pad)),
          'mask': np.arange(batch_size) < len(labels),
      }
      yield sharding.host_to_global(batch, self.batch_sharding)

  def eval_batch_size(self) -> int:
    bs = self.config.data.eval_batch_size
    return max(bs // self.mesh.shape['data'], 1) * self.mesh.shape['data']

  def knn_bank(self, state) -> dict:
    """The kNN evaluation's bank: features of the bank's training images (eval mode, no
    augmentation) per cohort group `[K_g, M, d_g]`, and their labels `[M]`."""
    features, bs = [], self.eval_batch_size()
    for batch in self.eval_batches(self.knn_bank_data, bs):
      features.append(self.feature_step(state.params['peers'], state.batch_stats, batch['image']))
    rows = len(self.knn_bank_data.labels)  # without the last batch's padding
    return {
        'features': tuple(jnp.concatenate(group, axis=1)[:, :rows] for group in zip(*features)),
        'labels': jnp.asarray(self.knn_bank_data.labels, jnp.int32),
    }

  def evaluate(self, state, dataset=None, knn_bank=None) -> dict:
    """Per-peer top-1/top-5, ensemble top-1 and best-peer top-1 on `dataset` (default: test);
    with the kNN evaluation against `knn_bank` (default: computed from `state`)."""
    test = self.test_data if dataset is None else dataset
    extra = ()
    if self.knn is not None:
      extra = (self.knn_bank(state) if knn_bank is None else knn_bank,)
    elif self.method.has_eval_classifiers:
      extra = ((state.params['method'], state.method_state),)
    totals = None
    for batch in self.eval_batches(test, self.eval_batch_size()):
      counts = self.eval_step(state.params['peers'], state.batch_stats, batch, *extra)
      totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.device_get(totals)
    n = float(totals['count'])
    out = {}
    for k in range(len(totals['top1'])):  # peers, or the branches of multi-branch models
      out[f'eval/peer_{k}/top1'] = totals['top1'][k] / n
      out[f'eval/peer_{k}/top5'] = totals['top5'][k] / n
    out['eval/ensemble/top1'] = totals['ensemble_top1'] / n
    out['eval/best_peer/top1'] = float(np.max(totals['top1'])) / n
    if 'classifiers' in totals:  # the method's further classifiers (L-MCL's stages, aggregate)
      for name, correct in totals['classifiers'].items():
        out[f'eval/classifier/{name}/top1'] = correct / n
      best = max([np.max(totals['top1'])] + list(totals['classifiers'].values()))
      out['eval/best_classifier/top1'] = float(best) / n
    return {k: float(v) for k, v in out.items()}

  def evaluate_all(self, state) -> dict:
    """`evaluate` on the test set, plus the same on the training images as `train_eval/*` when
    `data.train_eval_examples` asks for it (eval mode, no augmentation)."""
    knn_bank = self.knn_bank(state) if self.knn is not None else None
    out = self.evaluate(state, knn_bank=knn_bank)
    if self.train_eval_data is not None:
      train = self.evaluate(state, self.train_eval_data, knn_bank=knn_bank)
      out.update({'train_' + k: v for k, v in train.items()})  # eval/... -> train_eval/...
    return out


def train_eval_split(train, count: int):
  """The training images `data.train_eval_examples` evaluates (None when 0): all of them (-1) or
  a fixed, seed-independent `count` of them."""
  if not count or isinstance(train, data.StreamedSplit):
    return None
  if count < 0 or count >= len(train.labels):
    return train
  keep = np.sort(np.random.default_rng(1).permutation(len(train.labels))[:count])
  return dataclasses.replace(train, images=train.images[keep], labels=train.labels[keep])


def _check_finite(
    step_metrics: list, first_step: int, writer: MetricWriter, ckpt: ckpt_lib.Checkpointer
) -> None:
  """Raises NonFiniteLossError naming the first bad step since the last check and its terms."""
  if not step_metrics:
    return
  flags = jax.device_get([m['finite'] for m in step_metrics])
  if all(flags):
    return
  bad = int(np.argmin(flags))
  terms = {k: float(v) for k, v in jax.device_get(step_metrics[bad]).items() if k != 'finite'}
  what = (
      'loss'
      if not np.all(np.isfinite(list(terms.values())))
      else 'parameters or BatchNorm statistics (NaN/Inf inputs?)'
  )
  writer.close()
  ckpt.close()  # the last checkpoint's asynchronous save completes before the error ends the run
  raise NonFiniteLossError(
      f'Non-finite {what} at step {first_step + bad + 1}: {json.dumps(terms)}. Training stopped; '
      f'the last checkpoint (before this step) is intact. Lower optim.lr, check the data, or '
      f'resume with the same command after changing the config (add --allow_config_change: the '
      f'change is recorded in the workdir).'
  )


# --------------------------------------------------------------------------------------------- #
# The loop.
# --------------------------------------------------------------------------------------------- #
class _StopRequest:
  """Set by SIGTERM/SIGINT: the loop stops at the next step boundary, checkpoints and exits.

  With asynchronous dispatch the host runs ahead of the device: the step the device is running
  when the signal comes and the one already dispatched behind it both complete (and are in the
  checkpoint); no further step is dispatched."""

  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    del frame
    if self.signal is not None:  # second signal: the user really wants out
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    os.write(  # not print: this runs inside a signal handler
        2,
        f'\nmcl_jax: {self.signal} received; stopping at the next step boundary (the steps '
        f'already dispatched complete), then saving a checkpoint. Press Ctrl-C again to abort '
        f'at once.\n'.encode(),
    )

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    # Multi-host, SIGTERM belongs to JAX's preemption sync service (see
    # Checkpointer.reached_preemption): all hosts must stop at the same step.
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
    previous = {s: signal.signal(s, self) for s in signals}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def run(
    config,
    workdir: str,
    *,
    stop_after_steps: int | None = None,
    allow_config_change: bool = False,
) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last eval metrics.

  Everything that can be checked (the config, the data, the workdir, another trainer holding it,
  a config that differs from the run's config.json) is checked before anything in `workdir` is
  created or changed; the run holds `<workdir>/trainer.lock` until it returns (mcl_jax.workdir).
  Resuming with a config that differs from config.json beyond `workdir.FREE_KEYS` raises
  ConfigError unless `allow_config_change`; an accepted change is recorded in
  `<workdir>/config_changes.jsonl`.

  SIGTERM/SIGINT (preemption, Ctrl-C) end the run cleanly at the next step boundary with a
  checkpoint; re-running the same command resumes exactly. `stop_after_steps` does the same after
  that many steps of this invocation (tests, time-boxed jobs).
  """
  with _StopRequest().installed() as stop, contextlib.ExitStack() as cleanup:
    return _run(config, workdir, stop, stop_after_steps, allow_config_change, cleanup)


def _run(config, workdir, stop, stop_after_steps, allow_config_change, cleanup):
  # ---- Checks: nothing in the workdir is created or changed until all of them pass -------- #
  t_start = time.time()
  try:
    try:
      validate(config)
    except TypeError as e:  # e.g. --config.optim.milestones=abc: a tuple of letters
      raise config_lib.ConfigError(f'Invalid config: a value of the wrong type ({e}).') from e
    _check_workdir_writable(workdir)
    if jax.process_count() == 1:  # a second trainer is refused at once (multi-host: see hold)
      workdir_lib.TrainerLock(workdir).check_free()
    exp = Experiment(config, workdir=workdir)
  except ValueError as e:  # a check of a module that raises plain ValueError: still the config's
    if isinstance(e, config_lib.ConfigError):
      raise
    raise config_lib.ConfigError(f'Invalid config: {e}') from e
  cleanup.callback(workdir_lib.hold(workdir).release)  # creates the workdir; refuses a 2nd trainer
  _probe_writes(workdir)
  changes = _config_changes(config, workdir, allow_config_change)
  is_main = jax.process_index() == 0

  # ---- State: resume or init --------------------------------------------------------------- #
  ckpt = ckpt_lib.Checkpointer(workdir, run_identity(config), keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(exp.abstract_state_with_shardings())
  if restored is None:
    state, best = exp.init_state(), -1.0
  else:
    state, meta = restored
    best = meta.get('best_peer_top1', -1.0)
  start_step = int(jax.device_get(state.step))
  total, spe = exp.total_steps, exp.steps_per_epoch
  # Only now: a config refused by the checkpoints must not replace the run's config; a finished
  # run that is not continued keeps its record as it is.
  if is_main and (changes is None or (changes and start_step < total)):
    workdir_lib.record_config(
        workdir, config, changes, step=start_step, allowed=allow_config_change
    )
    plugins.record(config, workdir)  # user modules that `evaluate` / `export` must import again
    if changes:
      print(
          f'mcl_jax: config changed from step {start_step} (recorded in '
          f'{os.path.join(workdir, workdir_lib.CHANGES_NAME)}):\n'
          + workdir_lib.describe_changes(changes),
          flush=True,
      )
  if start_step >= total:  # a finished run: no writer, no new event file, nothing changed
    ckpt.close()
    print(f'mcl_jax: nothing to do: the run in {workdir} already finished ({total} steps).')
    if changes:
      print('mcl_jax: config.json left as it was (nothing trained with the changed config).')
    if is_main:
      print(_summary(workdir, time.time() - t_start), flush=True)
    return _last_logged_eval(workdir)
  if start_step:
    print(f'mcl_jax: resumed from step {start_step} (of {total}) in {workdir}', flush=True)
  autotune.record(workdir, exp.tuning)  # <workdir>/autotune.json: the strategy and why
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else spe
  writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main)
  progress = Progress(total, config.batch_size, start_step)
  print(
      f'mcl_jax: {exp.cohort.num_peers} peers {run_identity(config)["archs"]}, method '
      f'{config.method.name}, strategy {exp.cohort.strategy}'
      f'{f" ({exp.tuning.source})" if exp.tuning else ""}, {total} steps '
      f'({spe}/epoch), batch {config.batch_size}, {_describe_mesh(exp.mesh)}',
      flush=True,
  )

  # ---- Steps ------------------------------------------------------------------------------- #
  pending, pending_from = [], start_step
  last_eval = {}
  for step in range(start_step, total):
    t0 = time.perf_counter()
    batch = exp.batch(step)
    state, metrics = exp.train_step(state, batch, exp.frozen)
    if exp.meta_step is not None and step % exp.method.meta_every_steps == 0:
      state = exp.meta_step(state, batch, exp.frozen)
    pending.append(metrics)
    if len(pending) >= 2:
      # The host stays at most one step ahead of the device (the step running and one queued
      # behind it, still overlapping host and device work): a stop request (Ctrl-C, SIGTERM)
      # takes effect at the next step boundary instead of after every step dispatched so far.
      jax.block_until_ready(pending[-2])
    done = step + 1
    if step == start_step:
      jax.block_until_ready(metrics)
      print(f'first step (compile + run): {time.perf_counter() - t0:.1f}s', flush=True)
      progress.mark(done)

    if stop_after_steps is not None and done - start_step >= stop_after_steps:
      stop.signal = stop.signal or 'stop_after_steps'
    if ckpt.reached_preemption(done):
      stop.signal = stop.signal or 'a preemption notice (all hosts)'
    log_now = done % config.log_every_steps == 0 or done == total
    eval_now = done % eval_every == 0 or done == total
    ckpt_now = done % config.ckpt_every_steps == 0 or done == total or stop.signal is not None
    if not (log_now or eval_now or ckpt_now):
      continue
    _check_finite(pending, pending_from, writer, ckpt)
    scalars = {}
    if log_now:
      scalars.update(
          {f'train/{k}': float(v) for k, v in jax.device_get(pending[-1]).items() if k != 'finite'}
      )
      scalars.update(progress.update(done))
    pending, pending_from = [], done
    if eval_now:
      last_eval = exp.evaluate_all(state)
      scalars.update(last_eval)
      scalars['epoch'] = done / spe
    if scalars:
      writer.write(done, scalars)
      print(progress.line(done, scalars), flush=True)
    is_best = eval_now and last_eval['eval/best_peer/top1'] > best
    if is_best:
      best = last_eval['eval/best_peer/top1']
    if ckpt_now or is_best:
      ckpt.save(state, {'step': done, 'best_peer_top1': best}, best=is_best)
    if eval_now or ckpt_now:
      progress.mark(done)  # keep eval and checkpoint time out of img/s
    if stop.signal is not None:
      print(
          f'mcl_jax: stopped by {stop.signal} after step {done}; checkpoint saved. Run the same '
          f'command again to resume.',
          flush=True,
      )
      break

  ckpt.close()
  writer.close()
  if is_main and done == total:
    _plot_curves(workdir)
  if is_main:
    print(_summary(workdir, time.time() - t_start), flush=True)
  return last_eval


def _config_changes(config, workdir: str, allow_config_change: bool) -> dict | None:
  """{key: (old, new)} between the workdir's config.json and `config` (None: no config.json yet);
  raises ConfigDriftError for a change of a run that has checkpoints, beyond FREE_KEYS, unless
  allowed. A change of the run's identity (cohort, method, data) is left to the checkpoints'
  own refusal, which names both sides."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  saved = workdir_lib.saved_config(workdir)
  if saved is None:
    return None
  now = workdir_lib.as_json_dict(config)
  try:  # an earlier version's config.json in today's keys; both sides alike
    saved, now = upgrade_saved_config(saved), upgrade_saved_config(now)
  except (KeyError, TypeError, AttributeError, ValueError):
    pass
  changes = workdir_lib.config_changes(saved, now)
  if changes and workdir_lib.saved_steps(workdir):
    try:
      same_run = run_identity(ml_collections.ConfigDict(saved)) == run_identity(config)
    except (AttributeError, KeyError, TypeError):
      same_run = True
    if same_run:
      workdir_lib.check_drift(workdir, changes, allow_config_change=allow_config_change)
  return changes


def _last_logged_eval(workdir: str) -> dict:
  """The eval metrics of the last evaluation in metrics.jsonl ({} if none can be read)."""
  from mcl_jax.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  try:
    evals = [r for r in read_metrics(workdir) if 'eval/best_peer/top1' in r]
  except (OSError, ValueError):
    return {}
  return {k: v for k, v in evals[-1].items() if k.startswith('eval/')} if evals else {}


def _describe_mesh(mesh) -> str:
  """'mesh data=1 x peer=1 (1 cpu device)'."""
  axes = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
  n, platform = mesh.devices.size, mesh.devices.flat[0].platform
  hosts = f', {jax.process_count()} processes' if jax.process_count() > 1 else ''
  return f'mesh {axes} ({n} {platform} device{"s" * (n != 1)}{hosts})'


def _summary(workdir: str, seconds: float) -> str:
  """The end of a run in a few lines: best and final accuracies, and where everything is."""
  from mcl_jax.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  try:
    evals = [r for r in read_metrics(workdir) if 'eval/best_peer/top1' in r]
  except (OSError, ValueError):
    evals = []
  lines = [f'mcl_jax: summary of {workdir} ({seconds / 60:.1f} min in this invocation)']
  if evals:
    best = max(evals, key=lambda r: r['eval/best_peer/top1'])
    peers = sorted(
        (k for k in best if k.startswith('eval/peer_') and k.endswith('/top1')),
        key=lambda k: int(k.split('/')[1][len('peer_') :]),
    )
    best_k = max(peers, key=lambda k: best[k]).split('/')[1]
    last = evals[-1]
    lines += [
        f'  best peer:  {best["eval/best_peer/top1"]:.2%} top-1 ({best_k}, step {best["step"]}); '
        f'ensemble then {best["eval/ensemble/top1"]:.2%}',
        f'  final (step {last["step"]}): '
        + ', '.join(f'{k.split("/")[1]} {last[k]:.2%}' for k in peers)
        + f'; ensemble {last["eval/ensemble/top1"]:.2%}',
    ]
  else:
    lines.append('  no evaluation yet')
  lines.append(f'  checkpoints: {os.path.join(workdir, "checkpoints")} (latest, best)')
  lines.append(
      f'  metrics:     {os.path.join(workdir, "metrics.jsonl")} (tensorboard --logdir {workdir})'
  )
  curves = os.path.join(workdir, 'curves.png')
  if os.path.exists(curves):
    lines.append(f'  curves:      {curves}')
  return '\n'.join(lines)


def _plot_curves(workdir: str) -> None:
  """Writes `<workdir>/curves.png` (mcl_jax.plot); a plotting failure never fails training."""
  try:
    from mcl_jax import plot  # pylint: disable=g-import-not-at-top  # matplotlib: only when done

    plot.plot_runs([workdir], os.path.join(workdir, 'curves.png'))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Could not plot the curves of %s: %s', workdir, e)


def _check_workdir_writable(workdir: str) -> None:
  """Fails before any compilation if the workdir cannot hold metrics and checkpoints; creates
  nothing (the workdir is created when the run takes its lock)."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  problem = None
  if not os.path.isdir(existing):
    problem = f'{existing} is not a directory'
  elif not os.access(existing, os.W_OK | os.X_OK):
    problem = f'no permission to write in {existing}'
  if problem:
    raise OSError(f'Cannot write to --workdir {workdir!r} ({problem}). Pick a writable directory.')
  free = _free_bytes(existing)
  if free is not None and free < 100 * 2**20:
    raise OSError(
        f'--workdir {workdir!r} has only {free / 2**20:.0f} MiB free; checkpoints need '
        f'more. Free some space or pick another directory.'
    )


def _probe_writes(workdir: str) -> None:
  """Every process can write into the (locked) workdir: a multi-host run needs a shared one."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # Per-process name: the processes of a multi-host run share the workdir and probe at once.
    probe = os.path.join(workdir, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise OSError(f'Cannot write to --workdir {workdir!r} ({e}). Pick a writable directory.') from e


def _free_bytes(path: str) -> int | None:
  try:
    st = os.statvfs(path)
  except OSError:
    return None
  return st.f_bavail * st.f_frsize
