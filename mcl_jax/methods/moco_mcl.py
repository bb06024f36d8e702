"""Self-supervised MCL (Yang et al.): K MoCo learners teaching each other, no labels
(docs/methods.md#self-supervised-mcl). With one peer it is MoCo (He et al., CVPR 2020).

Every peer is a query encoder (its backbone + a projection head, trained) and a key encoder (an
exponential moving average of it, in the method state), with a queue of Q earlier keys. One step,
in this order:

1. two views of every image, drawn on device from `fold_in(seed, step)` (`augmentation`); for
   streamed data (ImageNet) the two crops + flips are drawn on the host from the full-resolution
   image (`host_views`: the batch brings 'image' and 'image2') and only the colour part on device;
2. queries `[K, N, D]`: the peers and their heads on the first view;
3. the key encoders move towards the query encoders as they are before this step's update:
   theta_k <- m theta_k + (1 - m) theta_q;
4. keys `[K, N, D]`, without gradient, from the updated key encoders on the second view, with
   shuffle-BN (below);
5. the loss `losses.moco_mcl_loss` (VCL, SoftVCL, ICL, SoftICL, each with its weight);
6. every peer's keys replace the oldest Q-queue rows;
7. the optimizer updates the query encoders and heads.

Shuffle-BN: BatchNorm lets a batch's images exchange information, through which a network can find
the positive key without learning anything. As in the authors' multi-GPU runs, every BatchNorm
(query and key encoders) normalises over `bn_groups` fixed consecutive sub-batches of the global
batch, and the key view's batch is permuted (a permutation drawn from `fold_in(seed, step)`)
before the key encoder and un-permuted after it, so a query and its positive key are normalised
with different companions. The running statistics are the mean of the sub-batches' updates.

The training step never receives the labels (`uses_labels = False`); the peers' classifiers are
not trained. Evaluation (mcl_jax/train.py) therefore classifies by k-nearest neighbours in each
peer's backbone feature space (`knn_*` keys) instead of with the classifier.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mcl_jax import contrastive_augment, data, heads, losses
from mcl_jax.methods import base
from mcl_jax.methods.base import Method

HPARAMS = {
    'vcl_weight': base.non_negative(1.0, 'weight of VCL (each peer its own MoCo InfoNCE)'),
    'soft_vcl_weight': base.non_negative(1.0, 'weight of soft VCL'),
    'icl_weight': base.non_negative(1.0, "weight of ICL (queries against another peer's keys)"),
    'soft_icl_weight': base.non_negative(1.0, 'weight of soft ICL'),
    'tau': base.positive(0.07, 'contrastive temperature'),
    'kd_T': base.positive(3.0, 'temperature of the soft (KL) terms'),
    'queue_size': base.at_least_one(65536, 'keys in each peer queue (a multiple of the batch)'),
    'key_momentum': base.fraction(0.999, 'momentum m of the key encoders (EMA of the queries)'),
    'embed_dim': base.at_least_one(128, 'width D of the projection (MoCo dim)'),
    'mlp_head': base.flag(
        False, 'MoCo v2 projection Linear(d, d)-ReLU-Linear(d, D) (else Linear(d, D))'
    ),
    'bn_groups': base.at_least_one(8, 'shuffle-BN: BatchNorm over this many sub-batches'),
    'augmentation': base.HParam(
        'v1',
        'views: MoCo v1, MoCo v2, or grey (crop, flip, brightness/contrast)',
        choices=contrastive_augment.RECIPES,
    ),
    'knn_k': base.at_least_one(200, 'evaluation: neighbours of the kNN classifier'),
    'knn_temperature': base.positive(0.1, 'evaluation: kNN vote weight exp(similarity / t)'),
    'knn_bank_examples': base.HParam(
        10000,
        'evaluation: training images in the kNN bank (-1: all; 0: no kNN, the untrained '
        'classifiers are evaluated)',
        lambda v: v >= -1,
        'must be >= -1',
    ),
}


def grouped_apply(cohort, params, batch_stats, images, groups: int):
  """Every peer in training mode on `groups` fixed consecutive sub-batches of `images`, each with
  its own BatchNorm statistics (the models are vmapped over the sub-batches).

  Args:
    cohort: a `mcl_jax.cohort.Cohort`; params, batch_stats: its stacked variables.
    images: `[N, H, W, C]`, N a multiple of `groups`.
  Returns:
    (features, batch_stats): per cohort group the pooled features `[K_g, N, d_g]` in the rows'
    order, and the new running statistics, the mean over sub-batches of each one's update.
  """
  rows = images.shape[0]
  split = images.reshape((groups, rows // groups) + images.shape[1:])
  outputs, stats = jax.vmap(lambda x: cohort.apply(params, batch_stats, x, train=True))(split)

  def merge(feature):  # [G, K_g, N / G, d] -> [K_g, N, d]
    feature = jnp.moveaxis(feature, 0, 1)
    return feature.reshape((feature.shape[0], rows) + feature.shape[3:])

  features = tuple(merge(out['feature']) for out in outputs['groups'])
  return features, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def momentum_update(key_encoder, query_encoder, momentum: float):
  """theta_k <- m theta_k + (1 - m) theta_q, leaf by leaf; no gradient reaches theta_q."""
  query_encoder = jax.lax.stop_gradient(query_encoder)
  return jax.tree.map(lambda k, q: momentum * k + (1 - momentum) * q, key_encoder, query_encoder)


def shuffle_permutation(rng, rows: int) -> tuple[jax.Array, jax.Array]:
  """(permutation, its inverse) of the key batch's rows."""
  permutation = jax.random.permutation(rng, rows)
  return permutation, jnp.argsort(permutation)


