"""What a training method is: a small object owning its hyper-parameters, loss terms, extra
parameters and state, and where they live on a device mesh.

The trainer (mcl_jax/train.py) is method-agnostic: it applies the cohort, hands the outputs to
`Method.loss`, differentiates w.r.t. the peers' and the method's parameters, and logs every term
as `train/<term>`. A new method is a `Method` subclass registered with
`mcl_jax.methods.register(name, cls)` (from any module, or a config file); the loop is not touched.
See README "Extending" for a complete example.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from mcl_jax import losses, meta
from mcl_jax.sharding import PEER, PEER_EXAMPLE, REPLICATED, same_placement  # re-exported


@dataclasses.dataclass(frozen=True)
class HParam:
  """One hyper-parameter of a method: its default, what it means, and what values are allowed.

  `check(value) -> bool` with `rule` (e.g. 'must be > 0') names the constraint in the error;
  `choices` restricts the value to a set. The value's type must match the default's (an int is
  accepted for a float).
  """

  default: Any
  help: str
  check: Callable[[Any], bool] | None = None
  rule: str = ''
  choices: tuple = ()

  def problem(self, key: str, value) -> str | None:
    if not _same_type(value, self.default):
      return (
          f'method.{key}={value!r}: must be a {type(self.default).__name__} '
          f'(like the default {self.default!r})'
      )
    if self.choices and value not in self.choices:
      return f'method.{key}={value!r}: must be one of {self.choices}'
    if self.check is not None and not self.check(value):
      return f'method.{key}={value!r}: {self.rule}'
    return None


def _same_type(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, numbers.Real)
  if isinstance(default, int):
    return isinstance(value, numbers.Integral)
  return isinstance(value, type(default))


def positive(default, help: str) -> HParam:  # pylint: disable=redefined-builtin
  return HParam(default, help, lambda v: v > 0, 'must be > 0')


def non_negative(default, help: str) -> HParam:  # pylint: disable=redefined-builtin
  return HParam(default, help, lambda v: v >= 0, 'must be >= 0')


def at_least_one(default: int, help: str) -> HParam:  # pylint: disable=redefined-builtin
  return HParam(default, help, lambda v: v >= 1, 'must be >= 1')


def fraction(default: float, help: str) -> HParam:  # pylint: disable=redefined-builtin
  return HParam(default, help, lambda v: 0 <= v <= 1, 'must be in [0, 1]')


def flag(default: bool, help: str) -> HParam:  # pylint: disable=redefined-builtin
  return HParam(default, help)


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a method may know about the run it is part of, handed over explicitly by the loop."""

  num_peers: int  # peers after grouping (a multi-branch model counts once)
  archs: tuple[str, ...]  # one per peer
  num_classes: int
  num_train_examples: int  # after `data.train_examples`
  steps_per_epoch: int
  total_steps: int
  batch_size: int  # global
  teacher_arch: str = ''  # `teacher.arch` (distillation methods)
  image_shape: tuple[int, ...] = ()  # (H, W, C) of the data set's images; () when unknown


