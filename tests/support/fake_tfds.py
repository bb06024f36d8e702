"""Offline stand-ins for prepared tfds data: fake records and a patched tfds builder."""

import numpy as np
import tensorflow_datasets as tfds


def fake_records(count, shape, seed=0):
  """`count` tfds-like records; `shape` is an image shape or a function of the index."""
  rng = np.random.default_rng(seed)
  return [
      {
          'image': rng.integers(0, 256, shape(i) if callable(shape) else shape, np.uint8),
          'label': np.int64(i % 7),
          'id': f'ex{i}',
      }
      for i in range(count)
  ]


def patch_prepared_tfds(monkeypatch, records):
  """Makes every tfds builder 'prepared' with `records` as each split; returns the list of
  (data set, split) requested."""
  requested = []

  def as_data_source(self, split, **kwargs):
    requested.append((self.name, split))
    return records

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'as_data_source', as_data_source)
  return requested


def assert_missing_message(error, name, data_dir):
  message = str(error.value)
  assert f"tfds data set '{name}' is not prepared under {data_dir}." in message
  assert f"'tfds build {name} --data_dir={data_dir} --file_format=array_record'" in message
  assert 'data.name=fashion_mnist' in message
