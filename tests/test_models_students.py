"""Tests of the distillation rows' extra nets: CRD's CIFAR ShuffleNetV1 and ResNet50, mdistiller's
ImageNet MobileNetV1 and L-MCL's ImageNet ShuffleNetV2 1x: parameter counts against the reference
modules, output contract, stage layout, stage tails and BatchNorm state."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import models
from mcl_jax.models import shufflenet, shufflenet_v1

from support import abstract_variables, draw_variables, num_params

# Exact parameter counts (BatchNorm running stats excluded), each equal to the reference PyTorch
# module's `sum(p.numel() for p in net.parameters())`, whose eval-mode outputs also match these
# models' with the same weights (float32, relative difference ~1e-6):
#   shufflenetv1: HobbitLong/RepDistiller models/ShuffleNetv1.py ShuffleV1(num_classes=100)
#     (commit b84f547c5db6a35318d4671d7d5c4de74c822403);
#   resnet50_cifar: HobbitLong/RepDistiller models/resnetv2.py ResNet50(num_classes=100) (same commit);
#   mobilenetv1: megvii-research/mdistiller mdistiller/models/imagenet/mobilenetv1.py MobileNetV1()
#     (commit a08d46f10d6102bd6e3f258ca5ac880b020ea259; 1000 classes);
#   shufflenetv2_1_0_imagenet: winycg/L-MCL models/shufflenetv2_imagenet.py ShuffleNetV2_1x_imagenet(
#     num_classes=1000) (commit 2c0901efbee5ef35e90bcae751183a616bf806fa), the same count as
#     torchvision 0.29's models.shufflenet_v2_x1_0().
EXACT_PARAMS = {
    'shufflenetv1': (100, 949_258),
    'resnet50_cifar': (100, 23_705_252),
    'mobilenetv1': (1000, 4_231_976),
    'shufflenetv2_1_0_imagenet': (1000, 2_278_604),
}
CIFAR_ARCHS = ('shufflenetv1', 'resnet50_cifar')
IMAGENET_ARCHS = ('mobilenetv1', 'shufflenetv2_1_0_imagenet')
# Published millions of parameters at 1000 classes: MobileNet-V1 1.0-224 (Howard et al. 2017,
# Table 8: 4.2M), ShuffleNet V2 1x (torchvision's model card: 2,278,604; Ma et al. 2018: 2.3M).
PUBLISHED_MILLIONS = {'mobilenetv1': 4.2, 'shufflenetv2_1_0_imagenet': 2.28}

# Per arch: (feature dim, stage widths (block.expansion applied), stride of each stage's input map
# to its output map, counting the stem's stride into the first).
LAYOUT = {
    'shufflenetv1': (960, (240, 480, 960), (2, 2, 2)),
    'resnet50_cifar': (2048, (256, 512, 1024, 2048), (1, 2, 2, 2)),
    'mobilenetv1': (1024, (128, 256, 512, 1024), (4, 2, 2, 2)),  # stride-2 stem, stride-2 stage
    'shufflenetv2_1_0_imagenet': (1024, (24, 116, 232, 464), (4, 2, 2, 2)),  # the stem is stage 0
}


def _ceil_div(n, d):
  return -(-n // d)


def test_archs_registered_with_stage_tails():
  for arch in EXACT_PARAMS:
    assert models.spec(arch).stage_tails, arch
  assert 'resnet50' in models.names()  # torchvision's ImageNet ResNet-50 stays


@pytest.mark.parametrize('arch', tuple(EXACT_PARAMS))
def test_exact_param_count(arch):
  num_classes, exact = EXACT_PARAMS[arch]
  size = 224 if arch in IMAGENET_ARCHS else 32
  variables = abstract_variables(models.get_model(arch, num_classes), (1, size, size, 3))
  assert num_params(variables) == exact
  assert set(variables) == {'params', 'batch_stats'}
  if arch in PUBLISHED_MILLIONS:
    assert abs(exact / 1e6 / PUBLISHED_MILLIONS[arch] - 1) < 0.01


def test_param_count_follows_classes_and_input_channels():
  """Only the classifier and the stem see num_classes / input channels: the 10-class net on 28x28x1
  differs from the 100-class one on 32x32x3 by 90 * (960 + 1) + 2 * 24 (ShuffleV1's 1x1 stem)."""
  small = abstract_variables(models.get_model('shufflenetv1', 10), (1, 28, 28, 1))
  assert EXACT_PARAMS['shufflenetv1'][1] - num_params(small) == 90 * 961 + 2 * 24


def _check_output(model, arch, out, image_shape, batch):
  feature_dim, widths, strides = LAYOUT[arch]
  assert model.feature_dim == feature_dim and model.num_stages == len(widths)
  assert out['logits'].shape == (batch, model.num_classes) and out['logits'].dtype == jnp.float32
  assert out['feature'].shape == (batch, feature_dim) and out['feature'].dtype == jnp.float32
  size, expected = image_shape[0], []
  for stride in strides:
    size = _ceil_div(size, stride)
    expected.append((batch, size, size))
  # L-MCL sizes its auxiliary branches' inputs with stage_widths * block.expansion.
  assert [w * model.block.expansion for w in model.stage_widths] == list(widths)
  chex.assert_shape(list(out['stages']), [e + (w,) for e, w in zip(expected, widths)])


@pytest.mark.parametrize('arch', CIFAR_ARCHS)
@pytest.mark.parametrize('image_shape', [(28, 28, 1), (32, 32, 3)])
def test_cifar_output_contract(arch, image_shape):
  model = models.get_model(arch, 10)
  x = jnp.zeros((2, *image_shape))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), abstract_variables(model, x.shape))
  _check_output(model, arch, out, image_shape, 2)