@dataclasses.dataclass(frozen=True)
class KnnEval:
  """Evaluation by a weighted k-nearest-neighbour classifier in each peer's feature space
  (`mcl_jax.step.make_knn_eval_step`), for methods that do not train the classifiers."""

  k: int  # neighbours
  temperature: float  # vote weight exp(cosine similarity / temperature)
  bank_examples: int  # training images in the bank (-1: all), a fixed seed-independent subset


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class. Subclasses declare `hparams` and override `loss`, and when they have any, `init`,
  `layout`, `validate`, `load_frozen`, and for a meta-optimisation `meta_settings`,
  `meta_problem`, `meta_apply`."""

  config: Any  # this method's section of the config: `name` + the keys of `hparams`
  run: RunInfo | None = None

  # The method's own keys of the `method` config section: {key: HParam}.
  hparams: ClassVar[dict[str, HParam]] = {}
  # {key: its name in configs saved before each method owned its keys} (see methods.upgrade).
  legacy_names: ClassVar[dict[str, str]] = {}

  # Wants the class-balanced batch sampler (MCL on CIFAR: m images per class in every batch).
  class_balanced = False

  @property
  def samples_per_class(self) -> int:
    """m of the class-balanced sampler: the method's `samples_per_class` key, else 2."""
    return self.config.get('samples_per_class', 2)

  # Methods with a meta-optimisation (L-MCL) set this > 0 and implement `meta_settings`,
  # `meta_problem` and `meta_apply` (a round: `mcl_jax.step.make_meta_step`).
  meta_every_steps = 0
  # How a meta round is compiled: one of `meta.PROGRAMS`, or 'auto' (per backend).
  meta_program = 'auto'

  # False for self-supervised methods: the step removes 'label' from the training batch before
  # `augment`, `forward` and `loss` see it, so the labels cannot reach the update.
  uses_labels = True

  # A `mcl_jax.data.HostViews`: the method wants several independently augmented views of every
  # training image from a streamed source's host pipeline (MoCo: two crops of the full-resolution
  # image), as 'image', 'image2', ... in the raw batch its `augment` receives. In-memory data gets
  # one 'image' and the method draws its views on device. None: one view.
  host_views = None

  @property
  def knn_eval(self) -> KnnEval | None:
    """None: the loop evaluates the peers' classifiers; a `KnnEval`: k-nearest neighbours."""
    return None

  # True when `eval_classifiers` gives further classifiers to evaluate beside the peers' own.
  has_eval_classifiers = False

  def eval_classifiers(self, params, state, outputs, cohort) -> dict:
    """Further classifiers of the cohort, evaluated beside each peer's own (`outputs['logits']`):
    {name: class scores `[B, C]`}, from the method's `params` and `state` and the peers' eval-mode
    `outputs` (with 'groups' ... 'stages'). Logged as `eval/classifier/<name>/top1`, and the max
    over them and the peers as `eval/best_classifier/top1` (L-MCL: every stage's classifier and
    the aggregated logits, the number the authors' L-MCL code reports). Set
    `has_eval_classifiers` when overriding."""
    del params, state, outputs, cohort
    return {}

  @classmethod
  def default_config(cls, name: str, **overrides) -> ml_collections.ConfigDict:
    """The `method` section for this method: `name`, then every hyper-parameter at its default,
    with `overrides` applied (an unknown key raises, naming the known ones)."""
    unknown = sorted(set(overrides) - set(cls.hparams))
    if unknown:
      raise KeyError(
          f'method {name!r} has no hyper-parameter {unknown}; its keys are {sorted(cls.hparams)}.'
      )
    values = {key: hp.default for key, hp in cls.hparams.items()}
    values.update(overrides)
    return ml_collections.ConfigDict({'name': name, **values})

  @classmethod
  def validate(cls, config, run: RunInfo | None) -> list[str]:
    """Problems with `config` (this method's section) for `run`, one line each; [] when valid.
    Subclasses extend it with checks across keys or against the run (call super first)."""
    del run
    given = set(config.keys()) - {'name'}
    problems = []
    foreign = sorted(given - set(cls.hparams))
    if foreign:
      problems.append(
          f'method.name={config.name!r} has no keys {foreign} (its keys: '
          f'{sorted(cls.hparams)}). The method section was built for another method: select the '
          f"method with the config file's argument (e.g. `configs/<file>.py:method={config.name}`) "
          f'or build it with mcl_jax.methods.config({config.name!r}, ...).'
      )
    missing = sorted(set(cls.hparams) - given)
    if missing:
      problems.append(
          f'method.name={config.name!r} needs the keys {missing}: build the section with '
          f'mcl_jax.methods.config({config.name!r}, ...).'
      )
    for key in sorted(given & set(cls.hparams)):
      problem = cls.hparams[key].problem(key, config[key])
      if problem:
        problems.append(problem)
    return problems

  def init(self, rng, cohort, train_labels):
    """Returns (params, state): trainable extra parameters (e.g. embedding heads), optimised
    together with the peers, and non-trainable state (e.g. memory banks). `train_labels` [N] are
    the training set's labels (memory banks are indexed by example)."""
    del rng, cohort, train_labels
    return {}, {}

  def init_with_peers(self, rng, cohort, train_labels, peer_variables):
    """`init` for a method whose state starts from the peers' initial variables (MoCo's key
    encoders are copies of the query encoders): `peer_variables` is `(params, batch_stats)` as
    `Cohort.init` returns them. The default ignores them and calls `init`."""
    del peer_variables
    return self.init(rng, cohort, train_labels)

  def augment(self, batch, rng, aug):
    """The training view(s) of the raw batch (uint8 'image'), a dict merged into the batch, or
    None (the default): 'image' augmented as the data source says (`aug`,
    `mcl_jax.data.augment_spec`; `mcl_jax.step.standard_views`). A method that draws its own
    views (two per image for MoCo) returns them here."""
    del batch, rng, aug
    return None

  def forward(self, cohort, peer_params, batch_stats, batch):
    """(outputs, new peer batch_stats): what `loss` receives as `outputs`, differentiated w.r.t.
    `peer_params`. The default applies every peer to `batch['image']` in training mode."""
    return cohort.apply(peer_params, batch_stats, batch['image'], train=True)

  def layout(self, params, state):
    """Where the method's leaves live on the mesh: (tree of PartitionSpecs like `params`, tree
    like `state`), in the logical axes `PEER` (leading peer axis), `PEER_EXAMPLE` (memory banks
    `[K, N, ...]`) and `REPLICATED`. An axis is split only where the mesh axis divides it; the
    default replicates everything (always correct, not always fast)."""
    return same_placement(params, REPLICATED), same_placement(state, REPLICATED)

  def load_frozen(self, config):
    """Frozen variables (e.g. a trained teacher) passed to every step as `ctx.frozen`; never
    trained, never checkpointed with the run. None when the method has none."""
    del config
    return None

  def loss(self, params, state, outputs, batch, ctx):
    """Returns (total loss, {term name: unweighted scalar}, new state).

    outputs: the cohort's outputs ('logits' [K, B, C], 'groups': per-group model outputs with
      'feature' [K_g, B, d_g] and 'stages').
    batch: 'image' (augmented, normalised) [B, H, W, C], 'label' [B], 'index' [B] (training-set
      positions, for memory banks).
    ctx: a `mcl_jax.step.LossContext` (rng, step, peer_params, frozen, cohort).
    """
    raise NotImplementedError

  @property
  def meta_settings(self) -> meta.Settings:
    """The static choices of a meta round (`mcl_jax.meta.Settings`)."""
    raise NotImplementedError

  def meta_problem(self, state, batch, ctx, *, cohort, lr, wd_mask='all') -> meta.Problem:
    """The meta round's `mcl_jax.meta.Problem` at the train state (after the step's update), on
    the step's augmented batch; lr: the step's learning rate; wd_mask: the real optimizer's
    `optim.wd_mask`. Deterministic in its arguments (it may be rebuilt once per program)."""
    raise NotImplementedError

  def meta_apply(self, method_state, g_phi, lr):
    """New method state from the round's hyper-gradient `g_phi`."""
    raise NotImplementedError

  def meta_update(self, state, batch, ctx, *, cohort, lr, wd_mask='all'):
    """New method state after a meta round computed as one program."""
    problem = self.meta_problem(state, batch, ctx, cohort=cohort, lr=lr, wd_mask=wd_mask)
    g_phi = meta.hypergradient_of(problem, self.meta_settings)
    return self.meta_apply(state.method_state, g_phi, lr)


