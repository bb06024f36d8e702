"""Data sets as registered plug-ins that own their augmentation and normalisation.

A run names its data with ``data.name``; the name is looked up in a registry of data sources
(:class:`DataSource`, the contract is in ``base.py``). The built-in sources are registered in
``sources.py`` the same way a user's is::

    from mcl_jax import data
    data.register('toy', data.InMemorySource(
        'toy', train=(train_images, train_labels), test=(test_images, test_labels),
        crop_padding=2, flip=True))
    # then: --config.data.name=toy

Modules (see docs/data.md):

* ``base.py``: the :class:`DataSource` contract, :class:`InMemoryDataset`, :class:`InMemorySource`.
* ``sources.py``: the registry, lookups by name, the built-in sources.
* ``fashion_mnist.py``: the embedded Fashion-MNIST subset and the IDX files.
* ``tfds_sources.py``: prepared tfds data sets (never downloaded), in memory or streamed.
* ``streaming.py``: the grain input pipeline of streamed sources; ``transforms.py``: their host
  transforms.
* ``sampling.py``: batch indices of in-memory training, pure functions of ``(seed, step)``.
* ``splits.py``: what a run trains and evaluates on, from its config.

Nothing is ever downloaded: missing data is a FileNotFoundError naming the command that prepares
it; :func:`check_available` raises it early (config validation).
"""

from mcl_jax.data.base import (
    SPLITS,
    DataSource,
    DatasetInfo,
    InMemoryDataset,
    InMemorySource,
    channel_stats,
)
from mcl_jax.data.fashion_mnist import (
    EMBEDDED_FILE,
    EMBEDDED_SUBSET_SEED,
    EMBEDDED_TRAIN_PER_CLASS,
    FASHION_MNIST_DEB_DIR,
    FASHION_MNIST_FULL_MEAN,
    FASHION_MNIST_FULL_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    EmbeddedFashionMnist,
    FashionMnistIdx,
    read_fashion_mnist_idx,
    read_idx,
    stratified_subset_indices,
)
from mcl_jax.data.sampling import BatchSampler, batch_indices, steps_per_epoch
from mcl_jax.data.sources import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_available,
    dataset_info,
    get,
    load,
    names,
    normalization,
    num_examples,
    origin,
    register,
    train_labels,
)
from mcl_jax.data.splits import LazyLabels, StreamedSplit, augment_spec, load_splits
from mcl_jax.data.streaming import stream_batches
from mcl_jax.data.tfds_sources import (
    StreamedTfdsSource,
    TfdsSource,
    resolve_tfds_data_dir,
    source_to_arrays,
)
from mcl_jax.data.transforms import (
    HostViews,
    imagenet_eval_transform,
    imagenet_train_transform,
    imagenet_views_transform,
    random_resized_crop_box,
    view_keys,
)