@pytest.mark.parametrize('arch', IMAGENET_ARCHS)
def test_imagenet_output_contract(arch):
  model = models.get_model(arch, 1000)
  x = jnp.zeros((2, 224, 224, 3))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), abstract_variables(model, x.shape))
  _check_output(model, arch, out, (224, 224, 3), 2)
  assert [s.shape[1] for s in out['stages']] == [56, 28, 14, 7]  # as the ImageNet ResNets'


def test_imagenet_peers_have_the_resnets_stage_count():
  """L-MCL needs every peer of a cohort to have as many stages; its ImageNet cohorts pair ShuffleNetV2
  1x with ResNet-18 / ResNet-50 (and CKD's MobileNetV1 taps the same four boundaries)."""
  counts = {
      a: models.get_model(a, 10).num_stages for a in ('resnet18', 'resnet50', *IMAGENET_ARCHS)
  }
  assert set(counts.values()) == {4}, counts


def test_channel_shuffle_groups_3_matches_torch_order():
  """torch: view(N, 3, C/3, H, W).permute(0, 2, 1, 3, 4): output channel 3j + g is input g * C/3 + j."""
  x = jnp.arange(6.0).reshape(1, 1, 1, 6)
  np.testing.assert_array_equal(shufflenet.channel_shuffle(x, 3)[0, 0, 0], [0, 2, 4, 1, 3, 5])


def test_shufflev1_downsampling_shortcut_counts_padding():
  """The stride-2 unit's shortcut is torch's AvgPool2d(3, 2, 1) (count_include_pad): on an all-ones
  input its corner output is 4 / 9; it follows the conv branch in the concatenation."""
  unit = shufflenet_v1.ShuffleV1Unit(features=240, strides=2)
  x = jnp.ones((1, 4, 4, 24))
  variables = draw_variables(abstract_variables(unit, x.shape))
  y = unit.apply(variables, x, train=False)
  assert y.shape == (1, 2, 2, 240)
  np.testing.assert_allclose(y[0, 0, 0, 216:], 4 / 9, rtol=1e-6)
  np.testing.assert_allclose(y[0, 1, 1, 216:], 1.0, rtol=1e-6)
  # The first unit after the 24-channel stem has an ungrouped first 1x1 conv (the reference's rule).
  assert variables['params']['conv1']['kernel'].shape == (1, 1, 24, 54)
  assert variables['params']['conv3']['kernel'].shape == (1, 1, 18, 216)  # 3 groups


