"""Linear evaluation of a frozen peer: `python -m mcl_jax.linear_eval --workdir RUN [--peer P]`.

    python -m mcl_jax.linear_eval --workdir RUN [--peer P] [--step N]
        [--config configs/linear_eval.py[:args]] [--config.<key>=<value> ...] [--out DIR]

How good a representation has peer P of a run learned? Its backbone is frozen and a new linear
classifier is trained on top, the protocol of MoCo's `main_lincls.py`, which the MCL authors use
for their self-supervised peers:

* **Backbone.** Peer P of the checkpoint (the newest valid one, or `--step N`): the zoo network
  without its classifier, i.e. its `'feature'` output (the pooled input of the classifier), in
  inference mode: BatchNorm uses the peer's running statistics and nothing of the peer changes
  (the run's checkpoints are only read). Peers are numbered as in the run's `eval/peer_<k>/top1`:
  the peers of a heterogeneous cohort group after group, and each branch of a multi-branch model
  (MCL-OKD, `<arch>_okd<M>`) as one peer (its own later stages and pooled feature). A method's
  heads (projection heads, embedding heads, memory banks: the method's own params and state) are
  not part of the backbone, so supervised and self-supervised runs are probed alike.
* **Images.** Normalised as the run's evaluation does (`augment.normalize` with the data source's
  mean / std). Training views are augmented as the data source trains (small images: its pad-crop
  + flip on device; ImageNet: RandomResizedCrop + flip in the host pipeline); the test split is
  evaluated without augmentation (ImageNet: resize + center crop).
* **Classifier.** `Dense(d -> C)`, weights ~ N(0, 0.01^2), zero bias; cross-entropy; SGD with
  momentum 0.9, lr 30, no weight decay, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80
  (stepped at epoch starts). An epoch is `N // batch_size` full batches of a fresh permutation
  (as training: mcl_jax.data.BatchSampler). Reported: top-1 and top-5 on the test split after the
  last epoch (also logged after every epoch).

The defaults are in `configs/linear_eval.py` (its arguments: `data`, `epochs`, `augment`,
`cached`, `seed`, `smoke`); every key can be set with `--config.<key>=<value>`:
`data.name` ('' = the run's own data set), `data.data_dir`, `data.train_examples` /
`data.eval_examples` (0 = all), `data.eval_batch_size`, `batch_size`, `epochs`, `lr`,
`momentum`, `weight_decay`, `milestones`, `decay_factor`, `augment`, `seed`, `log_every_steps`.

* `augment=True` (the protocol): every step's views go through the frozen backbone again.
  `augment=False`: each training image's feature is computed once (un-augmented, as evaluated)
  and the classifier is trained on the cached features, far faster on a CPU (a linear layer per
  step). An in-memory data source without augmentation (crop_padding 0, no flip) is always
  cached: its every view is the image itself, so both give the same numbers. Measured on the
  shared 2-core CPU, a quick-start-sized run (ResNet-8, 20,000 training and 10,000 test images,
  100 epochs of 78 steps): cached 0.9 min in all; augmented ~1,100 img/s, ~18 s an epoch, about
  30 min.
* `data.train_examples` / `data.eval_examples` take a fixed subset / the first N images of an
  in-memory data set; of a streamed one (ImageNet), epochs of N images of the training stream
  (cached: the first N) and the first N test images.
* **Transfer**: `--config.data.name=<registered data set>` probes the encoder on another data set
  (its classes, its splits, its own normalisation and augmentation). Its images must have the
  shape the encoder was trained on (H x W x C); otherwise the command stops and names both.
* lr 30 is the protocol's for self-supervised (MoCo) features, whose scale is small; on a
  supervised peer's larger features it gives large losses while the accuracy stays meaningful.
  `--config.lr` changes it (a different protocol: say so when reporting).

Outputs, in `--out` (default `RUN/linear_eval/peer_<P>`, `..._<data>` for another data set):
`config.json` (this config, with the resolved data set and an `encoder` section: run, peer,
checkpoint step, architecture), `metrics.jsonl` and TensorBoard events (`linear/loss`: the mean
training loss since the previous line, `linear/lr`, and after every epoch `linear_eval/top1`,
`linear_eval/top5`, `epoch`; every `log_every_steps` steps a `linear/*` line), a progress line per
epoch on stdout, and Orbax checkpoints of the classifier, its optimizer and its step after every
epoch (`checkpoints/latest/<step>`). At the end one JSON line on stdout:
`{"workdir", "peer", "data", "step" (the encoder's checkpoint), "linear_eval/top1",
"linear_eval/top5", "epochs"}`.

Resuming: run the same command again. A killed evaluation resumes from its last checkpoint (every
epoch; SIGTERM / Ctrl-C stop at the next step with a checkpoint) and ends with exactly the numbers
an uninterrupted one gets: the batches and the augmentation are functions of (seed, step)
(`fold_in(seed, step)`), and the features are recomputed. The output directory is locked
(`trainer.lock`, mcl_jax.workdir) against a second process; one that holds a different evaluation
(another encoder step, peer, data set or setting; only `epochs`, `log_every_steps` and
`data.data_dir` may change) is refused with the differences listed: pass another `--out`.
A finished evaluation run again prints its result and changes nothing.

Mistakes (a missing run, a peer out of range, an unknown or bad config value, a data set of
another image shape, missing data) end as for every command (mcl_jax.cli): one message, exit
status 2, nothing created or changed. One process (multi-host runs are probed on one host).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from typing import Any

if __name__ == '__main__':  # before the heavy imports: glibc reads its tunables at process start
  from mcl_jax import host_malloc  # pylint: disable=g-import-not-at-top

  host_malloc.reexec_if_cpu_only()

import flax  # pylint: disable=g-import-not-at-top
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mcl_jax import augment, checkpoint as ckpt_lib, cli, cohort as cohort_lib, config_lib, data
from mcl_jax import evaluate, models, train, workdir as workdir_lib
from mcl_jax.metrics import MetricWriter, read_metrics

PROG = 'mcl_jax.linear_eval'
DEFAULT_CONFIG = 'configs/linear_eval.py'
INIT_STD = 0.01  # the classifier's weights ~ N(0, INIT_STD^2), as main_lincls.py
# Keys of config.json that may change when an evaluation is resumed: how long it runs, how often
# it logs, where the data is read from, and where the run lives.
FREE_KEYS = ('epochs', 'log_every_steps', 'data.data_dir', 'encoder.workdir')


# --------------------------------------------------------------------------------------------- #
# The config
# --------------------------------------------------------------------------------------------- #
def default_config() -> ml_collections.ConfigDict:
  return cli.load_config(DEFAULT_CONFIG)


def problems(config) -> list[str]:
  """What is wrong with a linear-evaluation config, one line per key (key, value, what to use)."""
  found = []
  missing = sorted(set(workdir_lib.flatten(default_config().to_dict())) - set(_flat(config)))
  if missing:
    what = 'a training config (for mcl_jax.main)' if 'model' in config else 'not complete'
    return [
        f'the config is {what}: it lacks {", ".join(missing)}. A linear-evaluation config starts '
        f'from {DEFAULT_CONFIG} (--config {DEFAULT_CONFIG}[:args], or its get_config())'
    ]

  def check(ok, key, allowed):
    if not ok:
      value = config
      for part in key.split('.'):
        value = value[part]
      found.append(f'{key}={value!r}: {allowed}')

  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  def is_number(v):
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)

  d = config.data
  check(isinstance(d.name, str), 'data.name', "must be a registered data set's name, or ''")
  check(isinstance(d.data_dir, str), 'data.data_dir', "must be a directory, or ''")
  for key in ('train_examples', 'eval_examples'):
    check(is_int(d[key]) and d[key] >= 0, f'data.{key}', 'must be >= 0 (0: all of them)')
  check(
      is_int(d.eval_batch_size) and d.eval_batch_size >= 1, 'data.eval_batch_size', 'must be >= 1'
  )
  check(is_int(config.batch_size) and config.batch_size >= 1, 'batch_size', 'must be >= 1')
  check(is_int(config.epochs) and config.epochs >= 1, 'epochs', 'must be an int >= 1')
  check(is_number(config.lr) and config.lr > 0, 'lr', 'must be > 0 (the protocol: 30)')
  check(is_number(config.momentum) and 0 <= config.momentum < 1, 'momentum', 'must be in [0, 1)')
  check(is_number(config.weight_decay) and config.weight_decay >= 0, 'weight_decay', 'must be >= 0')
  milestones = config.milestones
  check(
      isinstance(milestones, (tuple, list))
      and all(is_int(m) and m > 0 for m in milestones)
      and list(milestones) == sorted(milestones),
      'milestones',
      'must be increasing epochs > 0 at which lr is multiplied by decay_factor, e.g. (60, 80)',
  )
  check(is_number(config.decay_factor) and config.decay_factor > 0, 'decay_factor', 'must be > 0')
  check(isinstance(config.augment, bool), 'augment', 'must be True or False')
  check(is_int(config.seed) and config.seed >= 0, 'seed', 'must be >= 0')
  check(
      is_int(config.log_every_steps) and config.log_every_steps >= 1,
      'log_every_steps',
      'must be >= 1',
  )
  return found


def _flat(config) -> dict:
  return workdir_lib.flatten(config.to_dict() if hasattr(config, 'to_dict') else dict(config))


def apply_overrides(config, overrides: list[tuple[str, str]]) -> None:
  """Sets `--config.<key>=<text>` values, each converted to the type of the key's value;
  ConfigError naming the key for an unknown key or a value of the wrong type."""
  for key, text in overrides:
    message = cli.unknown_key_message(config, key)
    if message:
      raise config_lib.ConfigError(message)
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = _convert(node[leaf], text)
    except (TypeError, ValueError, SyntaxError) as e:
      raise config_lib.ConfigError(
          f'--config.{key}={text}: {e}; {key} is {cli.value_type(config, key)}.'
      ) from e


def _convert(current, text: str):
  """`text` as a value of the type of `current` (bool, int, float, str or a tuple of ints)."""
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
      raise ValueError(f'{text!r} is not a bool (True or False)')
    return text.lower() in ('true', '1', 'yes')
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(text.strip() or '()')
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise ValueError(f'{text!r} is not a list of ints, e.g. 60,80')
    return value
  return text


# --------------------------------------------------------------------------------------------- #
# The encoder: peer P of a checkpoint, frozen
# --------------------------------------------------------------------------------------------- #
def peer_table(run_config) -> list[tuple[str, int, int, int | None]]:
  """One (arch, group, peer in the group, branch or None) per peer, numbered as the run's
  `eval/peer_<k>`: groups in order, the branches of a multi-branch model consecutive."""
  table, group, previous = [], -1, None
  archs = cohort_lib.peer_archs(run_config.model, run_config.cohort)
  in_group = 0
  for arch in archs:
    if arch != previous:  # consecutive equal archs form one group (cohort.build_cohort)
      group, in_group, previous = group + 1, 0, arch
    branches = models.spec(arch).num_branches
    for branch in range(branches):
      table.append((arch, group, in_group, branch if branches > 1 else None))
    in_group += 1
  return table


@dataclasses.dataclass(frozen=True)
class Encoder:
  """Peer P's frozen backbone: `features(variables, images)` -> its pooled feature `[B, d]`."""

  model: nn.Module
  variables: Any  # {'params', 'batch_stats'} of the one peer, on the host
  branch: int | None  # a multi-branch model's branch, else None
  arch: str
  feature_dim: int

  def features(self, variables, images):
    """`[B, d]` float32 features of normalised images, BatchNorm in inference mode."""
    feature = self.model.apply(variables, images, train=False)['feature']
    feature = feature if self.branch is None else feature[self.branch]
    return feature.astype(jnp.float32)


