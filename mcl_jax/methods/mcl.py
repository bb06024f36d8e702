"""MCL: mutual contrastive learning (Yang et al., AAAI 2022) as a cohort method.

Loss = CE + alpha*VCL + gamma*SoftVCL + beta*ICL + lam*SoftICL (+ logit KD to the stop-gradient
ensemble), all terms summed over peers / ordered peer pairs (docs/methods.md#mcl). The "peers"
of the losses are the cohort's views: its peers, where each branch of a multi-branch peer (the
authors' shared-trunk MCL(x4) nets, `<base>_okd<M>`) is one view, in the order of
`outputs['logits']`. Each view has its own embedding head on its pooled feature. Two variants:
- in-batch (CIFAR): the contrast set is the batch; batches come from the class-balanced sampler
  (m images per class) so every anchor has a positive;
- memory bank (ImageNet, `method.memory_bank=True`): per-view memories `[V, N, D]` in the method
  state, 1 + P positive and Q negative indices per sample drawn from `fold_in(rng, step)`,
  momentum-updated after the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import heads, losses
from mcl_jax.cohort import flatten_views
from mcl_jax.config_lib import ConfigError
from mcl_jax.losses.nce import init_memory
from mcl_jax.methods import base
from mcl_jax.methods.base import Method

# MCL's hyper-parameters, with the paper's names for its loss weights (shared by L-MCL).
HPARAMS = {
    'tau': base.positive(0.1, 'contrastive temperature'),
    'kd_T': base.positive(3.0, 'temperature of the soft (KL) contrastive terms and logit KD'),
    'alpha': base.non_negative(0.1, 'weight of VCL (vanilla contrastive loss across peers)'),
    'gamma': base.non_negative(1.0, 'weight of soft VCL'),
    'beta': base.non_negative(0.1, 'weight of ICL (interactive contrastive loss)'),
    'lam': base.non_negative(1.0, 'weight of soft ICL'),
    'logit_kd': base.flag(False, 'add logit KD to the stop-gradient ensemble'),
    'include_self_positive': base.flag(
        False, "ICL: count the same image as seen by the other peer among the anchor's positives"
    ),
    'embed_dim': base.at_least_one(128, 'width of the embedding heads'),
    'memory_bank': base.flag(False, 'contrast against per-peer memory banks (ImageNet)'),
    'num_positives': base.at_least_one(1, 'memory bank: positives per anchor'),
    'num_negatives': base.at_least_one(8192, 'memory bank: negatives per anchor'),
    'memory_momentum': base.fraction(0.5, 'memory bank: momentum of the slot update'),
    'samples_per_class': base.at_least_one(
        2, 'class-balanced sampler (in-batch contrast): images per class in a batch'
    ),
}


def view_embeddings(head, head_params, outputs):
  """Embeddings `[V, B, D]` of all views (`Cohort.num_views`, in the order of
  `outputs['logits']`): each group's heads on its features (`[K_g, B, d_g]`, or `[K_g, M, B, d_g]`
  from a multi-branch model, flattened to its K_g * M views), concatenated."""
  return jnp.concatenate(
      [
          heads.apply_stacked(head, p, flatten_views(out['feature']))
          for p, out in zip(head_params, outputs['groups'])
      ],
      axis=0,
  )


def init_view_heads(head, rng, cohort):
  """One head per view (`PeerGroup.num_views`: a peer, or a branch of a multi-branch peer), stacked
  per cohort group (feature widths differ between groups)."""
  return tuple(
      heads.init_stacked(head, jax.random.fold_in(rng, g), group.num_views, dim)
      for g, (group, dim) in enumerate(zip(cohort.groups, cohort.feature_dims))
  )


@dataclasses.dataclass(frozen=True)
class MCL(Method):
  """The `mcl` method; hyper-parameters from the `method` config section."""

  hparams = HPARAMS

  @property
  def class_balanced(self):  # in-batch contrast needs positives in the batch
    return not self.config.memory_bank

  @property
  def head(self):
    return heads.EmbeddingHead(dim=self.config.embed_dim)

  def init(self, rng, cohort, train_labels):
    head_rng, memory_rng = jax.random.split(rng)
    params = {'heads': init_view_heads(self.head, head_rng, cohort)}
    if not self.config.memory_bank:
      return params, {}
    return params, init_view_memory(
        memory_rng, cohort.num_views, train_labels, self.config.embed_dim
    )

  def layout(self, params, state):
    return base.same_placement(params, base.PEER), memory_layout(state)

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    labels, example_index = batch['label'], batch.get('index')
    emb = view_embeddings(self.head, params['heads'], outputs)
    if not c.memory_bank:
      return (
          *losses.mcl_loss(
              emb,
              outputs['logits'],
              labels,
              tau=c.tau,
              T=c.kd_T,
              alpha=c.alpha,
              beta=c.beta,
              gamma=c.gamma,
              lam=c.lam,
              logit_kd=c.logit_kd,
              include_self_positive=c.include_self_positive,
          ),
          state,
      )
    idx = sample_contrast_indices(
        ctx.rng, example_index, labels, state, c.num_positives, c.num_negatives
    )
    terms = losses.memory_vcl_icl_losses(emb, state['memory'], idx, c.num_positives, c.tau, c.kd_T)
    terms['ce'] = losses.ce_loss(outputs['logits'], labels)
    terms['kd'] = (
        losses.logit_kd_loss(outputs['logits'], c.kd_T)
        if c.logit_kd
        else jnp.zeros_like(terms['ce'])
    )
    total = (
        terms['ce']
        + terms['kd']
        + c.alpha * terms['vcl']
        + c.gamma * terms['soft_vcl']
        + c.beta * terms['icl']
        + c.lam * terms['soft_icl']
    )
    memory = losses.memory_update(
        state['memory'], jax.lax.stop_gradient(emb), example_index, c.memory_momentum
    )
    return total, terms, {**state, 'memory': memory}


def init_view_memory(rng, num_views: int, train_labels, dim: int) -> dict:
  """Memory banks `[V, N, dim]`, one per view (a peer, or a branch of a multi-branch peer; the
  authors' uniform init in +-1/sqrt(dim/3), deliberately not normalised,
  docs/methods.md#mcl-memory-bank) and the class index used to sample their slots."""
  memory = init_memory(rng, len(train_labels), dim, normalise=False, leading=(num_views,))
  return {'memory': memory, **class_index(train_labels)}


def memory_layout(state: dict) -> dict:
  """Per-view memory banks split over views and examples; the class index replicated."""
  return {
      key: base.same_placement(value, base.PEER_EXAMPLE if key == 'memory' else base.REPLICATED)
      for key, value in state.items()
  }


def check_negative_pool(labels: np.ndarray, num_neg: int) -> None:
  """Sampling without replacement needs `num_neg` <= N - (largest class): fail before compiling."""
  labels = np.asarray(labels)
  pool = len(labels) - int(np.bincount(labels).max())
  if num_neg > pool:
    raise ConfigError(
        f'method.num_negatives={num_neg} exceeds the {pool} other-class examples '
        'available to the largest class: lower method.num_negatives.'
    )


def class_index(labels: np.ndarray) -> dict:
  """Example indices sorted by class, with each class's offset and count (for O(1) sampling)."""
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1
  counts = np.bincount(labels, minlength=num_classes)
  return {
      'by_class': jnp.asarray(np.argsort(labels, kind='stable'), jnp.int32),
      'class_offset': jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32),
      'class_count': jnp.asarray(counts, jnp.int32),
  }


