"""L-MCL: layer-wise mutual contrastive learning with meta-learned layer matching (Yang et al.,
TPAMI 2023), docs/methods.md#l-mcl.

Every peer k gets S stages (S = the backbone's number of stages): S - 1 auxiliary branches, fresh
copies of the backbone's later stages (`models.get_model(arch, C, first_stage=s)`, s = 1..S-1) on
the output map of stage s - 1, each with its own classifier, plus the backbone itself. Per
(peer, stage) pooled feature f_{k,s} `[B, d_k]`: an embedding head e_{k,s} `[B, D]` and a
projection P_{k,s} f_{k,s} `[B, 128]` of the layer-matching network phi. Per peer: a stage
aggregator (softmax over stages) whose weighted stage logits a_k are distilled into the final ones.

Per step (main optimiser over peers + branches + heads + aggregators; phi's weights stop-gradient):
    L = sum_{k,s} CE(logits_{k,s}) + sum_k CE(a_k) + sum_{i,j} KL_T(logits_{i,S} || sg a_j)
        + alpha*VCL + gamma*SoftVCL + beta*ICL + lam*SoftICL     (losses.layer_mcl_loss)
Every `meta_every_steps` steps, the meta step (`meta_problem`, `meta_apply`) moves phi (kept in
the method state with its own persistent Nesterov-SGD momentum) along the hyper-gradient of the
all-stage CE after `meta_inner_steps` virtual momentum-SGD steps on the phi-weighted contrastive
loss plus one on the CE (`mcl_jax.meta`); the real parameters are untouched and the virtual steps
have no side effects (no BatchNorm statistics are kept, docs/methods.md#l-mcl-meta-step).

Parameters (`params['method']`): 'branches' (per group, per branch, `[K_g, ...]`), 'heads'
(`[K_g, S, ...]`), 'aggregator' (`[K_g, ...]`). State: 'batch_stats' of the branches, 'phi'
(`[K_g, S, ...]`) and 'phi_opt' (its optimizer state); with `method.memory_bank` (ImageNet,
docs/methods.md#l-mcl-memory-bank) also the per-peer memories 'memory' `[K, N, D]` (every stage
of peer k queries M_k; updated with the final-stage embeddings) and the class index that samples
their slots.
Otherwise the contrast is in-batch (CIFAR) with the class-balanced sampler.

Ablation switches (docs/methods.md#l-mcl-ablation-switches; the defaults are the authors' method):
`meta_learned_weights=False` (layer weights of 1, no meta step), `branch_ce=False` (CE of the final
stage only, in the step and the meta step's outer objective), `stage_pairs='diagonal'` (only
stage s of one peer with stage s of another). The step also logs `mean_w`, the mean layer weight,
and `w_range`, its spread over the combinations.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import cohort as cohort_lib
from mcl_jax import heads, losses, meta, models, optim
from mcl_jax.methods import base
from mcl_jax.methods.base import Method
from mcl_jax.methods.mcl import HPARAMS as MCL_HPARAMS
from mcl_jax.methods.mcl import init_view_memory, memory_layout, sample_contrast_indices

META_MOMENTUM = 0.9  # heavy-ball momentum of the virtual steps, Nesterov momentum of phi's SGD
MATCH_DIM = 128  # width of phi's projections


class StageAggregator(nn.Module):
  """Stage weights of one peer: concat of its S stage features `[B, S*d]` -> Dense(d) -> ReLU ->
  Dense(S) -> softmax over stages `[B, S]`."""

  num_stages: int
  hidden: int

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Dense(self.hidden, name='fc1')(features))
    return jax.nn.softmax(nn.Dense(self.num_stages, name='fc2')(x), axis=-1)


class Stages(NamedTuple):
  """Every peer's stage outputs. features: per group `[K_g, S, B, d_g]`; logits `[K, S, B, C]`
  (stage S-1 is the backbone's own output)."""

  features: tuple
  logits: jax.Array


def _init_peer_stage(module, rng, num_peers: int, num_stages: int, feature_dim: int):
  """`module` params for every (peer, stage), stacked `[K_g, S, ...]`."""
  flat = heads.init_stacked(module, rng, num_peers * num_stages, feature_dim)
  return jax.tree.map(lambda x: x.reshape((num_peers, num_stages) + x.shape[1:]), flat)


def _apply_peer_stage(module, params, features):
  """`[K_g, S, ...]` params on `[K_g, S, B, d]` features -> `[K_g, S, B, out]`."""
  return jax.vmap(lambda p, f: heads.apply_stacked(module, p, f))(params, features)


@dataclasses.dataclass(frozen=True)
class LMCL(Method):
  """The `lmcl` method; hyper-parameters from the `method` config section."""

  hparams = {
      **MCL_HPARAMS,
      'meta_every_steps': base.HParam(
          50, 'steps between meta-updates of phi (0: never)', lambda v: v >= 0, 'must be >= 0'
      ),
      'meta_inner_steps': base.at_least_one(2, 'virtual contrastive steps before the CE step'),
      'meta_grad': base.HParam(
          'exact', 'hyper-gradient: exact or the official recursion', choices=meta.MODES
      ),
      # The virtual steps as straight-line code (fast on XLA:CPU) or a rolled lax.scan whose
      # per-step jax.checkpoint halves the hyper-gradient's memory (BENCHMARKS.md §2).
      'meta_unroll': base.flag(True, 'unroll the virtual steps (else a rolled, remat scan)'),
      # How the virtual steps' gradients are differentiated again (mcl_jax.meta.gradient_fn; the
      # same numbers, reverse-over-forward ~3x faster on XLA:CPU).
      'meta_second_order': base.HParam(
          'reverse_over_forward',
          'second-order rule of the hyper-gradient',
          choices=meta.SECOND_ORDER,
      ),
      # The round as one program or as one program per virtual / reverse step (the same numbers;
      # mcl_jax.meta.per_step_hypergradient). auto: per_step on CPU, where it compiles several
      # times faster in a fraction of the memory (docs/performance.md#l-mcl-meta-step); one
      # program elsewhere (not measured on accelerators).
      'meta_program': base.HParam(
          'auto', 'the meta round as one program or per step', choices=('auto',) + meta.PROGRAMS
      ),
      'meta_weight_decay': base.non_negative(
          5e-4, 'weight decay of the virtual steps and of phi (set it to optim.weight_decay)'
      ),
      'branch_blocks': base.HParam(
          0,
          'blocks per stage of the auxiliary branches (0: as the backbone)',
          lambda v: v >= 0,
          'must be >= 0',
      ),
      # Ablations (docs/methods.md#l-mcl-ablation-switches); the defaults are the authors' method.
      'meta_learned_weights': base.flag(
          True, 'layer weights from the meta-learned phi (False: all 1, no meta step)'
      ),
      'branch_ce': base.flag(
          True, "CE on every stage's logits (False: the final stage only, also in the meta step)"
      ),
      'stage_pairs': base.HParam(
          'all',
          'stage pairs (s, t) contrasted between two peers: all S^2, or the diagonal s == t',
          choices=('all', 'diagonal'),
      ),
  }

  @classmethod
  def validate(cls, config, run):
    found = super().validate(config, run)
    if run is None:
      return found
    if run.num_peers < 2:
      found.append(
          f'method.name=lmcl needs >= 2 peers, got cohort.num_peers={run.num_peers}: set '
          'cohort.num_peers=2 (or more).'
      )
    specs = {arch: models.spec(arch) for arch in run.archs if arch in models.names()}
    multi = sorted(a for a, s in specs.items() if s.num_branches > 1)
    if multi:
      base_arch, _, _ = multi[0].rpartition('_okd')
      found.append(
          f'method.name=lmcl needs single-branch peers; {multi} are multi-branch models (MCL-OKD, '
          'MCL(x4)): L-MCL attaches auxiliary branches, a stage aggregator and layer matching '
          'to every stage of each peer, and branches on a shared trunk own no stages before '
          'the split. '
          f'Use independent peers of the base net instead, e.g. model.arch='
          f'{base_arch or "resnet32"} with cohort.num_peers={specs[multi[0]].num_branches}.'
      )
    no_tails = sorted(a for a, s in specs.items() if s.num_branches == 1 and not s.stage_tails)
    if no_tails:
      found.append(
          f'method.name=lmcl builds auxiliary branches from stage tails, which {no_tails} do not '
          'offer (register the arch with stage_tails=True).'
      )
    if not multi and not no_tails:
      stages = {models.get_model(a, run.num_classes).num_stages for a in specs}
      if len(stages) > 1:
        found.append(
            f'method.name=lmcl needs peers with the same number of stages; the archs '
            f'{sorted(specs)} have {sorted(stages)}.'
        )
    return found

  def layout(self, params, state):
    # Every parameter and the branches' statistics, phi and its momentum are stacked per peer.
    per_peer = {
        key: base.same_placement(state[key], base.PEER) for key in ('batch_stats', 'phi', 'phi_opt')
    }
    return base.same_placement(params, base.PEER), {**memory_layout(state), **per_peer}

  @property
  def class_balanced(self):  # in-batch contrast: every anchor needs an in-batch positive
    return not self.config.memory_bank

  @property
  def meta_every_steps(self):  # fixed layer weights: nothing to meta-learn
    return self.config.meta_every_steps if self.config.get('meta_learned_weights', True) else 0

  @property
  def head(self):
    return heads.EmbeddingHead(dim=self.config.embed_dim)

  def branch_model(self, group, first_stage: int):
    """Auxiliary branch of a peer group: its stages first_stage.. + pool + own classifier."""
    model = models.get_model(
        group.arch, group.model.num_classes, group.model.dtype, first_stage=first_stage
    )
    if self.config.branch_blocks > 0:  # lighter branches (the authors' ImageNet models: 1 block)
      model = model.clone(stage_sizes=(self.config.branch_blocks,) * model.num_stages)
    return model

  # ------------------------------------------------------------------------------------------ #
  # Parameters and state.
  # ------------------------------------------------------------------------------------------ #
  def init(self, rng, cohort, train_labels):
    # `validate` has checked the cohort: >= 2 single-branch peers with stage tails, equal stages.
    (num_stages,) = {g.model.num_stages for g in cohort.groups}
    branches, branch_stats, head_params, aggregators, phi = [], [], [], [], []
    for g, (group, dim) in enumerate(zip(cohort.groups, cohort.feature_dims)):
      keys = jax.random.split(jax.random.fold_in(rng, g), 4)
      group_branches, group_stats = [], []
      for first in range(1, num_stages):
        model = self.branch_model(group, first)
        channels = group.model.stage_widths[first - 1] * group.model.block.expansion
        sample = jnp.zeros((1, 8, 8, channels), jnp.float32)
        variables = jax.vmap(lambda k, m=model, x=sample: m.init(k, x, train=False))(
            jax.random.split(jax.random.fold_in(keys[0], first), group.num_peers)
        )
        group_branches.append(variables['params'])
        group_stats.append(variables.get('batch_stats', {}))
      branches.append(tuple(group_branches))
      branch_stats.append(tuple(group_stats))
      head_params.append(_init_peer_stage(self.head, keys[1], group.num_peers, num_stages, dim))
      aggregators.append(
          heads.init_stacked(
              StageAggregator(num_stages, dim), keys[2], group.num_peers, num_stages * dim
          )
      )
      phi.append(_init_peer_stage(nn.Dense(MATCH_DIM), keys[3], group.num_peers, num_stages, dim))
    params = {
        'branches': tuple(branches),
        'heads': tuple(head_params),
        'aggregator': tuple(aggregators),
    }
    phi = tuple(phi)
    phi_opt = meta.meta_optimizer(self.config.meta_weight_decay, META_MOMENTUM).init(phi)
    state = {'batch_stats': tuple(branch_stats), 'phi': phi, 'phi_opt': phi_opt}
    if self.config.memory_bank:
      state.update(
          init_view_memory(  # single-branch peers (validate): one view per peer
              jax.random.fold_in(rng, len(cohort.groups)),
              cohort.num_peers,
              train_labels,
              self.config.embed_dim,
          )
      )
    return params, state

  # ------------------------------------------------------------------------------------------ #
  # Forward pieces, shared by the step loss and the meta objectives.
  # ------------------------------------------------------------------------------------------ #
  def stages(self, cohort, branch_params, branch_stats, outputs, *, train: bool):
    """Runs the auxiliary branches on the peers' stage maps. Returns (Stages, new branch stats)."""
    features, logits, new_stats = [], [], []
    for group, params, stats, out in zip(
        cohort.groups, branch_params, branch_stats, outputs['groups']
    ):
      group_feats, group_logits, group_stats = [], [], []
      for first, (p, s) in enumerate(zip(params, stats), start=1):
        branch_out, s = cohort_lib.apply_group(
            self.branch_model(group, first),
            p,
            s,
            out['stages'][first - 1],
            train=train,
            strategy=cohort.strategy,
            per_peer_inputs=True,
            mesh=cohort.mesh,
        )
        group_feats.append(branch_out['feature'])
        group_logits.append(branch_out['logits'])
        group_stats.append(s)
      features.append(jnp.stack(group_feats + [out['feature']], axis=1))
      logits.append(jnp.stack(group_logits + [out['logits']], axis=1))
      new_stats.append(tuple(group_stats))
    return Stages(tuple(features), jnp.concatenate(logits, axis=0)), tuple(new_stats)

  def match_weights(self, phi, stages: Stages):
    """Layer-matching weights `[K(K-1)S^2, B]` (losses.layer_match_weights order) from phi."""
    proj = [_apply_peer_stage(nn.Dense(MATCH_DIM), p, f) for p, f in zip(phi, stages.features)]
    return losses.layer_match_weights(jnp.concatenate(proj, axis=0))

  def layer_weights(self, phi, stages: Stages):
    """The weights the contrastive terms use, `[K(K-1)S^2, B]`: phi's (`match_weights`) or all 1
    (`meta_learned_weights=False`), zero off the stage diagonal with `stage_pairs='diagonal'`."""
    c = self.config
    num_peers, num_stages, batch = stages.logits.shape[:3]
    if c.get('meta_learned_weights', True):
      weights = self.match_weights(phi, stages)
    else:
      weights = jnp.ones((num_peers * (num_peers - 1) * num_stages**2, batch), jnp.float32)
    if c.get('stage_pairs', 'all') == 'diagonal':
      diagonal = np.eye(num_stages, dtype=np.float32)[None, None, :, :, None]
      weights = weights.reshape(num_peers, num_peers - 1, num_stages, num_stages, batch) * diagonal
      weights = weights.reshape(-1, batch)
    return weights

  def weight_summary(self, weights, num_stages: int) -> dict:
    """Logged, not losses: `mean_w`, the mean layer weight over the contrasted combinations and
    samples, and `w_range`, max - min over the contrasted combinations of each one's batch-mean
    weight (0.05-0.06 at initialisation on the small-data benchmark; it grows if meta-learning
    tells layer pairs apart)."""
    per_combo = jnp.mean(weights, axis=1)  # [K (K-1) S^2]
    if self.config.get('stage_pairs', 'all') == 'diagonal':  # s == t only
      num_pairs = per_combo.shape[0] // num_stages**2
      per_combo = per_combo.reshape(num_pairs, num_stages, num_stages)
      per_combo = jnp.diagonal(per_combo, axis1=1, axis2=2).reshape(-1)
    return {'mean_w': jnp.mean(per_combo), 'w_range': jnp.max(per_combo) - jnp.min(per_combo)}

  def classified_logits(self, stages: Stages):
    """The stage logits the CE terms see `[K, S or 1, B, C]`: every stage, or with
    `branch_ce=False` the final one only."""
    return stages.logits if self.config.get('branch_ce', True) else stages.logits[:, -1:]

  def embeddings(self, head_params, stages: Stages):
    """`[K, S, B, D]` L2-normalised embeddings e_{k,s}."""
    return jnp.concatenate(
        [_apply_peer_stage(self.head, p, f) for p, f in zip(head_params, stages.features)], axis=0
    )

  def aggregate(self, aggregator_params, stages: Stages):
    """Stage-aggregated logits a_k `[K, B, C]`."""
    num_stages = stages.logits.shape[1]
    pis = []
    for p, f in zip(aggregator_params, stages.features):
      k, s, b, d = f.shape
      concat = jnp.transpose(f, (0, 2, 1, 3)).reshape(k, b, s * d)
      pis.append(heads.apply_stacked(StageAggregator(num_stages, d), p, concat))  # [K_g, B, S]
    return jnp.einsum('kbs,ksbc->kbc', jnp.concatenate(pis, axis=0), stages.logits)

  has_eval_classifiers = True

  def eval_classifiers(self, params, state, outputs, cohort):
    """Every auxiliary branch's classifier and the aggregated logits of every peer, in eval mode:
    'peer_<k>_stage_<s>' (s < S - 1; stage S - 1 is the peer itself) and 'peer_<k>_aggregated'.
    The authors' L-MCL test reports the best of these and of the peers over all epochs
    (`eval/best_classifier/top1`, max over evaluations)."""
    stages, _ = self.stages(cohort, params['branches'], state['batch_stats'], outputs, train=False)
    aggregated = self.aggregate(params['aggregator'], stages)
    num_peers, num_stages = stages.logits.shape[:2]
    scores = {}
    for k in range(num_peers):
      for s in range(num_stages - 1):
        scores[f'peer_{k}_stage_{s}'] = stages.logits[k, s]
      scores[f'peer_{k}_aggregated'] = aggregated[k]
    return scores

  def contrast_indices(self, state, batch, rng):
    """Memory slots `[B, 1 + P + Q]` of this step (memory bank only, else None); the train and
    meta steps of one step draw the same slots (same `rng`)."""
    c = self.config
    if not c.memory_bank:
      return None
    return sample_contrast_indices(
        rng, batch['index'], batch['label'], state, c.num_positives, c.num_negatives
    )

  def contrastive_terms(
      self, head_params, stages: Stages, labels, weights, memory=None, contrast_idx=None
  ):
    """(L-MCL totals {vcl, soft_vcl, icl, soft_icl} with per-sample layer weights, the `[K, S,
    B, D]` embeddings); in-batch, or against `memory` at `contrast_idx` when given."""
    c = self.config
    emb = self.embeddings(head_params, stages)
    if memory is None:
      terms = losses.layer_mcl_loss(emb, labels, weights, c.tau, c.kd_T)
    else:
      terms = losses.memory_layer_mcl_loss(
          emb, memory, contrast_idx, c.num_positives, weights, c.tau, c.kd_T
      )
    return dict(zip(('vcl', 'soft_vcl', 'icl', 'soft_icl'), terms)), emb

  def contrastive_loss(self, terms: dict):
    c = self.config
    return (
        c.alpha * terms['vcl']
        + c.gamma * terms['soft_vcl']
        + c.beta * terms['icl']
        + c.lam * terms['soft_icl']
    )

  # ------------------------------------------------------------------------------------------ #
  # The per-step objective (docs/methods.md#l-mcl-per-step-loss).
  # ------------------------------------------------------------------------------------------ #
  def loss(self, params, state, outputs, batch, ctx):
    if ctx.cohort is None:
      raise ValueError('lmcl needs the cohort in its LossContext (ctx.cohort).')
    c, labels = self.config, batch['label']
    stages, new_stats = self.stages(
        ctx.cohort, params['branches'], state['batch_stats'], outputs, train=True
    )
    weights = jax.lax.stop_gradient(self.layer_weights(state['phi'], stages))
    contrast_idx = self.contrast_indices(state, batch, ctx.rng)
    terms, emb = self.contrastive_terms(
        params['heads'], stages, labels, weights, state.get('memory'), contrast_idx
    )
    aggregated = self.aggregate(params['aggregator'], stages)
    final = stages.logits[:, -1]
    terms['ce'] = losses.ce_loss(self.classified_logits(stages), labels)  # all peers, stages
    terms['ce_agg'] = losses.ce_loss(aggregated, labels)
    # sum_i sum_j KL_T(final_i || sg a_j), i == j included (soft_kl stops the target's gradient).
    kl_grid = jax.vmap(jax.vmap(losses.soft_kl, (None, 0, None)), (0, None, None))
    terms['kd'] = jnp.sum(kl_grid(final, aggregated, c.kd_T))
    total = terms['ce'] + terms['ce_agg'] + terms['kd'] + self.contrastive_loss(terms)
    terms.update(self.weight_summary(weights, stages.logits.shape[1]))
    new_state = {**state, 'batch_stats': new_stats}
    if c.memory_bank:  # with the final-stage embeddings only (docs/methods.md#l-mcl-memory-bank)
      new_state['memory'] = losses.memory_update(
          state['memory'], jax.lax.stop_gradient(emb[:, -1]), batch['index'], c.memory_momentum
      )
    return total, terms, new_state

  # ------------------------------------------------------------------------------------------ #
  # Meta-optimisation of phi (docs/methods.md#l-mcl-meta-step).
  # ------------------------------------------------------------------------------------------ #
  def meta_objectives(self, state, batch, cohort, rng=None):
    """(theta0, inner_loss(theta, phi), outer_loss(theta)) of `meta.hypergradient`.

    theta = peers + branches + heads (not the aggregators, not phi). Both objectives run every
    network in train mode on `batch` (augmented, normalised) and drop the new BN statistics; with
    a memory bank the virtual steps contrast against the current memory (never updated there,
    docs/methods.md#l-mcl-choices) at the slots the step's `rng` draws.
    """
    method_params, method_state, labels = state.params['method'], state.method_state, batch['label']
    theta0 = {
        'peers': state.params['peers'],
        'branches': method_params['branches'],
        'heads': method_params['heads'],
    }
    contrast_idx = self.contrast_indices(method_state, batch, rng)

    def stages_of(theta):
      outputs, _ = cohort.apply(theta['peers'], state.batch_stats, batch['image'], train=True)
      return self.stages(
          cohort, theta['branches'], method_state['batch_stats'], outputs, train=True
      )[0]

    def inner_loss(theta, phi):
      stages = stages_of(theta)
      weights = self.layer_weights(phi, stages)  # NOT stop-gradient: the path to phi
      terms, _ = self.contrastive_terms(
          theta['heads'], stages, labels, weights, method_state.get('memory'), contrast_idx
      )
      return self.contrastive_loss(terms)

    def outer_loss(theta):
      return losses.ce_loss(self.classified_logits(stages_of(theta)), labels)

    return theta0, inner_loss, outer_loss

  @property
  def meta_settings(self) -> meta.Settings:
    c = self.config
    return meta.Settings(
        inner_steps=c.meta_inner_steps,
        momentum=META_MOMENTUM,
        mode=c.meta_grad,
        second_order=c.get('meta_second_order', 'reverse_over_forward'),
        unroll=c.get('meta_unroll', True),
    )

  @property
  def meta_program(self) -> str:
    return self.config.get('meta_program', 'auto')

  def meta_problem(self, state, batch, ctx, *, cohort, lr, wd_mask='all') -> meta.Problem:
    theta0, inner_loss, outer_loss = self.meta_objectives(state, batch, cohort, ctx.rng)
    # The virtual steps decay the leaves the real optimizer decays (optim.wd_mask); phi's own SGD
    # decays all of phi (docs/methods.md#l-mcl-meta-step, step 5).
    virtual_wd = jax.tree.map(
        lambda decay: self.config.meta_weight_decay if decay else 0.0,
        optim.weight_decay_mask(theta0, wd_mask),
    )
    return meta.Problem(state.method_state['phi'], theta0, inner_loss, outer_loss, lr, virtual_wd)

  def meta_apply(self, method_state, g_phi, lr):
    phi, phi_opt = meta.meta_sgd_update(
        method_state['phi'],
        g_phi,
        method_state['phi_opt'],
        lr,
        weight_decay=self.config.meta_weight_decay,
        momentum=META_MOMENTUM,
    )
    return {**method_state, 'phi': phi, 'phi_opt': phi_opt}
