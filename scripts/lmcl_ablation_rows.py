r"""The "Measured" table of results/lmcl_investigation.md from the small-data run records.

    python scripts/lmcl_ablation_rows.py results/small/independent_s* results/small/lmcl*_s*

One markdown row per record directory (config.json + metrics.jsonl): best peer (the best
evaluation), mean peer, ensemble and mean peer on the training images (final evaluation), the
final mean layer weight, and the final alpha * VCL + beta * ICL beside its floor. The floor: a
SupCon term cannot go below the mean of log P over anchors with P in-batch positives, 2.470 with the
class-balanced Fashion-MNIST batches of 128 (10 classes, 11-13 positives; measured over 200 batches
of the sampler), and VCL and ICL each sum 2 such terms, weighted by the layer weight, per (peer
pair, stage pair) combination: K (K - 1) S^2 combinations ('all' stage pairs) or K (K - 1) S
('diagonal').
"""

from __future__ import annotations

import argparse
import json
import os

SUPCON_FLOOR = 2.470  # mean log P per anchor, Fashion-MNIST batches of 128 (see docstring)


def last_eval(rows: list[dict], prefix: str) -> dict:
  return [r for r in rows if any(k.startswith(prefix) for k in r)][-1]


def mean_peer(row: dict, prefix: str) -> float:
  values = [v for k, v in row.items() if k.startswith(prefix + 'peer_') and k.endswith('/top1')]
  return 100 * sum(values) / len(values)


def table_row(path: str, stages: int) -> str:
  config = json.load(open(os.path.join(path, 'config.json')))
  rows = [json.loads(line) for line in open(os.path.join(path, 'metrics.jsonl'))]
  final = last_eval(rows, 'eval/')
  best = max(r['eval/best_peer/top1'] for r in rows if 'eval/best_peer/top1' in r)
  cells = [
      os.path.basename(path.rstrip('/')).rsplit('_s', 1)[0],
      str(config['seed']),
      f'{100 * best:.2f}',
      f'{mean_peer(final, "eval/"):.2f}',
      f'{100 * final["eval/ensemble/top1"]:.2f}',
      f'{mean_peer(last_eval(rows, "train_eval/"), "train_eval/"):.2f}',
  ]
  method = config['method']
  if method['name'] != 'lmcl':
    return '| ' + ' | '.join(cells + ['—', '—']) + ' |'
  train = [r for r in rows if 'train/vcl' in r][-1]
  k = config['cohort']['num_peers']
  pairs = stages * stages if method['stage_pairs'] == 'all' else stages
  w = train['train/mean_w'] if method['meta_learned_weights'] else 1.0
  contrast = method['alpha'] * train['train/vcl'] + method['beta'] * train['train/icl']
  floor = (method['alpha'] + method['beta']) * k * (k - 1) * pairs * 2 * SUPCON_FLOOR * w
  mean_w = f'{w:.4f}' if method['meta_learned_weights'] else '1'
  return '| ' + ' | '.join(cells + [mean_w, f'{contrast:.2f} ({floor:.2f})']) + ' |'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('records', nargs='+', help='run record directories')
  ap.add_argument('--stages', type=int, default=3, help='stages of the backbone (ResNet-8: 3)')
  args = ap.parse_args(argv)
  print(
      '| run | seed | best peer (best) | mean peer (final) | ensemble (final) '
      '| train images, mean peer (final) | mean_w (final) | α·VCL + β·ICL (final; floor) |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for path in args.records:
    print(table_row(path, args.stages))


if __name__ == '__main__':
  main()
