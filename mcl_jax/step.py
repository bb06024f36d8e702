"""The jitted train and eval steps: one XLA program for the whole cohort.

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`: on-device augmentation
keyed by `fold_in(seed, step)`, all peers forward (cohort strategy), the method's loss, one
`jax.value_and_grad` over peers + method parameters, one optax update. The state is donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jax.sharding import PartitionSpec as P

from mcl_jax import augment, kernels, losses, meta, sharding

# XLA:CPU fuses the residual BN/add/ReLU chains into the transposes feeding weight-gradient convs
# and recomputes them there; routing elementwise ops and reductions through YNNPACK materialises
# them instead (~1.7x on a ResNet-32 step; docs/performance.md#the-xlacpu-compile-option,
# BENCHMARKS.md).
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE',
}


@functools.cache
def compiler_options(backend: str | None = None, enabled: bool = True) -> dict | None:
  """Backend-specific compile options, or None. The CPU option is experimental and
  version-specific: it is probed once and dropped if this jaxlib does not know it."""
  if not enabled or (backend or jax.default_backend()) != 'cpu':
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except  # JaxRuntimeError: "No such compile option"
    return None
  return CPU_COMPILER_OPTIONS


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree with leading peer axes inside `params`."""

  step: jax.Array  # int32 scalar, number of updates done
  params: Any  # {'peers': tuple over groups of stacked params, 'method': ...}
  batch_stats: Any  # tuple over groups of stacked BatchNorm statistics
  opt_state: Any
  method_state: Any  # non-trainable method state (memory banks, meta weights, ...)


def create_state(cohort, method, tx, rng, sample_images, train_labels) -> TrainState:
  """A fresh state. Pure, so it can be run under `jax.eval_shape` or `jax.jit(out_shardings=...)`."""
  peer_rng, method_rng = jax.random.split(rng)
  peer_params, batch_stats = cohort.init(peer_rng, sample_images)
  method_params, method_state = method.init_with_peers(
      method_rng, cohort, train_labels, (peer_params, batch_stats)
  )
  params = {'peers': peer_params, 'method': method_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      method_state=method_state,
  )


def state_layout(cohort, method, tx, state: TrainState) -> TrainState:
  """The logical placement of every leaf of `state` (a TrainState of arrays or
  ShapeDtypeStructs), as the cohort and the method declare it; the optimizer state follows the
  params' layout leaf for leaf (`optax.tree_map_params`), its counters are replicated."""
  peer_params, peer_stats = cohort.layout(state.params['peers'], state.batch_stats)
  method_params, method_state = method.layout(state.params['method'], state.method_state)
  params = {'peers': peer_params, 'method': method_params}
  opt_state = optax.tree_map_params(
      tx,
      lambda _, spec: spec,
      state.opt_state,
      params,
      transform_non_params=lambda _: sharding.REPLICATED,
      is_leaf=lambda x: isinstance(x, P),
  )
  return TrainState(
      step=sharding.REPLICATED,
      params=params,
      batch_stats=peer_stats,
      opt_state=opt_state,
      method_state=method_state,
  )


@flax.struct.dataclass
class LossContext:
  """What a method's loss sees besides its own params, state and the batch."""

  rng: jax.Array  # fold_in(seed, step)-derived key for the method's random choices
  step: jax.Array  # int32, the step being taken (before the update)
  peer_params: Any  # the peers' params (e.g. classifier weights for CRCD's gradient term)
  frozen: Any = None  # frozen variables of the method (e.g. a teacher), never trained/saved
  # The cohort (static): methods that run extra per-peer modules (L-MCL's auxiliary branches).
  cohort: Any = flax.struct.field(pytree_node=False, default=None)


def standard_views(batch, rng, aug) -> dict:
  """{'image': the raw batch's images cropped, flipped and normalised as the data source says}."""
  images = augment.augment_batch(
      batch['image'],
      rng,
      mean=tuple(aug.mean),
      std=tuple(aug.std),
      pad=aug.crop_padding,
      flip=aug.flip,
  )
  return {'image': images}


