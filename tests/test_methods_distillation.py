"""Teacher loading from a real mcl_jax checkpoint, the KD / CKD / CRCD students and MCL-OKD's
multi-branch cohort, end to end through train.run at toy size (a few steps each)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import REPO, tiny_config

from mcl_jax import checkpoint, config_lib, models, train
from mcl_jax.metrics import read_metrics
from mcl_jax.methods import teacher as teacher_lib

TEACHER_ARCH, STUDENT_ARCH = 'resnet20', 'resnet8'


def _run(config, workdir):
  train.run(config, str(workdir))
  return read_metrics(str(workdir))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A ResNet-20 teacher trained 2 steps by mcl_jax (peer 0 of an `independent` run)."""
  workdir = tmp_path_factory.mktemp('teacher')
  _run(
      tiny_config(
          **{
              'method.name': 'independent',
              'model.arch': TEACHER_ARCH,
              'cohort.num_peers': 1,
              'total_steps': 2,
              'data.eval_examples': 32,
          }
      ),
      workdir,
  )
  return str(workdir)


def student_config(method, teacher_dir, **overrides):
  own = {'method.num_negatives': 16} if method == 'crcd' else {}  # CRCD's NCE on 128 images
  return tiny_config(
      **{
          'method.name': method,
          'model.arch': STUDENT_ARCH,
          'cohort.num_peers': 1,
          'total_steps': 2,
          'data.eval_examples': 32,
          'teacher.arch': TEACHER_ARCH,
          'teacher.checkpoint': teacher_dir,
          **own,
          **overrides,
      }
  )


def test_teacher_is_peer0_of_the_checkpoint_frozen_and_in_inference_mode(teacher_dir):
  teacher = teacher_lib.load_teacher(student_config('kd', teacher_dir))
  saved = ocp.StandardCheckpointer().restore(
      os.path.join(teacher_dir, 'checkpoints', 'latest', '2', 'state')
  )
  for got, want in zip(
      jax.tree.leaves(teacher.params), jax.tree.leaves(saved['params']['peers'][0])
  ):
    np.testing.assert_array_equal(got, want[0])
  images = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  variables = {'params': teacher.params, 'batch_stats': teacher.batch_stats}
  np.testing.assert_array_equal(
      teacher(images)['logits'], teacher.model.apply(variables, images, train=False)['logits']
  )
  grads = jax.grad(lambda t: jnp.sum(t(images)['logits'] ** 2))(teacher)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_missing_or_mismatched_teacher_fails_clearly(teacher_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}.*role=teacher'):
    teacher_lib.load_teacher(student_config('ckd', str(tmp_path)))
  with pytest.raises(checkpoint.CheckpointError, match="teacher.arch='resnet20'"):
    teacher_lib.load_teacher(student_config('ckd', teacher_dir, **{'teacher.arch': 'resnet32'}))


@pytest.mark.parametrize(
    'method,terms',
    [
        ('kd', ('ce', 'kd')),
        ('ckd', ('ce', 'ckd')),
        ('crcd', ('ce', 'kd', 'crcd_feat', 'crcd_grad')),
    ],
)
def test_student_methods_train(teacher_dir, tmp_path, method, terms):
  # CRCD: distillation on for the first half (step 0 only), so the logged step-1 loss is CE.
  crcd = {'method.distill_fraction': 0.5} if method == 'crcd' else {}
  config = student_config(method, teacher_dir, **crcd)
  last = _run(config, tmp_path)[-1]
  for term in ('loss',) + terms:
    assert np.isfinite(last[f'train/{term}']), (term, last)
  if method != 'crcd':
    return
  assert last['train/loss'] == pytest.approx(config.method.ce_weight * last['train/ce'], rel=1e-6)
  state = ocp.StandardCheckpointer().restore(
      os.path.join(tmp_path, 'checkpoints', 'latest', '2', 'state')
  )
  assert np.all(state['method_state']['Z']['feat'] > 0) and np.all(
      state['method_state']['Z']['grad'] > 0
  )  # fixed after the first step
  assert set(state['params']['method']['heads']) == {'feat', 'feat_t', 'grad', 'grad_t'}