def encoder_of(cohort, state, run_config, peer: int) -> Encoder:
  """Peer `peer` of a restored TrainState as a frozen Encoder (its variables copied to the host)."""
  arch, group, k, branch = peer_table(run_config)[peer]
  variables = {'params': state.params['peers'][group], 'batch_stats': state.batch_stats[group]}
  variables = jax.device_get(cohort_lib.peer_slice(variables, k))
  model = cohort.groups[group].model
  return Encoder(model, variables, branch, arch, int(model.feature_dim))


# --------------------------------------------------------------------------------------------- #
# The probe data
# --------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class Probe:
  """The data set the classifier is trained and tested on, with its source's normalisation and
  training augmentation. `train` / `test` are InMemoryDatasets or StreamedSplits."""

  name: str
  train: Any
  test: Any
  num_classes: int
  mean: tuple
  std: tuple
  crop_padding: int
  flip: bool
  streamed: bool
  num_train: int
  num_test: int


def probe_data(config, name: str, data_dir: str | None) -> Probe:
  """Loads (in memory) or opens (streamed) the splits of `name` as the config says."""
  source = data.get(name)
  spec = ml_collections.ConfigDict(
      {
          'data': {
              'name': name,
              'data_dir': data_dir or '',
              'train_examples': config.data.train_examples,
              'eval_examples': config.data.eval_examples,
          }
      }
  )
  train_split, test_split = data.load_splits(spec)
  num_train, num_test = len(train_split.labels), len(test_split.labels)
  if source.streamed:  # the streamed splits are whole; the config's counts are read from them
    if config.data.train_examples:
      num_train = min(num_train, config.data.train_examples)
    if config.data.eval_examples:
      num_test = min(num_test, config.data.eval_examples)
  return Probe(
      name=name,
      train=train_split,
      test=test_split,
      num_classes=source.num_classes,
      mean=tuple(source.mean),
      std=tuple(source.std),
      crop_padding=source.crop_padding,
      flip=source.flip,
      streamed=source.streamed,
      num_train=num_train,
      num_test=num_test,
  )


