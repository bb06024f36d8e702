"""Tests of the model zoo: parameter counts, output contract, BatchNorm state, bf16, stage slicing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import models

from support import abstract_variables, num_params

CIFAR_ARCHS = (
    'resnet8',
    'resnet20',
    'resnet32',
    'resnet56',
    'resnet110',
    'resnet8x4',
    'resnet32x4',
    'wrn_16_2',
    'wrn_40_1',
    'wrn_40_2',
    'wrn_28_4',
)
IMAGENET_ARCHS = ('resnet18', 'resnet34', 'resnet50')

# Millions of parameters (BatchNorm running stats excluded) of the reference architectures:
# 100 classes for CIFAR nets (CRD / MCL READMEs), 1000 for torchvision's ImageNet ResNets.
REFERENCE_MILLIONS = {
    'resnet8': 0.08,
    'resnet20': 0.28,
    'resnet32': 0.47,
    'resnet56': 0.86,
    'resnet110': 1.17,  # bottleneck variant, as in the MCL-OKD README table (docs/methods.md)
    'resnet8x4': 1.23,
    'resnet32x4': 7.43,
    'wrn_16_2': 0.70,
    'wrn_40_1': 0.57,
    'wrn_40_2': 2.26,
    'wrn_28_4': 5.87,
    'resnet18': 11.69,
    'resnet34': 21.80,
    'resnet50': 25.56,
}


def _conv(cin, cout, k=3):
  return cin * cout * k * k


def _bn(c):
  return 2 * c  # scale + bias; running stats are not params


def _cifar_resnet32_params(num_classes):
  """ResNet-32, counted by hand: 3 stages x 5 post-activation basic blocks, projection shortcuts."""
  total = _conv(3, 16) + _bn(16)
  cin = 16
  for width in (16, 32, 64):
    for _ in range(5):
      total += _conv(cin, width) + _bn(width) + _conv(width, width) + _bn(width)
      if cin != width:
        total += _conv(cin, width, 1) + _bn(width)
      cin = width
  return total + 64 * num_classes + num_classes


def _wrn_16_2_params(num_classes):
  """WRN-16-2, counted by hand: 3 groups x 2 pre-activation blocks (widths 32/64/128), final BN."""
  total = _conv(3, 16)
  cin = 16
  for width in (32, 64, 128):
    for _ in range(2):
      total += _bn(cin) + _conv(cin, width) + _bn(width) + _conv(width, width)
      if cin != width:
        total += _conv(cin, width, 1)  # no BN on the WRN shortcut
      cin = width
  return total + _bn(128) + 128 * num_classes + num_classes


def test_archs_registered():
  assert set(CIFAR_ARCHS) | set(IMAGENET_ARCHS) <= set(models.names())


@pytest.mark.parametrize('arch', CIFAR_ARCHS + IMAGENET_ARCHS)
def test_param_count_matches_reference(arch):
  num_classes, size = (1000, 224) if arch in IMAGENET_ARCHS else (100, 32)
  variables = abstract_variables(models.get_model(arch, num_classes), (1, size, size, 3))
  assert round(num_params(variables) / 1e6, 2) == REFERENCE_MILLIONS[arch]
  assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize(
    'arch, exact',
    [
        # Both equal the backbone + classifier of the authors'-style PyTorch step that
        # benchmarks/suite.py times.
        ('resnet32', _cifar_resnet32_params(100)),
        ('wrn_16_2', _wrn_16_2_params(100)),
        (
            'resnet110',
            1_170_868,
        ),  # 3 x 12 bottlenecks (16/32/64 x4); the basic-block R-110 has 1.73M
    ],
)
def test_exact_param_count(arch, exact):
  variables = abstract_variables(models.get_model(arch, 100), (1, 32, 32, 3))
  assert num_params(variables) == exact


@pytest.mark.parametrize('arch', CIFAR_ARCHS)
@pytest.mark.parametrize('image_shape', [(28, 28, 1), (32, 32, 3)])
def test_cifar_output_contract(arch, image_shape):
  model = models.get_model(arch, 10)
  x = jnp.zeros((2, *image_shape))
  variables = abstract_variables(model, x.shape)
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)

  assert out['logits'].shape == (2, 10) and out['logits'].dtype == jnp.float32
  assert out['feature'].shape == (2, model.feature_dim) and out['feature'].dtype == jnp.float32
  size = image_shape[0]
  expected_spatial = [size, -(-size // 2), -(-size // 4)]  # strides 1, 2, 2 with symmetric padding
  assert [s.shape[1] for s in out['stages']] == expected_spatial
  assert [s.shape[2] for s in out['stages']] == expected_spatial
  assert out['stages'][-1].shape[-1] == model.feature_dim


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_imagenet_output_contract(arch):
  model = models.get_model(arch, 1000)
  x = jnp.zeros((2, 224, 224, 3))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), abstract_variables(model, x.shape))
  chex.assert_shape(out['logits'], (2, 1000))
  chex.assert_shape(out['feature'], (2, model.feature_dim))
  expansion = 4 if arch == 'resnet50' else 1
  chex.assert_shape(
      list(out['stages']),
      [(2, s, s, c * expansion) for s, c in zip((56, 28, 14, 7), (64, 128, 256, 512))],
  )


def test_unknown_arch_raises():
  with pytest.raises(ValueError, match='resnet9.*resnet32.*wrn_16_2'):
    models.get_model('resnet9', 10)


def test_register_declares_capabilities_and_protects_names():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Linear(nn.Module):
    num_classes: int
    dtype: object = jnp.float32
    feature_dim = 8

    @nn.compact
    def __call__(self, x, *, train):
      feature = nn.Dense(8)(x.reshape(x.shape[0], -1))
      return {'logits': nn.Dense(self.num_classes)(feature), 'feature': feature, 'stages': ()}

  models.register('test_linear', Linear)
  assert models.spec('test_linear') == models.ArchSpec(Linear, 1, False)
  assert models.get_model('test_linear', 3).num_classes == 3
  with pytest.raises(ValueError, match='does not build stage tails'):
    models.get_model('test_linear', 3, first_stage=1)
  with pytest.raises(ValueError, match="model 'resnet8' is already registered"):
    models.register('resnet8', Linear)
  assert models.spec('resnet8').stage_tails and models.spec('resnet8_okd2').num_branches == 2


def test_init_statistics():
  """Convs: kaiming-normal fan_out (std sqrt(2 / (9 * C_out))); classifier: torch's U(+-1/sqrt(d))."""
  model = models.get_model('resnet8', 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  kernel = params['stage2']['block0']['conv2']['kernel']  # [3, 3, 64, 64]
  np.testing.assert_allclose(jnp.std(kernel), np.sqrt(2 / (9 * 64)), rtol=0.03)
  bound = 1 / np.sqrt(model.feature_dim)
  for leaf in jax.tree.leaves(params['classifier']):
    assert float(jnp.max(jnp.abs(leaf))) <= bound


def test_batch_stats_follow_train_flag():
  """train=True updates running stats with torch's momentum; train=False leaves them unchanged."""
  model = models.get_model('resnet8', 10)
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)

  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  stem = variables['params']['stem_conv']['kernel']
  stem_out = jax.lax.conv_general_dilated(
      x, stem, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  stats = state['batch_stats']['stem_bn']
  np.testing.assert_allclose(stats['mean'], 0.1 * stem_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * stem_out.var((0, 1, 2)), rtol=1e-4)
  for old, new in zip(
      jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(state['batch_stats'])
  ):
    assert not np.allclose(old, new)

  _, state = model.apply(variables, x, train=False, mutable=['batch_stats'])
  chex.assert_trees_all_equal(state['batch_stats'], variables['batch_stats'])


def test_bf16_compute_keeps_float32_params_and_logits():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  model = models.get_model('wrn_16_2', 10, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

  out = model.apply(variables, x, train=False)
  assert out['logits'].dtype == jnp.float32 and out['feature'].dtype == jnp.float32
  assert all(s.dtype == jnp.bfloat16 for s in out['stages'])
  reference = models.get_model('wrn_16_2', 10).apply(variables, x, train=False)
  tolerance = 0.05 * np.abs(reference['logits']).max()
  np.testing.assert_allclose(out['logits'], reference['logits'], atol=tolerance)


@pytest.mark.parametrize('arch', ['resnet8', 'wrn_16_2'])
def test_first_stage_tail_matches_full_network(arch):
  """A first_stage=s model is the tail of the full one: same param subtrees, same outputs on stage s-1."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  full = models.get_model(arch, 10)
  variables = full.init(jax.random.key(0), x, train=False)
  full_out = full.apply(variables, x, train=False)

  for first_stage in (1, 2):
    tail = models.get_model(arch, 10, first_stage=first_stage)
    stage_input = full_out['stages'][first_stage - 1]
    tail_variables = abstract_variables(tail, stage_input.shape)
    for collection, tree in tail_variables.items():
      assert 'stem_conv' not in tree and f'stage{first_stage - 1}' not in tree
      chex.assert_trees_all_equal_shapes(tree, {k: variables[collection][k] for k in tree})

    sliced = {c: {k: variables[c][k] for k in tree} for c, tree in tail_variables.items()}
    tail_out = tail.apply(sliced, stage_input, train=False)
    assert len(tail_out['stages']) == 3 - first_stage
    chex.assert_trees_all_close(tail_out['stages'], full_out['stages'][first_stage:], atol=1e-5)
    chex.assert_trees_all_close(tail_out['logits'], full_out['logits'], atol=1e-5)
    assert tail.feature_dim == full.feature_dim


def test_first_stage_out_of_range_raises():
  model = models.get_model('resnet8', 10, first_stage=3)
  with pytest.raises(ValueError, match='first_stage'):
    abstract_variables(model, (1, 8, 8, 64))