def test_mcl_okd_branches_are_evaluated_as_peers(tmp_path):
  config = tiny_config(
      **{
          'method.name': 'mcl_okd',
          'model.arch': 'resnet8_okd2',
          'cohort.num_peers': 1,
          'total_steps': 2,
          'data.eval_examples': 32,
          'method.num_negatives': 16,
          'method.contrast_weight': 0.025,
      }
  )
  last = _run(config, tmp_path)[-1]
  for key in (
      'train/ce',
      'train/dot',
      'train/mcl',
      'eval/peer_0/top1',
      'eval/peer_1/top1',
      'eval/ensemble/top1',
  ):
    assert np.isfinite(last[key]), (key, last)
  assert 'eval/peer_2/top1' not in last


@pytest.mark.parametrize('memory_bank', [False, True])
def test_mcl_on_a_multi_branch_net_trains_its_branches_as_peers(tmp_path, memory_bank):
  """MCL(x4)'s form: one shared-trunk network whose branches are MCL's peers (a head and, with
  the memory bank, a memory each), every branch evaluated as a peer."""
  bank = {'method.memory_bank': True, 'method.num_negatives': 16} if memory_bank else {}
  config = tiny_config(
      **{
          'method.name': 'mcl',
          'model.arch': 'resnet8_okd2',
          'cohort.num_peers': 1,
          'total_steps': 2,
          'data.eval_examples': 32,
          'method.logit_kd': True,
          **bank,
      }
  )
  last = _run(config, tmp_path)[-1]
  for key in ('train/vcl', 'train/icl', 'train/soft_icl', 'train/kd', 'eval/peer_1/top1'):
    assert np.isfinite(last[key]), (key, last)
  assert last['train/icl'] > 0  # the two branches contrast with each other
  assert 'eval/peer_2/top1' not in last
  state = ocp.StandardCheckpointer().restore(
      os.path.join(tmp_path, 'checkpoints', 'latest', '2', 'state')
  )
  heads = state['params']['method']['heads'][0]
  assert {leaf.shape[0] for leaf in jax.tree.leaves(heads)} == {2}
  if memory_bank:
    assert state['method_state']['memory'].shape == (2, 128, config.method.embed_dim)


def test_crcd_refuses_multi_branch_students(tmp_path):
  config = student_config('crcd', str(tmp_path), **{'model.arch': 'resnet8_okd2'})
  with pytest.raises(
      config_lib.ConfigError, match=r"crcd needs single-branch students.*\['resnet8_okd2'\]"
  ):
    train.validate(config)


def test_multi_branch_resnet_shares_stem_and_first_stage():
  def count(arch, channels=3, **kw):
    shapes = jax.eval_shape(
        lambda: models.get_model(arch, 100, **kw).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, channels)), train=False
        )['params']
    )
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))

  full, tail = count('resnet32'), count('resnet32', channels=16, first_stage=1)
  assert count('resnet32_okd4') == full + 3 * tail  # 1 shared trunk, 4 tails


@pytest.mark.parametrize(
    'config_arg',
    [
        'fashion_mnist_kd.py:role=teacher,smoke',
        'fashion_mnist_kd.py:method=crcd,smoke',
        'fashion_mnist_kd.py:method=mcl_okd,smoke',
        'cifar100_teacher.py:smoke',
        'cifar100_ckd.py:pair=res56_res20,smoke',
        'cifar100_ckd.py:pair=vgg13_mv2,kd,smoke',
        'cifar100_crcd.py:pair=wrn40_2_wrn_16_2,smoke',
        'cifar100_mcl_okd.py:arch=resnet110,smoke',
    ],
)
def test_configs_validate(config_arg):
  name, arg = config_arg.split(':')
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.data.name = 'fashion_mnist'  # CIFAR-100 is not prepared here
  train.validate(config)
  assert config.total_steps == 12  # smoke