def _shape(shape) -> str:
  return 'x'.join(str(s) for s in shape)


# --------------------------------------------------------------------------------------------- #
# The classifier, its step and its evaluation
# --------------------------------------------------------------------------------------------- #
@flax.struct.dataclass
class LinearState:
  """What the linear evaluation trains and checkpoints."""

  step: jax.Array  # int32, updates done
  params: Any  # {'kernel': [d, C], 'bias': [C]}
  opt_state: Any
  loss_sum: jax.Array  # sum of the step losses since the last logged step (exact on resume)


def learning_rate(config, steps_per_epoch: int):
  """lr x decay_factor at each milestone epoch (a milestone listed twice decays twice)."""
  bounds = jnp.asarray([m * steps_per_epoch for m in config.milestones] or [-1], jnp.int32)
  active = len(config.milestones) > 0

  def schedule(step):
    passed = jnp.sum(jnp.asarray(step) >= bounds) if active else 0
    return config.lr * jnp.asarray(config.decay_factor, jnp.float32) ** passed

  return schedule


def make_optimizer(config, steps_per_epoch: int):
  """SGD with momentum (PyTorch's: the decay is added to the gradient before the momentum)."""
  schedule = learning_rate(config, steps_per_epoch)
  parts = [optax.add_decayed_weights(config.weight_decay)] if config.weight_decay else []
  return optax.chain(*parts, optax.sgd(schedule, momentum=config.momentum or None)), schedule


