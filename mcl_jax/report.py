"""Results table over runs: `python -m mcl_jax.report WORKDIR [WORKDIR ...]`.

Reads each workdir's `config.json` and `metrics.jsonl`, groups runs that differ only in `seed`,
and prints a Markdown table with, per group, mean ± std over seeds of:
- best-peer top-1: max over evaluations of the best peer's top-1 (the papers' protocol),
- final best-peer top-1 and final mean per-peer top-1 (the last evaluation),
- best and final ensemble (mean logits) top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from mcl_jax import cli, methods, workdir as workdir_lib
from mcl_jax.metrics import read_metrics


def run_summary(workdir: str) -> dict:
  workdir_lib.require(workdir, workdir_lib.CONFIG_NAME, 'metrics.jsonl')
  with open(os.path.join(workdir, workdir_lib.CONFIG_NAME)) as f:
    config = json.load(f)
  evals = [r for r in read_metrics(workdir) if 'eval/best_peer/top1' in r]
  if not evals:
    raise ValueError(f'{workdir} has no evaluation in metrics.jsonl yet.')
  last = evals[-1]
  peers = sorted(k for k in last if k.startswith('eval/peer_') and k.endswith('/top1'))
  return {
      'group': describe(config),
      'seed': config['seed'],
      'step': last['step'],
      'best_peer': max(r['eval/best_peer/top1'] for r in evals),
      'final_best_peer': last['eval/best_peer/top1'],
      'final_mean_peer': statistics.mean(last[k] for k in peers),
      'best_ensemble': max(r['eval/ensemble/top1'] for r in evals),
      'final_ensemble': last['eval/ensemble/top1'],
  }


def describe(config: dict) -> str:
  archs = config['model']['archs'] or [config['model']['arch']] * config['cohort']['num_peers']
  cohort = f'{archs[0]}×{len(archs)}' if len(set(archs)) == 1 else ' + '.join(archs)
  m = methods.upgrade(config['method'])
  method = m['name']
  if method == 'mcl' and m.get('logit_kd'):
    method += '+kd'
  if method == 'mcl_okd' and m.get('dot_weight') == 0 and m.get('contrast_weight') == 0:
    method += ' (CE only: branches alone)'
  if method in ('kd', 'ckd', 'crcd'):  # teacher -> student
    method += f" from {config['teacher']['arch']}"
  if m['name'] == 'crcd':
    method += f" (K = {m['num_negatives']})"
  return f"{config['data']['name']} · {method} · {cohort}"


def mean_std(values) -> str:
  values = [100 * v for v in values]
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


COLUMNS = [
    ('best_peer', 'best-peer top-1 (best)'),
    ('final_best_peer', 'best peer (final)'),
    ('final_mean_peer', 'mean peer (final)'),
    ('best_ensemble', 'ensemble (best)'),
    ('final_ensemble', 'ensemble (final)'),
]


def table(workdirs) -> str:
  groups: dict[str, list[dict]] = {}
  for w in workdirs:
    s = run_summary(w)
    groups.setdefault(s['group'], []).append(s)
  lines = [
      '| run | seeds | steps | ' + ' | '.join(title for _, title in COLUMNS) + ' |',
      '|---|---|---|' + '---|' * len(COLUMNS),
  ]
  for name, runs in groups.items():
    seeds = ','.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))
    steps = '/'.join(sorted({str(r['step']) for r in runs}))
    cells = [mean_std([r[key] for r in runs]) for key, _ in COLUMNS]
    lines.append(f'| {name} | {seeds} | {steps} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  args = parser.parse_args(argv)
  with cli.user_errors('mcl_jax.report', workdir_lib.WorkdirError, OSError, ValueError):
    print(table(args.workdirs))


if __name__ == '__main__':
  main()
