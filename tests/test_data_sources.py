"""Tests of mcl_jax/data/sources.py and base.py: the registry of data sources, the built-in
sources' metadata and augmentation, and a user's own source registered from outside the package."""

import dataclasses

import jax
import numpy as np
import pytest

from mcl_jax import augment, config_lib, data, registry, step as step_lib, train

from support import tiny_config

BUILTINS = ('fashion_mnist', 'fashion_mnist_full', 'cifar100', 'imagenet2012')


def test_builtin_sources_are_registered_with_their_metadata():
  assert data.names()[:4] == BUILTINS
  for name in BUILTINS:
    assert data.origin(name).is_builtin and data.get(name).name == name
  assert data.dataset_info('fashion_mnist') == ((28, 28, 1), 10, 20_000)
  assert data.dataset_info('fashion_mnist_full') == ((28, 28, 1), 10, 60_000)
  assert data.dataset_info('cifar100') == ((32, 32, 3), 100, 50_000)
  assert data.dataset_info('imagenet2012') == ((224, 224, 3), 1000, 1_281_167)
  assert [data.num_examples(name, 'test') for name in BUILTINS] == [10_000] * 3 + [50_000]
  assert [data.get(name).streamed for name in BUILTINS] == [False] * 3 + [True]


def test_each_source_owns_its_on_device_augmentation():
  augmentation = {name: (data.get(name).crop_padding, data.get(name).flip) for name in BUILTINS}
  assert augmentation == {
      'fashion_mnist': (2, True),
      'fashion_mnist_full': (2, True),
      'cifar100': (4, True),
      'imagenet2012': (0, False),  # RandomResizedCrop + flip run on the host
  }


def test_imagenet_gets_no_on_device_augmentation():
  """The streamed ImageNet batch is already cropped and flipped on the host: the train step only
  normalises it (no second flip, no crop)."""
  aug = data.augment_spec(tiny_config(**{'data.name': 'imagenet2012'}))
  assert (aug.crop_padding, aug.flip) == (0, False)
  assert (aug.mean, aug.std) == data.normalization('imagenet2012')
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), np.uint8)
  for step in range(3):
    seen, _ = step_lib.augmented_batch({'image': images}, step, 0, aug)
    expected = augment.normalize(images, aug.mean, aug.std)
    np.testing.assert_allclose(seen['image'], expected, rtol=1e-6, atol=1e-6)  # not moved


def test_unknown_name_lists_the_registered_ones():
  with pytest.raises(registry.UnknownNameError) as e:
    data.get('cifar10')
  message = str(e.value)
  assert "data.name='cifar10' is not a registered data set" in message
  assert all(repr(name) in message for name in BUILTINS)
  assert 'mcl_jax.data.register(name, ...)' in message
  with pytest.raises(KeyError):  # UnknownNameError is a KeyError
    data.dataset_info('cifar10')


def test_config_validation_names_the_registered_data_sets():
  with pytest.raises(config_lib.ConfigError) as e:
    train.validate(tiny_config(**{'data.name': 'cifar10'}))
  message = str(e.value)
  assert "data.name='cifar10': must be one of the registered data sets" in message
  assert str(data.names()) in message and 'mcl_jax.data.register' in message


# ---- A user's data set, registered from outside the package ---------------------------------------
def _toy_arrays(count, seed):
  rng = np.random.default_rng(seed)
  labels = np.arange(count) % 3
  images = rng.integers(0, 60, (count, 8, 8), np.uint8) + (80 * labels)[:, None, None].astype(
      np.uint8
  )
  return images, labels


TOY = data.InMemorySource(
    'toy_blobs', train=_toy_arrays(48, 0), test=_toy_arrays(12, 1), crop_padding=1, flip=False
)


@pytest.fixture
def toy():
  return data.register('toy_blobs', TOY)


def test_in_memory_source_derives_its_metadata():
  assert TOY.image_shape == (8, 8, 1) and TOY.num_classes == 3
  assert (TOY.num_train, TOY.num_test) == (48, 12)
  np.testing.assert_allclose((TOY.mean, TOY.std), data.channel_stats(TOY.train[0]))
  assert (TOY.crop_padding, TOY.flip) == (1, False)
  given = data.InMemorySource(
      't', train=_toy_arrays(6, 0), test=_toy_arrays(3, 1), num_classes=5, mean=(0.5,), std=(0.25,)
  )
  assert (given.num_classes, given.mean, given.std) == (5, (0.5,), (0.25,))
  with pytest.raises(ValueError, match='uint8'):
    data.InMemorySource('t', train=(np.zeros((4, 8, 8), np.float32), np.zeros(4)), test=TOY.test)
  with pytest.raises(ValueError, match='labels go up to 2, but num_classes=2'):
    data.InMemorySource('t', train=TOY.train, test=TOY.test, num_classes=2)
  with pytest.raises(ValueError, match='crop_padding must be an int >= 0'):
    dataclasses.replace(TOY, crop_padding=-1)
  with pytest.raises(TypeError, match='needs a mcl_jax.data.DataSource'):
    data.register('t', TOY.train)


def test_a_registered_toy_source_is_what_a_run_loads(toy):
  assert 'toy_blobs' in data.names()
  where = data.origin('toy_blobs')
  assert where.module == __name__ and not where.is_builtin  # the user's module, for plug-ins
  config = tiny_config(
      **{
          'data.name': 'toy_blobs',
          'data.train_examples': -1,
          'data.eval_examples': -1,
          'batch_size': 12,
          'model.arch': 'resnet8',
      }
  )
  train.validate(config)  # a registered name is a valid data.name
  exp = train.Experiment(config)
  np.testing.assert_array_equal(exp.train_data.images, TOY.train[0])
  np.testing.assert_array_equal(exp.test_data.labels, TOY.test[1])
  assert exp.train_data.num_classes == 3
  assert (exp.aug.crop_padding, exp.aug.flip, exp.aug.mean) == (1, False, TOY.mean)
  batch = exp.batch(0)
  assert batch['image'].shape == (12, 8, 8, 1)
  state, metrics = exp.train_step(exp.init_state(), batch, exp.frozen)
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1


def test_registering_again(toy):
  # From the same module again (a config file loaded twice): the new source replaces the old.
  assert data.register('toy_blobs', dataclasses.replace(TOY, flip=True)).flip
  # From another module: a clash, unless replace=True.
  elsewhere = {'__name__': 'elsewhere', 'data': data, 'TOY': TOY}
  with pytest.raises(ValueError, match="data set 'toy_blobs' is already registered"):
    exec(compile("data.register('toy_blobs', TOY)", 'elsewhere.py', 'exec'), elsewhere)
  exec(compile("data.register('toy_blobs', TOY, replace=True)", 'elsewhere.py', 'exec'), elsewhere)
  assert data.get('toy_blobs') is TOY and data.origin('toy_blobs').module == 'elsewhere'
  data.register('toy_blobs', TOY, replace=True)


def test_a_variant_of_a_builtin_shares_its_loaded_arrays():
  plain = data.register(
      'fashion_mnist_variant',
      dataclasses.replace(data.get('fashion_mnist'), crop_padding=0, flip=False),
  )
  assert plain.name == 'fashion_mnist' and (plain.crop_padding, plain.flip) == (0, False)
  assert (
      data.load('fashion_mnist_variant', 'test').images is data.load('fashion_mnist', 'test').images
  )
  aug = data.augment_spec(tiny_config(**{'data.name': 'fashion_mnist_variant'}))
  assert (aug.crop_padding, aug.flip) == (0, False)
