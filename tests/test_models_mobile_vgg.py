"""Tests of the CIFAR ShuffleNetV2 / VGG / MobileNetV2 models: parameter counts, output contract,
BatchNorm state, stage slicing and argument checks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import models
from mcl_jax.models import mobilenet, shufflenet

from support import abstract_variables, draw_variables, num_params

# Exact parameter counts (BatchNorm running stats excluded) at 100 classes. Each equals the count of a
# PyTorch transcription of the reference code (winycg/MCL models/shufflenetv2.py; CRD models/vgg.py
# vgg8_bn / vgg13_bn and models/mobilenetv2.py mobile_half), whose eval-mode outputs also match these
# models' with the same weights.
EXACT_PARAMS = {
    'shufflenetv2_0_5': 444_292,
    'shufflenetv2_1_0': 1_356_104,  # CRD's table: 1.3M (its 1x1-stem variant has 1_355_528)
    # CRD's table says 3.96M; with its conv biases (kept: CRD trains vgg8_bn, bias=True) the count
    # rounds to 3.97M. Without the 1,472 redundant conv biases it would be 3_963_556.
    'vgg8': 3_965_028,
    'vgg13': 9_462_180,  # CRD: 9.46M
    'mobilenetv2': 812_836,  # CRD: 0.81M
}
NEW_ARCHS = tuple(EXACT_PARAMS)


def _vgg_params(stage_sizes, num_classes):
  """CRD's VGG-BN counted by hand: 3x3 convs with bias, BN scale + bias, Dense(512 -> C)."""
  total, cin = 0, 3
  for n, width in zip(stage_sizes, (64, 128, 256, 512, 512)):
    for _ in range(n):
      total += 9 * cin * width + width + 2 * width
      cin = width
  return total + 512 * num_classes + num_classes


def _ceil_div(n, d):
  return -(-n // d)


def test_archs_registered():
  assert set(NEW_ARCHS) <= set(models.names())


@pytest.mark.parametrize('arch', NEW_ARCHS)
def test_exact_param_count(arch):
  variables = abstract_variables(models.get_model(arch, 100), (1, 32, 32, 3))
  assert num_params(variables) == EXACT_PARAMS[arch]
  assert set(variables) == {'params', 'batch_stats'}


def test_vgg_param_count_by_hand():
  assert EXACT_PARAMS['vgg8'] == _vgg_params((1,) * 5, 100)
  assert EXACT_PARAMS['vgg13'] == _vgg_params((2,) * 5, 100)


@pytest.mark.parametrize(
    'arch, feature_dim, strides',
    [
        ('shufflenetv2_0_5', 1024, (2, 2, 2)),
        ('shufflenetv2_1_0', 1024, (2, 2, 2)),
        ('vgg8', 512, (1, 2, 2, 2, 1)),  # VGG's max-pools floor
        ('vgg13', 512, (1, 2, 2, 2, 1)),
        ('mobilenetv2', 1280, (2, 1, 2, 2, 2)),  # stride-2 stem, then the stages
    ],
)
@pytest.mark.parametrize('image_shape', [(28, 28, 1), (32, 32, 3)])
def test_output_contract(arch, feature_dim, strides, image_shape):
  model = models.get_model(arch, 10)
  x = jnp.zeros((2, *image_shape))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), abstract_variables(model, x.shape))

  assert model.feature_dim == feature_dim
  assert out['logits'].shape == (2, 10) and out['logits'].dtype == jnp.float32
  assert out['feature'].shape == (2, feature_dim) and out['feature'].dtype == jnp.float32
  assert len(out['stages']) == model.num_stages
  size = image_shape[0]
  expected = []
  for s in strides:
    size = size // s if arch.startswith('vgg') else _ceil_div(size, s)
    expected.append(size)
  expected = expected[-model.num_stages :]  # MobileNetV2's stem stride comes first
  chex.assert_shape(
      list(out['stages']),
      # L-MCL sizes its auxiliary branches' inputs with stage_widths * block.expansion.
      [(2, s, s, w * model.block.expansion) for s, w in zip(expected, model.stage_widths)],
  )