def init_state(config, tx, feature_dim: int, num_classes: int) -> LinearState:
  key = jax.random.split(jax.random.key(config.seed))[0]
  params = {
      'kernel': INIT_STD * jax.random.normal(key, (feature_dim, num_classes), jnp.float32),
      'bias': jnp.zeros((num_classes,), jnp.float32),
  }
  return LinearState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      loss_sum=jnp.zeros((), jnp.float32),
  )


def logits_of(params, features):
  return jnp.dot(features, params['kernel'], precision='highest') + params['bias']


def make_train_step(tx, steps_per_epoch: int, log_every_steps: int):
  """`train_step(state, features [B, d], labels [B]) -> (state, loss)` (jit it, donating state)."""

  def train_step(state: LinearState, features, labels):
    def loss_fn(params):
      logits = logits_of(params, features)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # A logged step starts a new sum (the loop divides by the steps since then).
    logged = (state.step % log_every_steps == 0) | (state.step % steps_per_epoch == 0)
    return (
        state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            loss_sum=jnp.where(logged, 0.0, state.loss_sum) + loss,
        ),
        loss,
    )

  return train_step


def eval_counts(params, features, labels, mask):
  """Correct top-1 and top-5 predictions among the rows where `mask` is True."""
  logits = logits_of(params, features)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = jnp.argmax(logits, axis=-1) == labels
  hit5 = jnp.any(top5 == labels[:, None], axis=-1)
  return jnp.sum(hit1 & mask), jnp.sum(hit5 & mask)


# --------------------------------------------------------------------------------------------- #
# Features through the frozen backbone
# --------------------------------------------------------------------------------------------- #
class Features:
  """The frozen backbone's features of the probe's images, all jitted, the variables on device."""

  def __init__(self, encoder: Encoder, probe: Probe, config):
    self.encoder, self.probe, self.config = encoder, probe, config
    self.variables = jax.device_put(encoder.variables)
    mean, std = probe.mean, probe.std
    aug_root = jax.random.split(jax.random.key(config.seed))[1]

    def plain(variables, images):
      return encoder.features(variables, augment.normalize(images, mean, std))

    def views(variables, images, idx, step):
      # Training views: the source's on-device crop / flip, keyed by fold_in(seed, step).
      key = jax.random.fold_in(aug_root, step)
      normalised = augment.augment_batch(
          images[idx], key, mean=mean, std=std, pad=probe.crop_padding, flip=probe.flip
      )
      return encoder.features(variables, normalised)

    self._plain, self._views = jax.jit(plain), jax.jit(views)

  def of_images(self, images) -> jax.Array:
    """Features of uint8 images (one batch), un-augmented: as the run's evaluation sees them."""
    return self._plain(self.variables, images)

  def views(self, images, idx, step: int) -> jax.Array:
    """Features of the training views `images[idx]` of `step`."""
    return self._views(self.variables, images, idx, jnp.int32(step))

  def of_split(self, split, count: int):
    """(features [count, d], labels [count]) on device, of the first `count` images of a split,
    un-augmented, in batches of data.eval_batch_size (the last padded: one compiled shape)."""
    bs = self.config.data.eval_batch_size
    feats, labels = [], []
    if self.probe.streamed:
      seen = 0
      for batch in split.batches(bs, seed=0, train=False):  # eval transform, in order
        keep = int(min(np.sum(batch['mask']), count - seen))
        feats.append(self.of_images(jnp.asarray(batch['image']))[:keep])
        labels.append(np.asarray(batch['label'][:keep], np.int32))
        seen += keep
        if seen >= count:
          break
    else:
      for start in range(0, count, bs):
        images = split.images[start : min(start + bs, count)]
        pad = bs - len(images)
        images = np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
        feats.append(self.of_images(jnp.asarray(images))[: bs - pad])
        labels.append(np.asarray(split.labels[start : start + bs - pad], np.int32))
    return jnp.concatenate(feats), jnp.asarray(np.concatenate(labels))


