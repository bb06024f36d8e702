"""The registry of data sources (``data.name`` -> :class:`~mcl_jax.data.base.DataSource`), the
lookups by name, and the built-in sources, registered the same way a user's would be.

Built-in sources (``data.name``):

* ``fashion_mnist`` (default): the Fashion-MNIST subset shipped inside the package (20,000 train,
  10,000 test, 28x28x1). On device: pad-2 random crop + flip.
* ``fashion_mnist_full``: all 60,000 train images from the Debian package
  ``dataset-fashion-mnist`` (or ``data_dir``). On device: pad-2 random crop + flip.
* ``cifar100``: tfds data prepared in ``array_record`` format, read fully into memory. On device:
  pad-4 random crop + flip.
* ``imagenet2012``: the same tfds preparation, streamed through grain (too large for memory).
  RandomResizedCrop + flip run on the host; nothing on device.

See docs/data.md.
"""

from __future__ import annotations

import numpy as np

from mcl_jax import registry
from mcl_jax.data import base, fashion_mnist, tfds_sources

REGISTRY: registry.Registry[base.DataSource] = registry.Registry(
    kind='data set', config_key='data.name'
)


def register(name: str, source: base.DataSource, *, replace: bool = False) -> base.DataSource:
  """Makes ``source`` available as ``data.name=<name>``.

  Registering a name again is an error unless ``replace=True`` or it comes from the same module
  again (a config file loaded twice). Returns ``source``.
  """
  if not isinstance(source, base.DataSource):
    raise TypeError(
        f'data.register({name!r}, ...) needs a mcl_jax.data.DataSource (e.g. '
        f'mcl_jax.data.InMemorySource(name, train=(images, labels), test=(images, labels))), got '
        f'{type(source).__name__}.'
    )
  return REGISTRY.register(name, source, replace=replace)  # remembers the calling module


def get(name: str) -> base.DataSource:
  """The source registered as ``name``; ``registry.UnknownNameError`` (a KeyError) listing the
  registered names if there is none."""
  return REGISTRY.get(name)


def names() -> tuple[str, ...]:
  """The registered names, built-ins first."""
  return REGISTRY.names()


def origin(name: str) -> registry.Origin:
  """The module (and file) that registered ``name``."""
  return REGISTRY.origin(name)


# ---- Lookups by name (the config's view) --------------------------------------------------------
def dataset_info(name: str) -> base.DatasetInfo:
  """``(image_shape (H, W, C), num_classes, num_train_examples)`` of ``name``; reads no file.

  For a streamed source the image shape is its output size (imagenet2012: the 224x224 crop).
  """
  return get(name).info


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel ``(mean, std)`` of ``name`` in [0, 1] pixel units (for ``augment``)."""
  source = get(name)
  return source.mean, source.std


def num_examples(name: str, split: str) -> int:
  """Number of examples of ``split`` (``'train'`` | ``'test'``); reads no file."""
  return get(name).num_examples(split)


def load(name: str, split: str, data_dir: str | None = None) -> base.InMemoryDataset:
  """The whole ``split`` of the in-memory source ``name`` (:meth:`DataSource.load`)."""
  return get(name).load(split, data_dir)


def check_available(name: str, data_dir: str | None = None) -> None:
  """Raises the clear FileNotFoundError now if ``name`` cannot be read; cheap otherwise."""
  get(name).check_available(data_dir)


def train_labels(
    name: str, data_dir: str | None = None, cache_dir: str | None = None
) -> np.ndarray:
  """int32 ``[N]`` labels of the training split (memory banks sample positives by class)."""
  return get(name).train_labels(data_dir, cache_dir)


# ---- The built-in sources -----------------------------------------------------------------------
# CIFAR-100's statistics as the MCL authors' code uses them; ImageNet's the usual torchvision ones.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

register(
    'fashion_mnist',
    fashion_mnist.EmbeddedFashionMnist(
        'fashion_mnist',
        image_shape=(28, 28, 1),
        num_classes=10,
        num_train=10 * fashion_mnist.EMBEDDED_TRAIN_PER_CLASS,
        num_test=10_000,
        mean=fashion_mnist.FASHION_MNIST_MEAN,
        std=fashion_mnist.FASHION_MNIST_STD,
        crop_padding=2,
        flip=True,
    ),
)
register(
    'fashion_mnist_full',
    fashion_mnist.FashionMnistIdx(
        'fashion_mnist_full',
        image_shape=(28, 28, 1),
        num_classes=10,
        num_train=60_000,
        num_test=10_000,
        mean=fashion_mnist.FASHION_MNIST_FULL_MEAN,
        std=fashion_mnist.FASHION_MNIST_FULL_STD,
        crop_padding=2,
        flip=True,
    ),
)
register(
    'cifar100',
    tfds_sources.TfdsSource(
        'cifar100',
        image_shape=(32, 32, 3),
        num_classes=100,
        num_train=50_000,
        num_test=10_000,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        crop_padding=4,
        flip=True,
    ),
)
register(
    'imagenet2012',
    tfds_sources.StreamedTfdsSource(
        'imagenet2012',
        image_shape=(224, 224, 3),  # the training crop (and the eval center crop)
        num_classes=1000,
        num_train=1_281_167,
        num_test=50_000,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        tfds_splits={'train': 'train', 'test': 'validation'},
        # RandomResizedCrop + flip on the host (StreamedTfdsSource's transforms): none on device.
        crop_padding=0,
        flip=False,
    ),
)