def sample_contrast_indices(
    rng, own_index, labels, index, num_pos: int, num_neg: int, replace: bool = True
):
  """`[B, 1 + P + Q]` memory indices: own slot, P same-class slots (uniform over the class, which
  contains the sample itself, as the reference), Q other-class slots.

  `replace=True` draws the Q negatives uniformly with replacement (MCL's memory bank,
  docs/methods.md#mcl-memory-bank: O(B Q), fine at ImageNet's N). `replace=False` draws a
  uniform Q-subset of the other-class slots per row (CRD-style 'exact' sampling of MCL-OKD and
  CRCD, docs/methods.md#nce-over-a-memory-bank): top-Q of uniform keys over all N ranks with the
  own class masked out, O(B N) — meant for CIFAR-sized N; the method's init checks Q against the
  smallest pool (:func:`check_negative_pool`).
  """
  pos_rng, neg_rng = jax.random.split(rng)
  offset = index['class_offset'][labels][:, None]
  count = index['class_count'][labels][:, None]
  batch = labels.shape[0]
  pos_rank = jax.random.randint(pos_rng, (batch, num_pos), 0, count)
  num_examples = index['by_class'].shape[0]
  if replace:
    # Uniform over the N - count other-class slots: draw a rank there and skip over the own class.
    neg_rank = jax.random.randint(neg_rng, (batch, num_neg), 0, num_examples - count)
    neg_rank = jnp.where(neg_rank >= offset, neg_rank + count, neg_rank)
  else:
    rank = jnp.arange(num_examples)[None, :]
    own_class = (rank >= offset) & (rank < offset + count)
    keys = jnp.where(own_class, -1.0, jax.random.uniform(neg_rng, (batch, num_examples)))
    _, neg_rank = jax.lax.top_k(keys, num_neg)
  positives = index['by_class'][offset + pos_rank]
  negatives = index['by_class'][neg_rank]
  return jnp.concatenate([own_index[:, None], positives, negatives], axis=1).astype(jnp.int32)