def uses_cache(config, probe: Probe) -> bool:
  """Whether the training features are computed once per image: asked for (augment=False), or
  an in-memory source without augmentation, whose every view is the image itself (the same
  numbers as recomputing them every step, far faster)."""
  unaugmented = not probe.streamed and probe.crop_padding == 0 and not probe.flip
  return not config.augment or (unaugmented and _CACHE_UNAUGMENTED)


_CACHE_UNAUGMENTED = True  # tests set False to compare the two paths


class TrainBatches:
  """`(features [B, d], labels [B])` of the training batch of any step: cached features
  (`uses_cache`) or the step's augmented views through the frozen backbone."""

  def __init__(self, features: Features, probe: Probe, config):
    self.features, self.probe, self.config = features, probe, config
    self.augment, bs = not uses_cache(config, probe), config.batch_size
    self._stream, self._stream_step = None, None
    if not self.augment:
      self.cached = features.of_split(probe.train, probe.num_train)
      labels = np.asarray(self.cached[1])
      self._take = jax.jit(lambda f, l, idx: (f[idx], l[idx]))
    elif not probe.streamed:
      labels = np.asarray(probe.train.labels)
      self._images = jnp.asarray(probe.train.images)
      self._labels = jnp.asarray(labels)
    if self.augment and probe.streamed:
      self.sampler = None  # the stream decides the batches (a function of seed and step)
      self._all = jnp.arange(bs, dtype=jnp.int32)
    else:
      self.sampler = data.BatchSampler(labels, bs, config.seed)

  def __call__(self, step: int):
    if not self.augment:
      idx = jnp.asarray(self.sampler.indices(step))
      return self._take(*self.cached, idx)
    if not self.probe.streamed:
      idx = jnp.asarray(self.sampler.indices(step))
      return self.features.views(self._images, idx, step), self._labels[idx]
    if self._stream is None or step != self._stream_step:  # (re)start the stream at `step`
      self._stream = self.probe.train.batches(self.config.batch_size, self.config.seed, step)
    self._stream_step = step + 1
    batch = next(self._stream)
    images = jnp.asarray(batch['image'])
    return self.features.views(images, self._all, step), jnp.asarray(batch['label'], jnp.int32)


# --------------------------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------------------------- #
def default_out(workdir: str, peer: int, data_name: str, run_data: str) -> str:
  suffix = '' if data_name == run_data else f'_{data_name.replace("/", "_")}'
  return os.path.join(workdir, 'linear_eval', f'peer_{peer}{suffix}')


@dataclasses.dataclass
class _Checked:
  """Everything `linear_eval` checked before creating anything."""

  run_config: Any
  data_name: str
  data_dir: str | None
  out: str


