"""Every shipped config loads (default arguments and `smoke`) and passes validation (data
availability aside: CIFAR-100 / ImageNet are not prepared on the test machine)."""

import glob
import importlib.util
import os

import jax
import pytest

from mcl_jax import config_lib, data, methods, train

from support import REPO

# Configs of other commands than training, tested with them (tests/test_linear_eval.py).
OTHER_COMMANDS = ('linear_eval.py',)
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if os.path.basename(p) not in OTHER_COMMANDS
)


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_config_loads_and_validates(path, arg, monkeypatch):
  monkeypatch.setattr(data, 'check_available', lambda *a, **k: None)
  module = load(path)
  assert 'python -m mcl_jax.main --config configs/' in module.__doc__  # the command to run it
  config = module.get_config(arg)
  train.validate(config, num_devices=1)


def test_imagenet_lmcl_uses_the_memory_bank():
  config = load(os.path.join(REPO, 'configs', 'imagenet_lmcl.py')).get_config()
  assert config.method.name == 'lmcl' and config.method.memory_bank
  assert (config.method.num_positives, config.method.num_negatives) == (1, 8192)


# The on-device augmentation each shipped recipe trains with (owned by its data source).
AUGMENTATION = {
    'fashion_mnist': (2, True),  # pad-2 crop + flip, as the Fashion-MNIST recipes always used
    'cifar100': (4, True),  # pad-4 crop + flip
    'imagenet2012': (0, False),  # RandomResizedCrop + flip on the host (grain), nothing on device
}


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_config_trains_with_its_sources_augmentation(path, arg):
  config = load(path).get_config(arg)
  assert 'crop_padding' not in config.data and 'flip' not in config.data  # the source owns them
  aug = data.augment_spec(config)
  assert (aug.crop_padding, aug.flip) == AUGMENTATION[config.data.name]
  assert (aug.mean, aug.std) == data.normalization(config.data.name)


@pytest.mark.parametrize('name', ['imagenet_mcl.py', 'imagenet_lmcl.py', 'imagenet_moco_mcl.py'])
def test_imagenet_configs_have_no_device_crop_or_flip(name):
  """ImageNet images are cropped and flipped once, on the host; the device only normalises."""
  config = load(os.path.join(REPO, 'configs', name)).get_config()
  aug = data.augment_spec(config)
  assert config.data.name == 'imagenet2012' and data.get(config.data.name).streamed
  assert (aug.crop_padding, aug.flip) == (0, False)
  # MoCo's two views: both crops on the host (the device runs only the colour part).
  run = train.abstract_run(config)
  views = run.method.host_views
  assert (views is not None) == (config.method.name == 'moco_mcl') == ('image2' in run.batch)
  if views:
    assert views.count == 2 and views.crop_scale == (0.2, 1.0)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_builds_its_cohort_state_and_step_abstractly(path):
  """Every shipped config's cohort, method and whole train state build under `jax.eval_shape`
  (no data, nothing allocated), and the train step of every config without a teacher traces and
  lowers (no compile) for its exact shapes. Compile time and compiled peak memory are measured by
  benchmarks/compile_memory.py (BENCHMARKS.md)."""
  config = load(path).get_config()
  run = train.abstract_run(config)
  assert run.cohort.num_peers == config.cohort.num_peers
  for group, params in zip(run.cohort.groups, run.state.params['peers']):
    assert {leaf.shape[0] for leaf in jax.tree.leaves(params)} == {group.num_peers}
  if type(run.method).load_frozen is not methods.Method.load_frozen:
    return  # a teacher's variables come from its workdir
  lowered = jax.jit(run.train_step).lower(run.state, run.batch, None)
  assert jax.tree.structure(lowered.out_info[0]) == jax.tree.structure(run.state)


@pytest.mark.parametrize(
    'name, arch',
    [
        ('cifar100_mcl.py', 'wrn_16_2'),
        ('imagenet_mcl.py', 'resnet18'),
        ('fashion_mnist_small.py', 'resnet8'),
    ],
)
def test_mcl_configs_build_x4_as_one_shared_trunk_network(name, arch):
  """`branches=4` (the MCL(x4) rows) is one `<arch>_okd4`, as the authors' `--number-net 4`;
  `peers=K` is K independent networks; the default is MCL(x2), two networks."""
  get_config = load(os.path.join(REPO, 'configs', name)).get_config
  cases = {
      f'arch={arch}': (arch, 2),
      f'arch={arch},branches=4': (f'{arch}_okd4', 1),
      f'arch={arch},branches=2,peers=2': (f'{arch}_okd2', 2),
      f'arch={arch},peers=4': (arch, 4),
  }
  if name != 'fashion_mnist_small.py':  # its method switches go on the command line
    cases[f'arch={arch},branches=4,logit_kd'] = (f'{arch}_okd4', 1)
    cases[f'arch={arch},branches=4,baseline'] = (arch, 1)
  for arg, expected in cases.items():
    config = get_config(arg)
    assert (config.model.arch, config.cohort.num_peers) == expected, arg
  if name != 'fashion_mnist_small.py':
    assert get_config(f'arch={arch},branches=4,logit_kd').method.logit_kd
  with pytest.raises(ValueError, match='branches=0'):
    get_config('branches=0')