def augmented_batch(batch, step, seed: int, aug, method=None):
  """The step's training view of a raw batch: images augmented on device with the key
  `fold_in(seed, step)` (so the train and meta steps of one step see the same images) and
  normalised, by `method.augment` where the method draws its own views, else by
  `standard_views`. A method that does not use labels gets the batch without 'label'.
  Returns (batch with float 'image', method rng)."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  augment_key, method_key = jax.random.split(step_key)
  if method is not None and not method.uses_labels:
    batch = {k: v for k, v in batch.items() if k != 'label'}
  views = None if method is None else method.augment(batch, augment_key, aug)
  if views is None:
    views = standard_views(batch, augment_key, aug)
  return {**batch, **views}, method_key


def make_train_step(cohort, method, tx, schedule, aug, seed: int, cpu_kernels: bool = False):
  """Returns the un-jitted `train_step(state, batch, frozen) -> (new_state, metrics)`.

  batch: {'image': uint8 [B, H, W, C], 'label': int32 [B], 'index': int32 [B] (position in the
  training set; used by memory banks)}; frozen: the method's frozen variables or None.
  metrics: scalars `loss`, one per method term, `lr`, and `finite` (whether every term, the new
  params and the new BatchNorm statistics are finite; the loop stops on False).
  cpu_kernels: trace the step with `mcl_jax.kernels.use(True)` (native weight gradients of the
  convolutions that qualify; `cpu_kernels_enabled` says where).
  """

  def train_step(state: TrainState, batch, frozen=None):
    with kernels.use(cpu_kernels):
      return _train_step(state, batch, frozen)

  def _train_step(state: TrainState, batch, frozen=None):
    batch, method_key = augmented_batch(batch, state.step, seed, aug, method)

    def loss_fn(params):
      outputs, new_batch_stats = method.forward(cohort, params['peers'], state.batch_stats, batch)
      ctx = LossContext(
          rng=method_key, step=state.step, peer_params=params['peers'], frozen=frozen, cohort=cohort
      )
      loss, terms, new_method_state = method.loss(
          params['method'], state.method_state, outputs, batch, ctx
      )
      return loss, (terms, new_batch_stats, new_method_state)

    (loss, (terms, new_batch_stats, new_method_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, **terms, 'lr': schedule(state.step)}
    # The new state too: XLA:CPU's max (ReLU) drops NaNs, so a NaN input can leave every loss term
    # finite while it poisons the params and BatchNorm statistics.
    checked = jax.tree.leaves(metrics) + jax.tree.leaves((new_params, new_batch_stats))
    metrics['finite'] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in checked]))
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        batch_stats=new_batch_stats,
        opt_state=new_opt_state,
        method_state=new_method_state,
    )
    return new_state, metrics

  return train_step


def make_meta_step(cohort, method, schedule, aug, seed: int, wd_mask: str = 'all'):
  """Returns `meta_step(state, batch, frozen) -> state` for methods with a meta-optimisation
  (`method.meta_every_steps` > 0), run by the loop right after the ordinary update of step t when
  t % meta_every_steps == 0, on the same batch and augmentation. Only the method state changes.
  The whole round is one function, to be jitted as one program (`make_per_step_meta_step` is the
  same round as several). wd_mask: the real optimizer's `optim.wd_mask`, which virtual steps
  mirror."""

  def meta_step(state: TrainState, batch, frozen=None):
    step = state.step - 1  # the step whose update was just applied
    batch, method_key = augmented_batch(batch, step, seed, aug, method)
    ctx = LossContext(
        rng=method_key, step=step, peer_params=state.params['peers'], frozen=frozen, cohort=cohort
    )
    new_method_state = method.meta_update(
        state, batch, ctx, cohort=cohort, lr=schedule(step), wd_mask=wd_mask
    )
    return state.replace(method_state=new_method_state)

  return meta_step


def make_per_step_meta_step(
    cohort,
    method,
    schedule,
    aug,
    seed: int,
    wd_mask: str = 'all',
    jit: Callable = jax.jit,
    state_sharding=None,
):
  """`make_meta_step`'s round as a Python sequence of jitted programs, one per kind of virtual and
  reverse step (`meta.per_step_hypergradient`) and one that applies the hyper-gradient to the
  (donated) state; returns the ready-to-call `meta_step(state, batch, frozen) -> state`.
  jit: how each program is jitted (compiler options; the shardings follow the inputs');
  state_sharding: the new state's, when given."""

  def problem(state: TrainState, batch, frozen):
    step = state.step - 1
    batch, method_key = augmented_batch(batch, step, seed, aug, method)
    ctx = LossContext(
        rng=method_key, step=step, peer_params=state.params['peers'], frozen=frozen, cohort=cohort
    )
    return method.meta_problem(state, batch, ctx, cohort=cohort, lr=schedule(step), wd_mask=wd_mask)

  hypergradient = meta.per_step_hypergradient(problem, method.meta_settings, jit=jit)

  def apply(state: TrainState, g_phi):
    lr = schedule(state.step - 1)
    return state.replace(method_state=method.meta_apply(state.method_state, g_phi, lr))

  placed = {} if state_sharding is None else {'out_shardings': state_sharding}
  apply = jit(apply, donate_argnums=0, **placed)

  def meta_step(state: TrainState, batch, frozen=None):
    return apply(state, hypergradient(state, batch, frozen))

  return meta_step


def meta_program(method, backend: str | None = None) -> str:
  """The method's `meta_program` with 'auto' resolved: 'per_step' on CPU (measured:
  docs/performance.md#l-mcl-meta-step), 'one' elsewhere (not measured on accelerators)."""
  program = method.meta_program
  if program == 'auto':
    program = 'per_step' if (backend or jax.default_backend()) == 'cpu' else 'one'
  if program not in meta.PROGRAMS:
    raise ValueError(f'meta_program {program!r} is not one of {("auto",) + meta.PROGRAMS}.')
  return program


def make_eval_step(cohort, data_config, method=None, cpu_kernels: bool = False):
  """Returns `eval_step(params, batch_stats, batch, method_vars=None) -> counts`.

  batch: {'image': uint8, 'label': int32, 'mask': bool [B]} (mask pads the last batch).
  counts: per-peer correct top-1 / top-5 `[K]`, ensemble (mean logits) correct top-1, and the
  number of valid examples; summed over batches by the caller. With a `method` whose
  `has_eval_classifiers` and `method_vars` = (method params, method state): also 'classifiers',
  {name: correct top-1} of its `eval_classifiers`. cpu_kernels: as `make_train_step`'s (here
  only the forward kernel runs).
  """
  mean, std = tuple(data_config.mean), tuple(data_config.std)

  def eval_step(peer_params, batch_stats, batch, method_vars=None):
    with kernels.use(cpu_kernels):
      return _eval_step(peer_params, batch_stats, batch, method_vars)

  def _eval_step(peer_params, batch_stats, batch, method_vars=None):
    images = augment.normalize(batch['image'], mean, std)
    outputs, _ = cohort.apply(peer_params, batch_stats, images, train=False)
    counts = eval_counts(outputs['logits'], batch)
    if method_vars is not None:
      scores = method.eval_classifiers(*method_vars, outputs, cohort)
      hits = {
          name: jnp.argmax(s.astype(jnp.float32), axis=-1) == batch['label']
          for name, s in scores.items()
      }
      mask = batch['mask'].astype(jnp.int32)
      counts['classifiers'] = {name: jnp.sum(hit * mask) for name, hit in hits.items()}
    return counts

  return eval_step


def eval_counts(scores, batch) -> dict:
  """The counts of an eval step from per-peer class scores `[K, B, C]` (the ensemble ranks the
  mean of the peers' scores); see `make_eval_step`."""
  scores = scores.astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.int32)
  top5 = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]  # [K, B, 5]
  hit5 = jnp.any(top5 == labels[None, :, None], axis=-1)
  hit1 = jnp.argmax(scores, axis=-1) == labels[None]
  ensemble_hit1 = jnp.argmax(jnp.mean(scores, axis=0), axis=-1) == labels
  return {
      'top1': jnp.sum(hit1 * mask, axis=1),
      'top5': jnp.sum(hit5 * mask, axis=1),
      'ensemble_top1': jnp.sum(ensemble_hit1 * mask),
      'count': jnp.sum(mask),
  }


