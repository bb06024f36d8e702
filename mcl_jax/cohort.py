"""K peer networks as one pytree with a leading peer axis, and how to apply them.

A cohort is a tuple of *groups*; each group is K_g peers of one architecture whose variables are
stacked along axis 0 (`params[g]` leaves are `[K_g, ...]`). A homogeneous cohort is one group; a
heterogeneous one (e.g. ResNet-32 + WRN-16-2) is several. Outputs are concatenated over groups where
shapes agree (logits `[K, B, C]`) and kept per group where they do not (features `[K_g, B, d_g]`).

How the peers of a group are applied is a strategy, chosen in one place (`apply_group`):
- `vmap`:   `jax.vmap` over the stacked variables (the textbook form; on GPU/TPU the K convolutions
            become one batched/grouped convolution).
- `unroll`: the K_g peers applied one after another inside the same jit (XLA:CPU runs grouped
            convolutions far slower than K plain ones; see BENCHMARKS.md).
- `auto`:   a decision cached on this machine for the run's exact setup, else the
            measured-fastest per backend (`AUTO_STRATEGY`).
- `autotune`: the candidates (`CANDIDATES`) timed for the run's exact shapes, the fastest kept
            (mcl_jax/autotune.py, in the loop layer: it times jitted train steps).

On a mesh with a `peer` axis (`Cohort.mesh`), a group whose K_g the axis divides is applied under
`jax.shard_map` over `peer` (manual) with `data` left to the partitioner: each device applies only
its K_g / peer local peers with the strategy above and the outputs come back stacked
`P('peer', ...)`; the losses (cross-peer terms included) are computed outside by the partitioner.
Both this and leaving the stacked cohort to jit's partitioner (`mesh.peer_shard_map=False`) match
the 1-device run (tests/test_sharding.py); on 8 fake CPU devices the shard_map program was
1.5-6.1x faster (BENCHMARKS.md §4), so it is the default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mcl_jax import models, sharding

STRATEGIES = ('auto', 'autotune', 'vmap', 'unroll')
CANDIDATES = ('vmap', 'unroll')  # what `auto` and `autotune` resolve to

# Fastest strategy per backend, from benchmarks/cohort_step.py (BENCHMARKS.md). Backends not listed
# use vmap: batching the peers is what accelerators are good at.
AUTO_STRATEGY = {'cpu': 'unroll'}


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """A candidate for `strategy`: itself, or for `auto` and `autotune` the per-backend default
  (which the loop replaces by a cached or measured decision, mcl_jax/autotune.py)."""
  if strategy not in STRATEGIES:
    raise ValueError(f'cohort.strategy={strategy!r} is not one of {STRATEGIES}.')
  if strategy in CANDIDATES:
    return strategy
  return AUTO_STRATEGY.get(backend or jax.default_backend(), 'vmap')


def peer_slice(tree, k: int):
  return jax.tree.map(lambda leaf: leaf[k], tree)


def stack_trees(trees: Sequence[Any]):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@dataclasses.dataclass(frozen=True)
class PeerGroup:
  """`num_peers` peers of one architecture; a multi-branch model (MCL-OKD, MCL(x4)) has
  `num_branches` > 1 and its outputs carry a branch axis."""

  model: nn.Module
  num_peers: int
  arch: str
  num_branches: int = 1

  @property
  def num_views(self) -> int:
    """The group's entries on the peer axis of the cohort's logits: every branch of a
    multi-branch model is a view, so num_peers * num_branches (num_peers when single-branch)."""
    return self.num_peers * self.num_branches


@dataclasses.dataclass(frozen=True)
class Cohort:
  """A cohort of peer networks. Pure: holds no variables, only how to make and apply them."""

  groups: tuple[PeerGroup, ...]
  strategy: str  # resolved: one of CANDIDATES
  mesh: Any = None  # a ('data', 'peer') Mesh: groups are split over 'peer' by shard_map

  @property
  def num_peers(self) -> int:
    return sum(g.num_peers for g in self.groups)

  @property
  def num_views(self) -> int:
    """Length of the peer axis of `apply`'s 'logits': the groups' `num_views` summed."""
    return sum(g.num_views for g in self.groups)

  @property
  def feature_dims(self) -> tuple[int, ...]:
    return tuple(g.model.feature_dim for g in self.groups)

  def layout(self, params, batch_stats):
    """Every peer variable is stacked on its leading peer axis (see mcl_jax.sharding)."""
    return sharding.same_placement((params, batch_stats), sharding.PEER)

  def init(self, rng, sample_images):
    """Independently initialised peers. Returns (params, batch_stats), tuples over groups."""
    params, batch_stats = [], []
    for g, group in enumerate(self.groups):
      keys = jax.random.split(jax.random.fold_in(rng, g), group.num_peers)
      variables = jax.vmap(lambda key: group.model.init(key, sample_images, train=False))(keys)
      params.append(variables['params'])
      batch_stats.append(variables.get('batch_stats', {}))
    return tuple(params), tuple(batch_stats)

  def apply(self, params, batch_stats, images, *, train: bool):
    """Applies every peer to the same images.

    Args:
      params, batch_stats: tuples over groups of stacked variables (`[K_g, ...]` leaves).
      images: `[B, H, W, C]`, shared by all peers.
    Returns:
      (outputs, new_batch_stats): outputs is a dict with 'logits' `[K, B, C]` (groups concatenated
      in order; the branches of a multi-branch model are consecutive peers) and 'groups', a
      tuple of the per-group model outputs with leading `[K_g]` axes ('feature' `[K_g, B, d_g]`,
      'stages', ...). new_batch_stats is batch_stats when not training.
    """
    group_outputs, new_stats = [], []
    for group, p, bs in zip(self.groups, params, batch_stats):
      out, stats = apply_group(
          group.model, p, bs, images, train=train, strategy=self.strategy, mesh=self.mesh
      )
      group_outputs.append(out)
      new_stats.append(stats)
    # A multi-branch model's logits [K_g, M, B, C] count as K_g * M peers (its views).
    logits = jnp.concatenate([flatten_views(o['logits']) for o in group_outputs], axis=0)
    return {'logits': logits, 'groups': tuple(group_outputs)}, tuple(new_stats)


def flatten_views(x):
  """A group's per-peer outputs `[K_g, B, d]`, or `[K_g, M, B, d]` for a multi-branch model, as
  `[K_g * M, B, d]`: one entry per view, the branches of a peer consecutive (the order of the
  cohort's 'logits'). A no-op for a single-branch group."""
  return x.reshape((-1,) + x.shape[-2:])


def peer_axis_size(mesh, num_peers: int) -> int:
  """How many ways `mesh`'s 'peer' axis splits a group of `num_peers` (1: not split)."""
  if mesh is None or 'peer' not in mesh.shape:
    return 1
  peer = mesh.shape['peer']
  return peer if peer > 1 and num_peers % peer == 0 else 1


def apply_group(
    model: nn.Module,
    params,
    batch_stats,
    images,
    *,
    train: bool,
    strategy: str,
    per_peer_inputs: bool = False,
    mesh=None,
):
  """Applies K_g stacked peers of one architecture. Returns (outputs `[K_g, ...]`, batch_stats).

  images: `[B, ...]` shared by all peers, or with `per_peer_inputs` `[K_g, B, ...]`, one input per
  peer (e.g. L-MCL's auxiliary branches on each peer's own stage map).
  mesh: with a 'peer' axis that divides K_g, each device applies its local peers (shard_map).
  """
  local = functools.partial(
      apply_local_peers, model, train=train, strategy=strategy, per_peer_inputs=per_peer_inputs
  )
  num_peers = jax.tree.leaves(params)[0].shape[0]
  if peer_axis_size(mesh, num_peers) == 1:
    return local(params, batch_stats, images)
  return jax.shard_map(
      local,
      mesh=mesh,
      axis_names={'peer'},
      in_specs=(P('peer'), P('peer'), P('peer') if per_peer_inputs else P()),
      out_specs=P('peer'),
  )(params, batch_stats, images)


def apply_local_peers(
    model: nn.Module,
    params,
    batch_stats,
    images,
    *,
    train: bool,
    strategy: str,
    per_peer_inputs: bool,
):
  """`apply_group` on one device's (or the whole) stack of peers, with `strategy`."""

  def apply_one(p, bs, x):
    variables = {'params': p, 'batch_stats': bs}
    if train:
      out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
      return out, updates['batch_stats']
    return model.apply(variables, x, train=False), bs

  if strategy == 'vmap':
    return jax.vmap(apply_one, in_axes=(0, 0, 0 if per_peer_inputs else None))(
        params, batch_stats, images
    )
  if strategy == 'unroll':
    num_peers = jax.tree.leaves(params)[0].shape[0]
    per_peer = [
        apply_one(
            peer_slice(params, k),
            peer_slice(batch_stats, k),
            images[k] if per_peer_inputs else images,
        )
        for k in range(num_peers)
    ]
    return stack_trees(per_peer)
  raise ValueError(f'unresolved cohort strategy {strategy!r}')


def problems(model_config, cohort_config) -> list[str]:
  """What is wrong with the `model` and `cohort` config sections, one line each."""
  found = []
  if cohort_config.num_peers < 1:
    found.append(f'cohort.num_peers={cohort_config.num_peers!r}: must be >= 1')
  if cohort_config.strategy not in STRATEGIES:
    found.append(f'cohort.strategy={cohort_config.strategy!r}: must be one of {STRATEGIES}')
  key = 'model.archs' if model_config.archs else 'model.arch'
  for arch in list(model_config.archs) or [model_config.arch]:
    if arch not in models.names():
      found.append(
          f'{key}={arch!r}: must be a registered model, one of {models.names()} '
          '(or register yours with mcl_jax.models.register)'
      )
  if model_config.archs and len(model_config.archs) != cohort_config.num_peers:
    found.append(
        f'cohort.num_peers={cohort_config.num_peers!r}: must equal '
        f'len(model.archs)={len(model_config.archs)} for a heterogeneous cohort'
    )
  if model_config.dtype not in DTYPES:
    found.append(
        f"model.dtype={model_config.dtype!r}: must be 'float32' or 'bfloat16' ('float64' with "
        'jax_enable_x64, for exactness tests)'
    )
  elif model_config.dtype == 'float64' and not jax.config.jax_enable_x64:
    found.append("model.dtype='float64': needs jax.config.update('jax_enable_x64', True) first")
  return found


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


def peer_archs(model_config, cohort_config) -> tuple[str, ...]:
  """One arch per peer: `model.arch` x `cohort.num_peers`, or `model.archs`."""
  return tuple(model_config.get('archs') or [model_config.arch] * cohort_config.num_peers)


def build_cohort(model_config, cohort_config, num_classes: int, backend: str | None = None):
  """Cohort from config: `model.arch` × `cohort.num_peers`, or `model.archs` (one peer each,
  consecutive equal archs grouped) for heterogeneous cohorts."""
  # float64 (with jax_enable_x64) is for exactness tests: tests/support/sharding_equivalence.py.
  dtype = DTYPES[model_config.get('dtype', 'float32')]
  groups: list[PeerGroup] = []
  for arch in peer_archs(model_config, cohort_config):
    if groups and groups[-1].arch == arch:
      groups[-1] = dataclasses.replace(groups[-1], num_peers=groups[-1].num_peers + 1)
    else:
      model = models.get_model(arch, num_classes, dtype=dtype)
      groups.append(PeerGroup(model, 1, arch, models.spec(arch).num_branches))
  return Cohort(tuple(groups), resolve_strategy(cohort_config.strategy, backend))
