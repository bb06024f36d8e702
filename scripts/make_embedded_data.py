"""Builds the Fashion-MNIST subset shipped inside mcl_jax (``mcl_jax/data_files/``).

Reads the original Zalando IDX files and writes

* ``fashion_mnist.npz`` (``np.savez_compressed``): ``train_images`` uint8 [20000,28,28,1]
  (2,000 per class, drawn with ``mcl_jax.data.stratified_subset_indices`` and a fixed seed,
  kept in the original order), ``train_labels`` int32 [20000], ``train_source_indices`` int32
  (their rows in the original 60,000), ``test_images`` uint8 [10000,28,28,1] and
  ``test_labels`` int32 [10000] (the full test split);
* ``FASHION_MNIST_COPYRIGHT``: the licence notice (MIT/Expat, Zalando SE).

The output is a pure function of the source files: the printed sha256 (over the array
names, dtypes, shapes and bytes, not over the zip container) is the same on every rerun.
It also prints the per-channel mean/std of the train subset and of the full train set,
which are hard-coded in ``mcl_jax/data/fashion_mnist.py``.

Usage::

  python scripts/make_embedded_data.py [--source DIR] [--out DIR] [--check]

``--source`` defaults to /usr/share/datasets/fashion-mnist (Debian ``dataset-fashion-mnist``)
when present (else the team's copy of those files beside the repository, see ``default_source``);
pass the folder that holds the four original ``*-ubyte.gz`` files and ``COPYRIGHT`` otherwise.
``--check`` compares with the shipped file instead of writing. See docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import shutil
import sys

import numpy as np

from mcl_jax import data

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / 'mcl_jax' / 'data_files'
LICENCE_NAME = 'FASHION_MNIST_COPYRIGHT'


def default_source() -> pathlib.Path:
  deb = pathlib.Path(data.FASHION_MNIST_DEB_DIR)
  return deb if deb.is_dir() else REPO.parent / 'shared' / 'data' / 'fashion-mnist'


def build_arrays(source: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The arrays of the embedded file, from the IDX files in ``source``."""
  train_images, train_labels = data.read_fashion_mnist_idx(source, 'train')
  test_images, test_labels = data.read_fashion_mnist_idx(source, 'test')
  chosen = data.stratified_subset_indices(
      train_labels, data.EMBEDDED_TRAIN_PER_CLASS, data.EMBEDDED_SUBSET_SEED
  )
  return {
      'train_images': np.ascontiguousarray(train_images[chosen]),
      'train_labels': train_labels[chosen].astype(np.int32),
      'train_source_indices': chosen.astype(np.int32),
      'test_images': np.ascontiguousarray(test_images),
      'test_labels': test_labels.astype(np.int32),
  }


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
  """sha256 over (name, dtype, shape, bytes) of every array, in name order."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f'{name}|{array.dtype.str}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 ``[N,H,W,C]`` images in [0, 1] units."""
  values = np.arange(256) / 255.0
  means, stds = [], []
  for channel in range(images.shape[-1]):  # exact, from the histogram of pixel values
    histogram = np.bincount(images[..., channel].ravel(), minlength=256) / images[..., 0].size
    means.append(float(histogram @ values))
    stds.append(float(np.sqrt(histogram @ (values - means[-1]) ** 2)))
  return tuple(means), tuple(stds)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--source', type=pathlib.Path, default=default_source())
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument(
      '--check', action='store_true', help='compare with the file in --out instead of writing it'
  )
  args = parser.parse_args(argv)

  arrays = build_arrays(args.source)
  digest = arrays_sha256(arrays)
  target = args.out / data.EMBEDDED_FILE
  if args.check:
    with np.load(target) as shipped:
      shipped_digest = arrays_sha256({k: shipped[k] for k in shipped.files})
    print(f'built   sha256 {digest}\nshipped sha256 {shipped_digest}')
    return 0 if digest == shipped_digest else 1

  args.out.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(target, **arrays)
  shutil.copyfile(args.source / 'COPYRIGHT', args.out / LICENCE_NAME)
  for name, array in arrays.items():
    print(f'{name:22s} {array.dtype} {array.shape}')
  print(f'train per class: {np.bincount(arrays["train_labels"]).tolist()}')
  print(f'test  per class: {np.bincount(arrays["test_labels"]).tolist()}')
  print('train subset mean/std:', channel_stats(arrays['train_images']))
  full_train, _ = data.read_fashion_mnist_idx(args.source, 'train')
  print('full train   mean/std:', channel_stats(full_train))
  print(f'wrote {target} ({target.stat().st_size / 1e6:.2f} MB)')
  print(f'sha256 of arrays: {digest}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
