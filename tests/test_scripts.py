"""scripts/lmcl_ablation_rows.py: the investigation's table from fabricated run records."""

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'lmcl_ablation_rows.py')


@pytest.fixture(scope='module')
def rows_lib():
  spec = importlib.util.spec_from_file_location('lmcl_ablation_rows', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_record(path, method, metrics):
  os.makedirs(path)
  config = {'seed': 3, 'cohort': {'num_peers': 2}, 'method': method}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(m) + '\n' for m in metrics)


def lmcl(**overrides):
  return {
      'name': 'lmcl',
      'alpha': 0.1,
      'beta': 0.2,
      'stage_pairs': 'all',
      'meta_learned_weights': True,
      **overrides,
  }


METRICS = [
    {'eval/best_peer/top1': 0.9, 'eval/ensemble/top1': 0.5, 'eval/peer_0/top1': 0.9},
    {'train/vcl': 10.0, 'train/icl': 20.0, 'train/mean_w': 0.5},
    {
        'eval/best_peer/top1': 0.8,
        'eval/ensemble/top1': 0.85,
        'eval/peer_0/top1': 0.8,
        'eval/peer_1/top1': 0.7,
        'eval/peer_0/top5': 1.0,
        'train_eval/peer_0/top1': 0.96,
        'train_eval/peer_1/top1': 0.98,
    },
    {'train/vcl': 30.0, 'train/icl': 40.0, 'train/mean_w': 0.25},
]


@pytest.mark.parametrize(
    'overrides, weight, pairs',
    [
        ({}, 0.25, 9),
        ({'stage_pairs': 'diagonal'}, 0.25, 3),
        ({'meta_learned_weights': False}, 1, 9),
    ],
)
def test_row_reads_the_last_values_and_scales_the_floor(
    rows_lib, tmp_path, overrides, weight, pairs
):
  path = str(tmp_path / 'lmcl_x_s3')
  write_record(path, lmcl(**overrides), METRICS)
  cells = [c.strip() for c in rows_lib.table_row(path, stages=3).strip('| ').split('|')]
  contrast = 0.1 * 30 + 0.2 * 40
  floor = 0.3 * 2 * pairs * 2 * rows_lib.SUPCON_FLOOR * weight  # (a + b) K(K-1) pairs 2 log P w
  mean_w = '0.2500' if weight != 1 else '1'
  assert cells == [
      'lmcl_x',
      '3',
      '90.00',
      '75.00',
      '85.00',
      '97.00',
      mean_w,
      f'{contrast:.2f} ({floor:.2f})',
  ]


def test_row_of_another_method_has_no_contrast_cells(rows_lib, tmp_path):
  path = str(tmp_path / 'independent_s3')
  write_record(path, {'name': 'independent'}, METRICS)
  assert rows_lib.table_row(path, stages=3).endswith('| 97.00 | — | — |')