def check(workdir: str, config, *, peer: int, out: str | None) -> _Checked:
  """The checks that need no checkpoint: the config, the run, the peer, the data set (registered,
  of the encoder's image shape, available, large enough), the output directory (writable, free).
  Reads only; raises ConfigError / WorkdirError / FileNotFoundError / ValueError."""
  config_lib.raise_problems(problems(config))
  workdir_lib.require(workdir, workdir_lib.CONFIG_NAME)
  run_config = evaluate.load_config(workdir)  # also imports the run's plug-ins
  table = peer_table(run_config)
  if not 0 <= peer < len(table):
    archs = ', '.join(
        f'{k}: {a}' + ('' if b is None else f' branch {b}') for k, (a, _, _, b) in enumerate(table)
    )
    raise ValueError(
        f'--peer={peer}: the run in {workdir} has peers 0..{len(table) - 1} ({archs}); pass '
        f'one of them.'
    )
  run_data = run_config.data.name
  name = config.data.name or run_data
  if name not in data.names():
    raise config_lib.ConfigError(
        f'data.name={name!r}: not a registered data set; registered: {", ".join(data.names())} '
        f"(or '' for the run's own, {run_data})."
    )
  encoder_shape = tuple(data.dataset_info(run_data).image_shape)
  probe_shape = tuple(data.dataset_info(name).image_shape)
  if probe_shape != encoder_shape:
    same = [n for n in data.names() if tuple(data.dataset_info(n).image_shape) == encoder_shape]
    raise config_lib.ConfigError(
        f'data.name={name!r}: its images are {_shape(probe_shape)} (H x W x C), but peer {peer} '
        f'of {workdir} was trained on {run_data} images of {_shape(encoder_shape)}; its '
        f'backbone can only be probed on images of that shape. Registered data sets of '
        f'{_shape(encoder_shape)}: {", ".join(same)}.'
    )
  data_dir = config.data.data_dir or (run_config.data.data_dir if name == run_data else '')
  data.check_available(name, data_dir or None)
  num_train = data.dataset_info(name).num_train_examples
  if config.data.train_examples:
    num_train = min(num_train, config.data.train_examples)
  if config.batch_size > num_train:
    raise config_lib.ConfigError(
        f'batch_size={config.batch_size} is larger than the {num_train} training images of '
        f'{name}; lower batch_size (or raise data.train_examples).'
    )
  out = out or default_out(workdir, peer, name, run_data)
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ValueError(f'--out {out} is the run itself; pass another directory (or leave it out).')
  _check_writable(out)
  if jax.process_count() > 1:
    raise ValueError(f'{PROG} runs in one process; start it on one host only.')
  workdir_lib.TrainerLock(out, flag='--out').check_free()
  return _Checked(run_config, name, data_dir or None, out)