def ordered_pairs(num_peers: int) -> tuple[np.ndarray, np.ndarray]:
  """Index arrays (k, l) of all ordered peer pairs k != l, [K(K-1)] each."""
  k, l = np.nonzero(~np.eye(num_peers, dtype=bool))
  return k, l


class Independent(Method):
  """K peers trained side by side with no interaction: sum_k CE_k (the baseline)."""

  def loss(self, params, state, outputs, batch, ctx):
    ce = losses.ce_loss(outputs['logits'], batch['label'])
    return ce, {'ce': ce}, state


class DML(Method):
  """Deep mutual learning: CE_k + mean over l != k of T^2 KL(p_l^T || p_k^T), targets stop-gradient.

  All K(K-1) ordered pairs are computed at once; `kd_T` is the temperature.
  """

  hparams = {
      'kd_T': positive(3.0, 'temperature of the KL terms'),
      'dml_weight': non_negative(1.0, 'weight of the mutual KL terms'),
  }

  def loss(self, params, state, outputs, batch, ctx):
    logits = outputs['logits']
    num_peers = logits.shape[0]
    ce = losses.ce_loss(logits, batch['label'])
    if num_peers == 1:
      return ce, {'ce': ce, 'dml': jnp.zeros(())}, state
    k, l = ordered_pairs(num_peers)
    pair_kl = jax.vmap(lambda s, t: losses.soft_kl(s, t, self.config.kd_T))(logits[k], logits[l])
    dml = jnp.sum(pair_kl) / (num_peers - 1)
    return ce + self.config.dml_weight * dml, {'ce': ce, 'dml': dml}, state
