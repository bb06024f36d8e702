"""The networks added for the paper rows train through the quick start's `:smoke` path (a 2-peer
MCL cohort, and an L-MCL cohort for the nets L-MCL's tables use; the multi-branch nets under
MCL-OKD), and the `vmap` and `unroll` cohort strategies take the same step on them.

Marked `slow` (1.5-2 hours on a 2-core CPU: compiles of ResNet-50-sized cohorts and of L-MCL's
meta step, ~30 min for one ShuffleNetV2 cohort under load): the README's test command deselects
them; run `python -m pytest -m slow tests/test_models_train.py`. Their last result is in
results/new_networks.md."""

import json
import math
import os

import jax
import pytest

from mcl_jax import cli, cohort as cohort_lib, train

from support import max_relative_difference

# arch -> the methods its paper rows train it with on top of MCL (L-MCL for the nets of L-MCL's
# tables); multi-branch nets (MCL-OKD) train as one network whose branches are the peers.
NEW_ARCHS = {
    'hcgnet_a1': ('mcl', 'lmcl'),
    'hcgnet_a2': ('mcl', 'lmcl'),
    'densenet40_12': ('mcl',),
    'vgg16': ('mcl',),
    'shufflenetv1': ('mcl',),
    'resnet50_cifar': ('mcl',),
    'mobilenetv1': ('mcl',),
    'shufflenetv2_1_0_imagenet': ('mcl', 'lmcl'),
}
MULTI_BRANCH = ('densenet40_12_okd2', 'vgg16_okd2', 'hcgnet_a1_okd2')
# L-MCL's meta step on HCGNet compiles past 15-23 GB of host memory on XLA:CPU (945k lines of
# StableHLO; results/new_networks.md): run only where the host has room for it.
HOST_MEMORY_GIB = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
NEEDS_MEMORY = {('hcgnet_a1', 'lmcl'): 64, ('hcgnet_a2', 'lmcl'): 64}


def _case(arch, method):
  gib = NEEDS_MEMORY.get((arch, method))
  if gib is None:
    return (arch, method)
  reason = f'compiling it needs more than the host memory ({HOST_MEMORY_GIB:.0f} < {gib} GiB)'
  return pytest.param(arch, method, marks=pytest.mark.skipif(HOST_MEMORY_GIB < gib, reason=reason))


CASES = [_case(a, m) for a, ms in NEW_ARCHS.items() for m in ms] + [
    (a, 'mcl_okd') for a in MULTI_BRANCH
]


def smoke_config(arch, method, **overrides):
  """The quick start's smoke run (configs/fashion_mnist_mcl.py:smoke) of `arch`, shortened."""
  config = cli.load_config(
      f'configs/fashion_mnist_mcl.py:arch={arch},method={method},smoke',
      {'total_steps': 2, 'data.eval_examples': 64, 'data.eval_batch_size': 64, **overrides},
  )
  if method == 'mcl_okd':
    config.cohort.num_peers = 1  # one multi-branch network; its branches are the peers
  if method == 'lmcl':
    # One virtual step in the meta round (default 2): the same layers are differentiated twice,
    # at half the compile time (tens of minutes for HCGNet's meta step on a 2-core CPU).
    config.method.meta_inner_steps = 1
  return config


@pytest.mark.slow
@pytest.mark.parametrize('arch,method', CASES)
def test_trains_through_the_smoke_path(arch, method, tmp_path):
  workdir = str(tmp_path / 'run')
  train.run(smoke_config(arch, method, **{'cohort.strategy': 'unroll'}), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert losses and all(math.isfinite(x) for x in losses)
  final = [r for r in records if 'eval/ensemble/top1' in r][-1]
  assert final['step'] == 2 and 0.0 <= final['eval/best_peer/top1'] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(NEW_ARCHS))
def test_strategies_take_the_same_step(arch):
  """From the same state, one MCL step under `vmap` and under `unroll`: the same new state and
  metrics, in float64. (In float32 the deep nets' last-stage gradients at init differ by up to
  ~25% of their scale between the two programs: saturated softmax and batch-8 BatchNorm make them
  differences of nearly equal terms, so float32 round-off is amplified; the losses agree to 1e-6.)
  """
  with jax.enable_x64(True):
    exps = {
        s: train.Experiment(
            smoke_config(
                arch, 'mcl', batch_size=8, **{'cohort.strategy': s, 'model.dtype': 'float64'}
            )
        )
        for s in cohort_lib.CANDIDATES
    }
    state = jax.device_get(exps['unroll'].init_state())
    out = {}
    for s, exp in exps.items():
      new_state, metrics = exp.train_step(
          jax.device_put(state, exp.state_sharding), exp.batch(0), exp.frozen
      )
      out[s] = jax.device_get((new_state, metrics))
  # Leaves that are mathematically zero carry only round-off (~1e-12 here, different in the two
  # programs) and are measured against 1e-2 (below any weight's scale) instead of their own: a
  # bias followed by BatchNorm gets a zero gradient (VGG's conv biases; ShuffleNetV2's bn2 offset,
  # followed by a 1x1 conv and bn3, whose running mean at init is likewise zero). Every other leaf
  # of vgg16 agrees to 1e-13.
  assert max_relative_difference(out['vmap'], out['unroll'], floor=1e-2) < 1e-9