def _check_writable(out: str) -> None:
  existing = os.path.abspath(out)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise OSError(f'Cannot write to --out {out!r}: {existing} is not a directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise OSError(f'Cannot write to --out {out!r}: no permission to write in {existing}.')


def _record(config, checked: _Checked, workdir: str, peer: int, step: int, arch: str):
  """config.json of the output directory: the config with its data set resolved, and the
  encoder it evaluates."""
  record = ml_collections.ConfigDict(config.to_dict())
  record.data.name = checked.data_name
  record.encoder = ml_collections.ConfigDict(
      {
          'workdir': os.path.abspath(workdir),
          'peer': peer,
          'step': step,
          'arch': arch,
          'data': checked.run_config.data.name,
      }
  )
  return record


def _changes(out: str, record) -> dict | None:
  """{key: (old, new)} between `out`'s config.json and `record` (None: no config.json); raises
  WorkdirError when `out` holds a linear evaluation with checkpoints that differs beyond
  FREE_KEYS, or something else."""
  saved = workdir_lib.saved_config(out)
  if saved is None:
    return None
  if 'encoder' not in saved:
    raise workdir_lib.WorkdirError(
        f'--out {out} holds a config.json that is not a linear evaluation (a training run?); '
        f'pass another --out.'
    )
  changes = workdir_lib.config_changes(saved, record)
  bound = {k: v for k, v in changes.items() if k not in FREE_KEYS}
  if bound and workdir_lib.saved_steps(out):
    raise workdir_lib.WorkdirError(
        f'--out {out} holds a linear evaluation with other settings '
        f'({os.path.join(out, workdir_lib.CONFIG_NAME)}):\n{workdir_lib.describe_changes(bound)}\n'
        f'Pass another --out for this one, or rerun with the values of config.json to resume '
        f'or see that one (e.g. --step {saved["encoder"]["step"]} --peer '
        f'{saved["encoder"]["peer"]}). Keys that may change on resume: {", ".join(FREE_KEYS)}.'
    )
  return changes


def linear_eval(
    workdir: str,
    config=None,
    *,
    peer: int = 0,
    step: int | None = None,
    out: str | None = None,
    stop_after_epochs: int | None = None,
) -> dict:
  """Linear evaluation of peer `peer` of the run in `workdir` (checkpoint `step`, default the
  newest valid one) with `config` (default: configs/linear_eval.py); returns the result line's
  dict. Resumes the evaluation in `out` if there is one. `stop_after_epochs` stops (with a
  checkpoint) after that many epochs of this call, as a kill would (tests, time-boxed jobs)."""
  config = default_config() if config is None else config
  with train._StopRequest().installed() as stop:  # pylint: disable=protected-access
    return _linear_eval(workdir, config, peer, step, out, stop_after_epochs, stop)


def _linear_eval(workdir, config, peer, step, out, stop_after_epochs, stop):
  t_start = time.time()
  # ---- Checks: nothing is created or changed until all of them pass ------------------------- #
  checked = check(workdir, config, peer=peer, out=out)
  out = checked.out
  exp, state = evaluate.restore(workdir, step)  # reads only
  encoder = encoder_of(exp.cohort, state, checked.run_config, peer)
  encoder_step = int(state.step)
  del exp, state  # the run's data and state are no longer needed
  record = _record(config, checked, workdir, peer, encoder_step, encoder.arch)
  changes = _changes(out, record)
  probe = probe_data(config, checked.data_name, checked.data_dir)
  steps_per_epoch = probe.num_train // config.batch_size
  total = config.epochs * steps_per_epoch
  tx, schedule = make_optimizer(config, steps_per_epoch)
  identity = {
      'kind': 'linear_eval',
      'peer': peer,
      'encoder_step': encoder_step,
      'data': probe.name,
      'arch': encoder.arch,
  }

  # ---- The output directory: locked from here on ------------------------------------------ #
  lock = workdir_lib.TrainerLock(out, flag='--out')
  lock.acquire()  # creates `out`; refuses a second process
  try:
    ckpt = ckpt_lib.Checkpointer(out, identity, keep=2, async_save=False)
    fresh = init_state(config, tx, encoder.feature_dim, probe.num_classes)
    restored = ckpt.restore_latest(fresh)
    state = fresh if restored is None else restored[0]
    start = int(state.step)
    result_base = {'workdir': workdir, 'peer': peer, 'data': probe.name, 'step': encoder_step}
    if start >= total:
      ckpt.close()
      print(f'{PROG}: nothing to do: the linear evaluation in {out} already finished.', flush=True)
      return {**result_base, **_final_metrics(out, start, steps_per_epoch)}
    workdir_lib.record_config(out, record, changes, step=start, allowed=False)
    if start:
      print(f'{PROG}: resumed from step {start} (of {total}) in {out}', flush=True)
    return _train(
        config, probe, encoder, ckpt, state, tx, schedule, total, steps_per_epoch, out,
        result_base, stop, stop_after_epochs, t_start,
    )  # fmt: skip
  finally:
    lock.release()


def _train(
    config, probe, encoder, ckpt, state, tx, schedule, total, spe, out, result_base, stop,
    stop_after_epochs, t_start,
):  # fmt: skip
  start = int(state.step)
  views = 'augmented views'
  if uses_cache(config, probe):
    views = 'cached features' + (' (the data set has no augmentation)' if config.augment else '')
  print(
      f'{PROG}: peer {result_base["peer"]} ({encoder.arch}, step {result_base["step"]}) of '
      f'{result_base["workdir"]}, {encoder.feature_dim}-d features -> {probe.num_classes} '
      f'classes of {probe.name} ({probe.num_train} train, {probe.num_test} test images); '
      f'{config.epochs} epochs of {spe} steps, batch {config.batch_size}, {views}',
      flush=True,
  )
  t0 = time.perf_counter()
  features = Features(encoder, probe, config)
  test = features.of_split(probe.test, probe.num_test)
  batches = TrainBatches(features, probe, config)
  print(f'{PROG}: features ready in {time.perf_counter() - t0:.1f}s', flush=True)
  train_step = jax.jit(make_train_step(tx, spe, config.log_every_steps), donate_argnums=0)
  counts = jax.jit(eval_counts)
  writer = MetricWriter(out, resume_step=start)
  metrics = {}
  try:
    t_mark, step_mark = time.perf_counter(), start
    for step in range(start, total):
      state, _ = train_step(state, *batches(step))
      done = step + 1
      epoch_end = done % spe == 0
      if stop_after_epochs is not None and epoch_end and (done - start) // spe >= stop_after_epochs:
        stop.signal = stop.signal or 'stop_after_epochs'
      if not (epoch_end or done % config.log_every_steps == 0 or stop.signal or done == total):
        continue
      since = max((step // config.log_every_steps) * config.log_every_steps, (step // spe) * spe)
      loss = float(state.loss_sum) / (done - since)
      if not np.isfinite(loss):
        raise train.NonFiniteLossError(
            f'Non-finite linear-evaluation loss before step {done} (epoch {step // spe + 1}). '
            f'Lower --config.lr (now {config.lr}); the last checkpoint in {out} is intact.'
        )
      scalars = {'linear/loss': loss, 'linear/lr': float(schedule(step))}
      if epoch_end:
        scalars.update(_evaluate(counts, state.params, *test, config.data.eval_batch_size))
        scalars['epoch'] = done // spe
        ckpt.save(state, {'step': done, 'epoch': done // spe})
      if epoch_end or done % config.log_every_steps == 0:
        writer.write(done, scalars)
        rate = config.batch_size * (done - step_mark) / max(time.perf_counter() - t_mark, 1e-9)
        print(_line(done, total, spe, scalars, rate), flush=True)
        t_mark, step_mark = time.perf_counter(), done
        metrics = scalars
      if stop.signal is not None:
        if not epoch_end:
          ckpt.save(state, {'step': done, 'epoch': done / spe})
        print(
            f'{PROG}: stopped by {stop.signal} after step {done}; checkpoint saved. Run the same '
            f'command again to resume.',
            flush=True,
        )
        break
  finally:
    ckpt.close()
    writer.close()
  done = int(state.step)
  if done < total:
    return {**result_base, 'stopped_at_step': done}
  result = {
      **result_base,
      'linear_eval/top1': metrics['linear_eval/top1'],
      'linear_eval/top5': metrics['linear_eval/top5'],
      'epochs': done // spe,
  }
  print(f'{PROG}: finished in {(time.time() - t_start) / 60:.1f} min; results in {out}', flush=True)
  return result


def _evaluate(counts, params, features, labels, batch_size: int) -> dict:
  """linear_eval/top1 and top5 of the classifier on the cached test features."""
  n = len(labels)
  hit1 = hit5 = 0
  for start in range(0, n, batch_size):
    f, l = features[start : start + batch_size], labels[start : start + batch_size]
    pad = batch_size - len(l)
    mask = jnp.arange(batch_size) < len(l)
    a, b = counts(params, jnp.pad(f, ((0, pad), (0, 0))), jnp.pad(l, (0, pad)), mask)
    hit1, hit5 = hit1 + a, hit5 + b
  hit1, hit5 = jax.device_get((hit1, hit5))
  return {'linear_eval/top1': float(hit1) / n, 'linear_eval/top5': float(hit5) / n}


def _final_metrics(out: str, step: int, spe: int) -> dict:
  """The result of a finished evaluation, from its metrics.jsonl line of `step`."""
  try:
    rows = [r for r in read_metrics(out) if r['step'] == step and 'linear_eval/top1' in r]
  except (OSError, ValueError):
    rows = []
  if not rows:
    raise workdir_lib.WorkdirError(
        f'{out} holds a finished linear evaluation (step {step}) but its metrics.jsonl has no '
        f'result of that step; remove {out} (or pass another --out) to evaluate again.'
    )
  return {
      'linear_eval/top1': rows[-1]['linear_eval/top1'],
      'linear_eval/top5': rows[-1]['linear_eval/top5'],
      'epochs': step // spe,
  }


def _line(done, total, spe, scalars, rate) -> str:
  parts = [f'step {done}/{total}']
  if 'epoch' in scalars:
    parts.insert(0, f'epoch {scalars["epoch"]}/{total // spe}')
  parts += [f'loss {scalars["linear/loss"]:.4f}', f'lr {scalars["linear/lr"]:.4g}']
  if 'linear_eval/top1' in scalars:
    parts += [
        f'top-1 {scalars["linear_eval/top1"]:.2%}',
        f'top-5 {scalars["linear_eval/top5"]:.2%}',
    ]
  parts.append(f'{rate:.0f} img/s')
  return ' | '.join(parts)


# --------------------------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------------------------- #
def parse_args(argv):
  """(args, [(key, text)] of the --config.<key>=<value> flags); exits 2 on a bad command line."""
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROG}',
      description=__doc__.splitlines()[0],
      allow_abbrev=False,
      epilog='--config.<key>=<value> sets a key of the config, e.g. --config.epochs=20.',
  )
  parser.add_argument('--workdir', required=True, help='the run (holds config.json)')
  parser.add_argument('--peer', type=int, default=0, help='peer index, as eval/peer_<k> (0)')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='config file[:args]')
  parser.add_argument('--out', default=None, help='output directory (RUN/linear_eval/peer_<P>)')
  args, rest = parser.parse_known_args(argv)
  overrides, i = [], 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith('--config.'):
      parser.error(f'unrecognized argument {arg}')
    key, sep, text = arg[len('--config.') :].partition('=')
    if not sep:
      if i + 1 >= len(rest) or rest[i + 1].startswith('--'):
        parser.error(f'--config.{key} needs a value (--config.{key}=<value>)')
      text, i = rest[i + 1], i + 1
    overrides.append((key, text))
    i += 1
  return args, overrides


def main(argv=None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  with cli.user_errors(
      PROG,
      config_lib.ConfigError,
      ckpt_lib.CheckpointError,
      workdir_lib.WorkdirError,
      train.NonFiniteLossError,
      OSError,
      ValueError,
      ImportError,
  ):
    config = cli.load_config(args.config)
    apply_overrides(config, overrides)
    result = linear_eval(args.workdir, config, peer=args.peer, step=args.step, out=args.out)
  if 'stopped_at_step' not in result:
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  from mcl_jax import compile_cache  # pylint: disable=g-import-not-at-top

  compile_cache.enable()  # a resumed or repeated evaluation loads its compiled programs
  main()
