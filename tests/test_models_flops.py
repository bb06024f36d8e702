"""Tests of the MAC counter (`models.count_macs`): hand-counted small nets and published figures."""

import flax.linen as nn
import jax
import pytest

from mcl_jax import models
from mcl_jax.models import flops


class TwoConvDense(nn.Module):
  """conv 3x3 (3 -> 4, stride 1) -> conv 3x3 (4 -> 6, stride 2) -> flatten -> Dense(5)."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), padding='SAME')(x))
    x = nn.Conv(6, (3, 3), strides=2, padding='SAME')(x)
    x = nn.BatchNorm(use_running_average=True)(x)  # counts zero
    x = nn.avg_pool(x, (1, 1))  # counts zero
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class GroupedConvs(nn.Module):
  """3x3 conv with 4 groups (8 -> 8), then a 3x3 depthwise conv (8 channels)."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.Conv(8, (3, 3), padding='SAME', feature_group_count=4)(x)
    return nn.Conv(8, (3, 3), padding='SAME', feature_group_count=8)(x)


class ScanAndCond(nn.Module):
  """A Dense(4 -> 4) applied 3 times by scan, then a cond with a cheap and a dear branch."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    w = self.param('w', nn.initializers.zeros, (4, 4))
    x = x.reshape(x.shape[0], -1)  # [1, 4]
    x, _ = jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=3)  # 3 x 4 x 4
    dear = lambda h: (h @ w) @ w  # noqa: E731  # 2 x 4 x 4
    return jax.lax.cond(x.sum() > 0, dear, lambda h: h, x)


def test_two_convs_and_dense_counted_by_hand():
  expected = (
      8 * 8 * 4 * 3 * 9  # conv 1: output 8x8x4, 3 input features, 3x3 window
      + 4 * 4 * 6 * 4 * 9  # conv 2: output 4x4x6 (stride 2), 4 input features
      + 96 * 5  # dense: 96 inputs -> 5 outputs
  )
  assert models.count_macs(TwoConvDense(), (8, 8, 3)) == expected == 10_848
  # A leading batch axis is dropped: the count is per image.
  assert models.count_macs(TwoConvDense(), (7, 8, 8, 3)) == expected


def test_grouped_and_depthwise_convs():
  grouped = 8 * 8 * 8 * (8 // 4) * 9  # each output sees 2 input features
  depthwise = 8 * 8 * 8 * 1 * 9
  assert flops.count_macs(GroupedConvs(), (8, 8, 8)) == grouped + depthwise


def test_scan_repeats_and_cond_takes_the_dearer_branch():
  assert flops.count_macs(ScanAndCond(), (1, 1, 4)) == 3 * 16 + 2 * 16


def test_rejects_a_shape_without_channels():
  with pytest.raises(ValueError, match='input_shape'):
    flops.count_macs(TwoConvDense(), (8, 8))


@pytest.mark.parametrize(
    'arch, exact, giga',
    [
        # exact: `cal_multi_adds(net, (1, 3, 32, 32))` of github.com/winycg/MCL-OKD (utils.py, commit
        # 5de042a5) on its models/resnet.py `resnet32` / `resnet110` (num_classes=100);
        # giga: the README table's FLOPs column.
        ('resnet32', 69_130_496, 0.07),
        ('resnet110', 167_453_696, 0.17),
    ],
)
def test_published_cifar_figures(arch, exact, giga):
  macs = models.count_macs(models.get_model(arch, 100), (32, 32, 3))
  assert macs == exact
  assert round(macs / 1e9, 2) == giga