def test_bf16_compute_keeps_float32_logits():
  model = models.get_model('mobilenetv2', 10, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  variables = abstract_variables(model, x.shape)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out['logits'].dtype == jnp.float32 and out['feature'].dtype == jnp.float32
  assert all(s.dtype == jnp.bfloat16 for s in out['stages'])


def test_channel_shuffle_matches_torch_order():
  """torch: view(N, 2, C/2, H, W).permute(0, 2, 1, 3, 4): output channel 2j + g is input g * C/2 + j."""
  x = jnp.arange(6.0).reshape(1, 1, 1, 6)
  np.testing.assert_array_equal(shufflenet.channel_shuffle(x)[0, 0, 0], [0, 3, 1, 4, 2, 5])


@pytest.fixture(scope='module')
def shufflenet_run():
  """The smallest net (ShuffleNetV2 0.5x) on a real [2, 28, 28, 1] batch, in eval mode."""
  model = models.get_model('shufflenetv2_0_5', 10)
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  variables = draw_variables(abstract_variables(model, x.shape))
  out, state = jax.jit(functools.partial(model.apply, train=False, mutable=['batch_stats']))(
      variables, x
  )
  return model, x, variables, out, state


def test_batch_stats_follow_train_flag(shufflenet_run):
  """train=True updates the running stats with torch's momentum (every running variance moves),
  train=False leaves them unchanged."""
  model, x, variables, eval_out, eval_state = shufflenet_run
  chex.assert_trees_all_equal(eval_state['batch_stats'], variables['batch_stats'])

  out, state = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x
  )
  assert bool(jnp.all(jnp.isfinite(out['logits']))) and bool(
      jnp.all(jnp.isfinite(eval_out['logits']))
  )
  stem_out = jax.lax.conv_general_dilated(
      x,
      variables['params']['stem_conv']['kernel'],
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  old, new = variables['batch_stats']['stem_bn'], state['batch_stats']['stem_bn']
  batch_mean, batch_var = stem_out.mean((0, 1, 2)), stem_out.var((0, 1, 2))
  np.testing.assert_allclose(
      new['mean'], 0.9 * old['mean'] + 0.1 * batch_mean, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(new['var'], 0.9 * old['var'] + 0.1 * batch_var, rtol=1e-4)
  # Means of BNs fed by a linear map of a normalised map barely move; compare the variances.
  for (path, old), new in zip(
      jax.tree_util.tree_leaves_with_path(variables['batch_stats']),
      jax.tree.leaves(state['batch_stats']),
  ):
    if path[-1].key == 'var':
      assert not np.allclose(old, new), path


def _tail_variables(arch, first_stage, full_variables, stage_input_shape):
  """The first_stage tail model, and the full network's variables sliced to the tail's tree."""
  tail = models.get_model(arch, 10, first_stage=first_stage)
  tail_variables = abstract_variables(tail, stage_input_shape)
  for tree in tail_variables.values():
    assert 'stem_conv' not in tree and f'stage{first_stage - 1}' not in tree
  sliced = {c: {k: full_variables[c][k] for k in tree} for c, tree in tail_variables.items()}
  chex.assert_trees_all_equal_shapes(tail_variables, sliced)
  return tail, sliced


@pytest.mark.parametrize('arch', ['vgg13', 'mobilenetv2'])
def test_first_stage_tail_is_a_subtree(arch):
  full = models.get_model(arch, 10)
  full_variables = abstract_variables(full, (2, 32, 32, 3))
  out = jax.eval_shape(
      lambda v: full.apply(v, jnp.zeros((2, 32, 32, 3)), train=False), full_variables
  )
  for first_stage in range(1, full.num_stages):
    _tail_variables(arch, first_stage, full_variables, out['stages'][first_stage - 1].shape)


def test_first_stage_tail_matches_full_network(shufflenet_run):
  """A first_stage=s model is the tail of the full one: same param subtrees, same outputs on stage s-1."""
  full, _, variables, full_out, _ = shufflenet_run
  first_stage = 1
  stage_input = full_out['stages'][first_stage - 1]
  tail, sliced = _tail_variables('shufflenetv2_0_5', first_stage, variables, stage_input.shape)
  tail_out = jax.jit(functools.partial(tail.apply, train=False))(sliced, stage_input)
  chex.assert_trees_all_close(tail_out['stages'], full_out['stages'][first_stage:], atol=1e-5)
  chex.assert_trees_all_close(tail_out['logits'], full_out['logits'], atol=1e-5)
  assert tail.feature_dim == full.feature_dim


@pytest.mark.parametrize(
    'arch, first_stage', [('vgg8', 5), ('shufflenetv2_1_0', -1), ('mobilenetv2', 4)]
)
def test_first_stage_out_of_range_raises(arch, first_stage):
  model = models.get_model(arch, 10, first_stage=first_stage)
  with pytest.raises(ValueError, match='first_stage'):
    abstract_variables(model, (1, 8, 8, 16))


def test_bad_args_raise():
  with pytest.raises(ValueError, match='keeps the width'):
    abstract_variables(shufflenet.ShuffleUnit(features=64), (1, 8, 8, 32))
  with pytest.raises(ValueError, match='strides must be 1 or 2'):
    abstract_variables(shufflenet.ShuffleUnit(features=64, strides=3), (1, 8, 8, 64))
  with pytest.raises(ValueError, match='width_mult'):
    mobilenet.mobilenet_v2(0.0)
  # MobileNetV2's rows fix its stage sizes (e.g. L-MCL's branch_blocks cannot shorten them).
  model = models.get_model('mobilenetv2', 10).clone(stage_sizes=(1, 1, 1, 1))
  with pytest.raises(ValueError, match='disagree with its rows'):
    abstract_variables(model, (1, 32, 32, 3))
