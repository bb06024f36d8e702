"""Offline teacher -> student distillation: a frozen teacher from an mcl_jax checkpoint, and the
plain logit-KD (Hinton) student.

The teacher is peer 0 of a run trained by mcl_jax (`teacher.checkpoint` = its --workdir, e.g. from
configs/cifar100_teacher.py or configs/fashion_mnist_kd.py:role=teacher), of architecture
`teacher.arch`. `Distillation.load_frozen` restores it once; the trainer passes it to every step
as `ctx.frozen` (replicated, never checkpointed with the student). It is applied in inference mode
(BatchNorm running statistics) to the same augmented images as the students, under
`stop_gradient`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mcl_jax import losses
from mcl_jax.checkpoint import CheckpointError
from mcl_jax.methods import base
from mcl_jax.methods.base import Method

TRAIN_A_TEACHER = (
    'Train one first, e.g. `python -m mcl_jax.main --config '
    'configs/fashion_mnist_kd.py:role=teacher --workdir <dir>` (or '
    'configs/cifar100_teacher.py), then set teacher.checkpoint=<dir> and '
    'teacher.arch to its architecture.'
)


@flax.struct.dataclass
class Teacher:
  """A frozen network: `teacher(images)` -> its outputs ('logits' [B, C], 'feature' [B, D])."""

  model: nn.Module = flax.struct.field(pytree_node=False)
  params: Any
  batch_stats: Any

  def __call__(self, images):
    variables = {'params': self.params, 'batch_stats': self.batch_stats}
    return jax.lax.stop_gradient(self.model.apply(variables, images, train=False))


def teacher_model(arch: str, num_classes: int) -> nn.Module:
  from mcl_jax import models  # pylint: disable=g-import-not-at-top  (methods load before models)

  if not arch:
    raise CheckpointError(
        f"A distillation method needs teacher.arch (the teacher run's "
        f'model.arch). {TRAIN_A_TEACHER}'
    )
  return models.get_model(arch, num_classes)


def load_teacher(config) -> Teacher:
  """Peer 0 of the newest checkpoint under `<teacher.checkpoint>/checkpoints/latest`.

  Raises FileNotFoundError (no checkpoint there) or CheckpointError (a run of another
  architecture / data set, or variables that do not fit `teacher.arch`), naming the path.
  """
  from mcl_jax import data  # pylint: disable=g-import-not-at-top

  workdir = config.teacher.checkpoint
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints', 'latest') if workdir else ''
  manager = (
      ocp.CheckpointManager(directory, item_names=('state', 'meta'))
      if os.path.isdir(directory)
      else None
  )
  step = manager.latest_step() if manager else None
  if step is None:
    raise FileNotFoundError(
        f'method.name={config.method.name!r} needs a trained teacher, but teacher.checkpoint='
        f'{workdir!r} holds no mcl_jax checkpoint ({directory or "unset"}). {TRAIN_A_TEACHER}'
    )
  where = f'{directory}/{step}'
  identity = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'][
      'identity'
  ]
  if identity['archs'][0] != config.teacher.arch or identity['data'] != config.data.name:
    raise CheckpointError(
        f'The teacher checkpoint {where} is peer 0 = {identity["archs"][0]!r} trained on '
        f'{identity["data"]!r}, but the config asks for teacher.arch={config.teacher.arch!r} on '
        f'data.name={config.data.name!r}. Set teacher.arch={identity["archs"][0]!r}, or point '
        f'teacher.checkpoint at a matching run. {TRAIN_A_TEACHER}'
    )
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  manager.close()
  peer0 = lambda groups: jax.tree.map(lambda leaf: jnp.asarray(leaf[0]), groups[0])  # noqa: E731
  params, batch_stats = peer0(state['params']['peers']), peer0(state['batch_stats'])

  info = data.dataset_info(config.data.name)
  model = teacher_model(config.teacher.arch, info.num_classes)
  expected = jax.eval_shape(
      lambda key, x: model.init(key, x, train=False),
      jax.random.key(0),
      jnp.zeros((1,) + info.image_shape, jnp.float32),
  )
  expected = {'params': expected['params'], 'batch_stats': expected.get('batch_stats', {})}
  found = {'params': params, 'batch_stats': batch_stats}
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
  if shapes(expected) != shapes(found):
    raise CheckpointError(
        f'The variables in the teacher checkpoint {where} do not fit teacher.arch='
        f'{config.teacher.arch!r} with {info.num_classes} classes. {TRAIN_A_TEACHER}'
    )
  return Teacher(model, params, batch_stats)


@dataclasses.dataclass(frozen=True)
class Distillation(Method):
  """Base of the teacher -> student methods: loads the teacher as the frozen variables. Every
  peer of the cohort is a student of the same teacher (usually one peer). The teacher is the
  `teacher` config section (`teacher.arch`, `teacher.checkpoint`), not a method key."""

  @classmethod
  def validate(cls, config, run):
    found = super().validate(config, run)
    if run is not None and not run.teacher_arch:
      found.append(
          f"teacher.arch='': method.name={config.name!r} needs the teacher's architecture. "
          + TRAIN_A_TEACHER
      )
    return found

  def layout(self, params, state):
    return base.same_placement(params, base.PEER), state_layout(state)

  def load_frozen(self, config):
    return {'teacher': load_teacher(config)}

  @staticmethod
  def teacher_outputs(batch, ctx) -> dict:
    return ctx.frozen['teacher'](batch['image'])


def state_layout(state: dict) -> dict:
  """Distillation state: per-peer memory banks `[K, N, D]` and NCE constants `[K, ...]`; the
  class index replicated."""
  placement = {'memory': base.PEER_EXAMPLE, 'Z': base.PEER}
  return {
      key: base.same_placement(value, placement.get(key, base.REPLICATED))
      for key, value in state.items()
  }


class KD(Distillation):
  """Plain logit KD (Hinton et al.): `ce_weight * CE + kd_weight * sum_k T^2 KL(p_t^T || p_k^T)`;
  the defaults are CRD's KD baseline (0.1 CE + 0.9 KD at T = 4)."""

  legacy_names = {'ce_weight': 'gamma', 'kd_weight': 'alpha'}
  hparams = {
      'ce_weight': base.non_negative(0.1, "weight of the students' CE"),
      'kd_weight': base.non_negative(0.9, 'weight of the logit KD to the teacher'),
      'kd_T': base.positive(4.0, 'temperature of the KD term'),
  }

  def loss(self, params, state, outputs, batch, ctx):
    c = self.config
    teacher_logits = self.teacher_outputs(batch, ctx)['logits']
    ce = losses.ce_loss(outputs['logits'], batch['label'])
    kd = jnp.sum(losses.soft_kl(outputs['logits'], teacher_logits[None], c.kd_T))
    return c.ce_weight * ce + c.kd_weight * kd, {'ce': ce, 'kd': kd}, state