@dataclasses.dataclass(frozen=True)
class MoCoMCL(Method):
  """The `moco_mcl` method; hyper-parameters from the `method` config section.

  Params: 'heads', per cohort group the peers' projection heads `[K_g, ...]`. State:
  'key_encoder' ({'peers', 'heads'}: the EMA copies, `[K_g, ...]`), 'key_batch_stats' (the key
  encoders' own BatchNorm statistics), 'queue' `[K, Q, D]` (unit rows) and 'queue_ptr' (int32).
  """

  hparams = HPARAMS
  uses_labels = False
  # Streamed sources crop the full-resolution image twice on the host (MoCo's scale 0.2-1).
  host_views = data.HostViews(count=2, crop_scale=contrastive_augment.CROP_AREA)

  @classmethod
  def validate(cls, config, run):
    found = super().validate(config, run)
    if found or run is None:
      return found
    batch = run.batch_size
    if config.queue_size % batch:
      found.append(
          f'method.queue_size={config.queue_size} must be a multiple of the global batch '
          f'(batch_size={batch}): every step replaces batch_size rows of the queue.'
      )
    if batch % config.bn_groups:
      found.append(
          f'method.bn_groups={config.bn_groups} must divide batch_size={batch} (shuffle-BN '
          f'normalises over bn_groups equal sub-batches).'
      )
    channels = run.image_shape[-1] if run.image_shape else None
    if config.augmentation != 'grey' and channels not in (None, 3):
      found.append(
          f'method.augmentation={config.augmentation!r} needs RGB images; the data has '
          f"{channels} channel(s): use method.augmentation='grey'."
      )
    from mcl_jax import models  # pylint: disable=g-import-not-at-top  (methods load before models)

    branched = sorted(
        {a for a in run.archs if a in models.names() and models.spec(a).num_branches > 1}
    )
    if branched:
      found.append(
          f'method.name=moco_mcl needs one encoder per peer; {branched} are multi-branch '
          'networks: use their single-branch architectures.'
      )
    return found

  @property
  def knn_eval(self):
    c = self.config
    if c.knn_bank_examples == 0:
      return None
    return base.KnnEval(c.knn_k, c.knn_temperature, c.knn_bank_examples)

  def head(self, feature_dim: int):
    d = self.config.embed_dim
    if self.config.mlp_head:
      return heads.EmbeddingHead(dim=d, hidden=feature_dim)
    return heads.LinearEmbeddingHead(dim=d)

  def embed(self, head_params, features):
    """`[K, N, D]` unit embeddings: each cohort group's heads on its features."""
    return jnp.concatenate(
        [heads.apply_stacked(self.head(f.shape[-1]), p, f) for p, f in zip(head_params, features)],
        axis=0,
    )

  def init(self, rng, cohort, train_labels):
    raise NotImplementedError('moco_mcl starts from the peers: call init_with_peers.')

  def init_with_peers(self, rng, cohort, train_labels, peer_variables):
    del train_labels
    peer_params, peer_stats = peer_variables
    head_rng, queue_rng = jax.random.split(rng)
    head_params = tuple(
        heads.init_stacked(self.head(dim), jax.random.fold_in(head_rng, g), group.num_peers, dim)
        for g, (group, dim) in enumerate(zip(cohort.groups, cohort.feature_dims))
    )
    queue = jax.random.normal(
        queue_rng, (cohort.num_peers, self.config.queue_size, self.config.embed_dim)
    )
    state = {
        # The key encoders start as copies of the query encoders (MoCo's initialisation).
        'key_encoder': {'peers': peer_params, 'heads': head_params},
        'key_batch_stats': peer_stats,
        'queue': losses.l2_normalize(queue),
        'queue_ptr': jnp.zeros((), jnp.int32),
    }
    return {'heads': head_params}, state

  def layout(self, params, state):
    state_layout = base.same_placement(state, base.PEER)
    state_layout['queue_ptr'] = base.REPLICATED
    return base.same_placement(params, base.PEER), state_layout

  def augment(self, batch, rng, aug):
    # 'image2' present: two host views, cropped and flipped already (no second crop here).
    query, key = contrastive_augment.two_views(
        batch['image'],
        rng,
        self.config.augmentation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        key_images_uint8=batch.get('image2'),
    )
    return {'image': query, 'key_image': key}

  def forward(self, cohort, peer_params, batch_stats, batch):
    features, stats = grouped_apply(
        cohort, peer_params, batch_stats, batch['image'], self.config.bn_groups
    )
    return {'features': features}, stats

  def keys(self, key_encoder, key_batch_stats, images, ctx):
    """(keys `[K, N, D]` held constant, new key BatchNorm statistics): the key encoders on the
    permuted batch, un-permuted."""
    permutation, inverse = shuffle_permutation(ctx.rng, images.shape[0])
    features, stats = grouped_apply(
        ctx.cohort,
        key_encoder['peers'],
        key_batch_stats,
        images[permutation],
        self.config.bn_groups,
    )
    keys = self.embed(key_encoder['heads'], features)[:, inverse]
    return jax.lax.stop_gradient(keys), stats

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    queries = self.embed(params['heads'], outputs['features'])
    key_encoder = momentum_update(
        state['key_encoder'], {'peers': ctx.peer_params, 'heads': params['heads']}, c.key_momentum
    )
    keys, key_batch_stats = self.keys(
        key_encoder, state['key_batch_stats'], batch['key_image'], ctx
    )
    logits = losses.moco_logits(queries, keys, state['queue'], c.tau)
    terms = losses.moco_mcl_terms(logits, c.kd_T)
    total = (
        c.vcl_weight * terms['vcl']
        + c.soft_vcl_weight * terms['soft_vcl']
        + c.icl_weight * terms['icl']
        + c.soft_icl_weight * terms['soft_icl']
    )
    top1 = losses.moco_pretext_top1(logits)
    terms['pretext_top1'] = jnp.mean(top1)
    terms.update({f'peer_{i}/pretext_top1': top1[i] for i in range(top1.shape[0])})
    queue, queue_ptr = losses.moco_enqueue(state['queue'], state['queue_ptr'], keys)
    new_state = {
        'key_encoder': key_encoder,
        'key_batch_stats': key_batch_stats,
        'queue': queue,
        'queue_ptr': queue_ptr,
    }
    return total, terms, new_state