def make_feature_step(cohort, data_config):
  """Returns `feature_step(params, batch_stats, images) -> features`: every peer's pooled
  backbone feature in eval mode, L2-normalised, per cohort group `[K_g, B, d_g]`; images uint8."""
  mean, std = tuple(data_config.mean), tuple(data_config.std)

  def feature_step(peer_params, batch_stats, images):
    outputs, _ = cohort.apply(
        peer_params, batch_stats, augment.normalize(images, mean, std), train=False
    )
    return tuple(
        losses.l2_normalize(out['feature'].astype(jnp.float32)) for out in outputs['groups']
    )

  return feature_step


def make_knn_eval_step(cohort, data_config, num_classes: int, k: int, temperature: float):
  """Returns `eval_step(params, batch_stats, batch, bank) -> counts` as `make_eval_step`, with
  the class scores of a weighted k-nearest-neighbour classifier in each peer's feature space
  instead of its classifier (for peers whose classifier is not trained): the k bank features of
  largest cosine similarity s vote for their labels with weight exp(s / temperature).

  bank: {'features': per cohort group `[K_g, M, d_g]` (from `make_feature_step`, on training
  images), 'labels': int32 `[M]`}.
  """
  feature_step = make_feature_step(cohort, data_config)

  def eval_step(peer_params, batch_stats, batch, bank):
    features = feature_step(peer_params, batch_stats, batch['image'])
    similarity = jnp.concatenate(
        [jnp.einsum('kbd,kmd->kbm', f, b) for f, b in zip(features, bank['features'])], axis=0
    )  # [K, B, M]
    top, index = jax.lax.top_k(similarity, min(k, similarity.shape[-1]))
    votes = (
        jax.nn.one_hot(bank['labels'][index], num_classes) * jnp.exp(top / temperature)[..., None]
    )
    return eval_counts(jnp.sum(votes, axis=2), batch)

  return eval_step