@pytest.fixture(scope='module', params=['shufflenetv1', 'mobilenetv1', 'shufflenetv2_1_0_imagenet'])
def eval_run(request):
  """A real eval-mode forward of a net on a small batch: [2, 28, 28, 1] for the CIFAR ShuffleNetV1,
  [2, 64, 64, 3] for the ImageNet nets."""
  arch = request.param
  shape = (2, 28, 28, 1) if arch in CIFAR_ARCHS else (2, 64, 64, 3)
  model = models.get_model(arch, 10)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = draw_variables(abstract_variables(model, x.shape))
  out, state = jax.jit(functools.partial(model.apply, train=False, mutable=['batch_stats']))(
      variables, x
  )
  return arch, model, x, variables, out, state


def test_small_forward(eval_run):
  arch, model, x, _, out, _ = eval_run
  _check_output(model, arch, out, x.shape[1:], x.shape[0])
  assert bool(jnp.all(jnp.isfinite(out['logits'])))


def test_batch_stats_follow_train_flag(eval_run):
  """train=True moves every running variance (torch's momentum is checked in test_models*.py);
  train=False leaves the statistics unchanged."""
  _, model, x, variables, _, eval_state = eval_run
  chex.assert_trees_all_equal(eval_state['batch_stats'], variables['batch_stats'])
  out, state = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x
  )
  assert bool(jnp.all(jnp.isfinite(out['logits'])))
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
    assert not any(k.startswith('stem') for k in tree)
    assert not any(f'stage{s}' in tree for s in range(first_stage))
  sliced = {c: {k: full_variables[c][k] for k in tree} for c, tree in tail_variables.items()}
  chex.assert_trees_all_equal_shapes(tail_variables, sliced)
  return tail, sliced


def test_first_stage_tail_matches_full_network(eval_run):
  """A first_stage=s model is the tail of the full one: same param subtrees, same outputs on stage
  s-1 (the last tail, on the map the L-MCL branch nearest the output starts from)."""
  arch, full, _, variables, full_out, _ = eval_run
  first_stage = full.num_stages - 1
  stage_input = full_out['stages'][first_stage - 1]
  tail, sliced = _tail_variables(arch, first_stage, variables, stage_input.shape)
  tail_out = jax.jit(functools.partial(tail.apply, train=False))(sliced, stage_input)
  assert tail.feature_dim == full.feature_dim
  chex.assert_trees_all_close(tail_out['stages'], full_out['stages'][first_stage:], atol=1e-4)
  chex.assert_trees_all_close(tail_out['logits'], full_out['logits'], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('arch', tuple(EXACT_PARAMS))
def test_every_first_stage_tail_is_a_subtree(arch):
  size = 64 if arch in IMAGENET_ARCHS else 32
  full = models.get_model(arch, 10)
  full_variables = abstract_variables(full, (2, size, size, 3))
  out = jax.eval_shape(
      lambda v: full.apply(v, jnp.zeros((2, size, size, 3)), train=False), full_variables
  )
  for first_stage in range(1, full.num_stages):
    _tail_variables(arch, first_stage, full_variables, out['stages'][first_stage - 1].shape)


def test_bad_args_raise():
  with pytest.raises(ValueError, match='keeps the width'):
    abstract_variables(shufflenet_v1.ShuffleV1Unit(features=480), (1, 8, 8, 240))
  with pytest.raises(ValueError, match='strides must be 1 or 2'):
    abstract_variables(shufflenet_v1.ShuffleV1Unit(features=240, strides=3), (1, 8, 8, 240))
  model = models.get_model('shufflenetv2_1_0_imagenet', 10, first_stage=4)
  with pytest.raises(ValueError, match='first_stage'):
    abstract_variables(model, (1, 8, 8, 464))
