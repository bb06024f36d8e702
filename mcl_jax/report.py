"""Results table over runs: `python -m mcl_jax.report WORKDIR [WORKDIR ...]`.

Reads each workdir's `config.json` and `metrics.jsonl`, groups runs that differ only in `seed`,
and prints a Markdown table with, per group, mean ± std over seeds of:
- best-peer top-1: max over evaluations of the best peer's top-1 (the papers' protocol),
- final best-peer top-1 and final mean per-peer top-1 (the last evaluation),
- best and final ensemble (mean logits) top-1,
- when the runs evaluated their training images too (`data.train_eval_examples`), the final mean
  per-peer top-1 on them (how well the peers fit their training set),
- when peers were probed by `python -m mcl_jax.linear_eval`, the linear-evaluation top-1 of peer 0
  and of the best peer.

`--paired-with NAME` adds a second table: each other group minus the group whose name contains
NAME, seed by seed (only the seeds both ran), as mean ± std of the paired differences in points
and how many seeds the difference is > 0. Seeds share the data order and the initialisation
draws, so paired differences cancel much of the seed-to-seed spread that unpaired means carry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from mcl_jax import cli, methods, workdir as workdir_lib
from mcl_jax.metrics import read_metrics

# The authors' L-MCL metric: the best of every classifier (peers, branches, aggregate).
BEST_CLASSIFIER = 'eval/best_classifier/top1'


def run_summary(workdir: str) -> dict:
  workdir_lib.require(workdir, workdir_lib.CONFIG_NAME, 'metrics.jsonl')
  with open(os.path.join(workdir, workdir_lib.CONFIG_NAME)) as f:
    config = json.load(f)
  evals = [r for r in read_metrics(workdir) if 'eval/best_peer/top1' in r]
  if not evals:
    raise ValueError(f'{workdir} has no evaluation in metrics.jsonl yet.')
  last = evals[-1]
  linear = linear_eval_top1(workdir)
  peers = sorted(k for k in last if k.startswith('eval/peer_') and k.endswith('/top1'))
  train_peers = ['train_' + k for k in peers if 'train_' + k in last]
  return {
      'group': describe(config),
      'seed': config['seed'],
      'step': last['step'],
      'best_peer': max(r['eval/best_peer/top1'] for r in evals),
      'final_best_peer': last['eval/best_peer/top1'],
      'final_mean_peer': statistics.mean(last[k] for k in peers),
      'best_ensemble': max(r['eval/ensemble/top1'] for r in evals),
      'final_ensemble': last['eval/ensemble/top1'],
      'final_train_mean_peer': (
          statistics.mean(last[k] for k in train_peers) if train_peers else None
      ),
      # The authors' L-MCL metric: the best of every classifier (branches, aggregate) and epoch.
      'best_classifier': max(
          (r[BEST_CLASSIFIER] for r in evals if BEST_CLASSIFIER in r), default=None
      ),
      'linear_peer0': linear.get(0),
      'linear_best_peer': max(linear.values()) if linear else None,
  }


def linear_eval_top1(workdir: str) -> dict[int, float]:
  """{peer: linear-evaluation top-1} of the run's probes (`python -m mcl_jax.linear_eval`):
  its default outputs `<workdir>/linear_eval/peer_<p>/metrics.jsonl`, or the kept records
  `<workdir>/linear_eval_peer_<p>.json` (its final JSON line)."""
  out = {}
  for name in sorted(os.listdir(workdir)):
    if name.startswith('linear_eval_peer_') and name.endswith('.json'):
      with open(os.path.join(workdir, name)) as f:
        text = f.read().strip()
      if text:
        out[int(name[len('linear_eval_peer_') : -len('.json')])] = json.loads(text)[
            'linear_eval/top1'
        ]
  probes = os.path.join(workdir, 'linear_eval')
  if os.path.isdir(probes):
    for name in sorted(os.listdir(probes)):
      if name.startswith('peer_') and name[len('peer_') :].isdigit():
        rows = [r for r in read_metrics(os.path.join(probes, name)) if 'linear_eval/top1' in r]
        if rows:
          out.setdefault(int(name[len('peer_') :]), rows[-1]['linear_eval/top1'])
  return out


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
  if m['name'] == 'lmcl':
    method += _lmcl_variant(m)
  data_name = config['data']['name']
  if config['data'].get('train_examples', -1) > 0:  # a subset of the training set
    data_name += f" ({config['data']['train_examples']} images)"
  return f'{data_name} · {method} · {cohort}'


def _lmcl_variant(m: dict) -> str:
  """The L-MCL ablation switches, meta frequency and contrastive weights that differ from the
  defaults."""
  hparams = methods.get('lmcl').hparams
  parts = []
  if not m.get('meta_learned_weights', True):
    parts.append('fixed w = 1')
  if not m.get('branch_ce', True):
    parts.append('no branch CE')
  if m.get('stage_pairs', 'all') != 'all':
    parts.append(f"{m['stage_pairs']} stage pairs")
  every = m.get('meta_every_steps', hparams['meta_every_steps'].default)
  if m.get('meta_learned_weights', True) and every != hparams['meta_every_steps'].default:
    parts.append(f'meta step every {every} steps' if every else 'no meta step')
  weights = {'α': 'alpha', 'γ': 'gamma', 'β': 'beta', 'λ': 'lam'}
  if any(m.get(key, hparams[key].default) != hparams[key].default for key in weights.values()):
    parts.append(', '.join(f'{sym} = {m[key]:g}' for sym, key in weights.items()))
  return f" ({'; '.join(parts)})" if parts else ''


def mean_std(values) -> str:
  values = [100 * v for v in values]
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def seed_list(runs: list[dict]) -> str:
  """The runs' seeds in order, comma-separated."""
  return ','.join(str(seed) for seed in sorted(r['seed'] for r in runs))


def cell(runs: list[dict], key: str, group_size: int) -> str:
  """mean ± std of `key` over `runs`; names the seeds when only some of the group's runs log it."""
  if not runs:
    return '—'
  text = mean_std([r[key] for r in runs])
  if len(runs) < group_size:
    text += f' (seed {seed_list(runs)})'
  return text


COLUMNS = [
    ('best_peer', 'best-peer top-1 (best)'),
    ('final_best_peer', 'best peer (final)'),
    ('final_mean_peer', 'mean peer (final)'),
    ('best_ensemble', 'ensemble (best)'),
    ('final_ensemble', 'ensemble (final)'),
]


TRAIN_COLUMN = ('final_train_mean_peer', 'train set, mean peer (final)')
CLASSIFIER_COLUMN = ('best_classifier', 'best classifier incl. branches (best)')
LINEAR_COLUMNS = [
    ('linear_peer0', 'linear eval, peer 0'),
    ('linear_best_peer', 'linear eval, best peer'),
]


def summaries(workdirs) -> dict[str, list[dict]]:
  """{group name: its runs' summaries}, groups in the order they first appear."""
  groups: dict[str, list[dict]] = {}
  for w in workdirs:
    s = run_summary(w)
    groups.setdefault(s['group'], []).append(s)
  return groups


def columns_of(groups: dict[str, list[dict]]) -> list[tuple[str, str]]:
  runs_all = [r for runs in groups.values() for r in runs]
  columns = COLUMNS + (
      [TRAIN_COLUMN] if any(r['final_train_mean_peer'] is not None for r in runs_all) else []
  )
  if any(r['best_classifier'] is not None for r in runs_all):
    columns.append(CLASSIFIER_COLUMN)
  if any(r['linear_peer0'] is not None for r in runs_all):
    columns += LINEAR_COLUMNS
  return columns


def table(workdirs) -> str:
  groups = summaries(workdirs)
  columns = columns_of(groups)
  lines = [
      '| run | seeds | steps | ' + ' | '.join(title for _, title in columns) + ' |',
      '|---|---|---|' + '---|' * len(columns),
  ]
  for name, runs in groups.items():
    seeds = seed_list(runs)
    steps = '/'.join(sorted({str(r['step']) for r in runs}))
    cells = [cell([r for r in runs if r[key] is not None], key, len(runs)) for key, _ in columns]
    lines.append(f'| {name} | {seeds} | {steps} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def paired_table(workdirs, reference: str) -> str:
  """Each group minus the reference group (the one whose name contains `reference`), seed by
  seed: mean ± std of the differences in points, and `wins/n` seeds where it is > 0."""
  groups = summaries(workdirs)
  matches = [name for name in groups if reference in name]
  if len(matches) != 1:
    raise ValueError(
        f'--paired-with {reference!r} matches {len(matches)} groups; it must name exactly one '
        'of: ' + '; '.join(groups)
    )
  ref = {r['seed']: r for r in groups[matches[0]]}
  columns = columns_of(groups)
  lines = [
      f'Paired differences (points) against {matches[0]}, seed by seed:',
      '',
      '| run | seeds | ' + ' | '.join(title for _, title in columns) + ' |',
      '|---|---|' + '---|' * len(columns),
  ]
  for name, runs in groups.items():
    if name == matches[0]:
      continue
    paired = sorted((r for r in runs if r['seed'] in ref), key=lambda r: r['seed'])
    if not paired:
      continue
    cells = []
    for key, _ in columns:
      diffs = [
          100 * (r[key] - ref[r['seed']][key])
          for r in paired
          if r[key] is not None and ref[r['seed']][key] is not None
      ]
      cells.append(signed_mean_std(diffs) if diffs else '—')
    seeds = seed_list(paired)
    lines.append(f'| {name} | {seeds} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def signed_mean_std(diffs) -> str:
  wins = f'{sum(d > 0 for d in diffs)}/{len(diffs)}'
  if len(diffs) == 1:
    return f'{diffs[0]:+.2f} ({wins})'
  return f'{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} ({wins})'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument(
      '--paired-with',
      metavar='NAME',
      help='also print every group minus the group whose name contains NAME, seed by seed',
  )
  args = parser.parse_args(argv)
  with cli.user_errors('mcl_jax.report', workdir_lib.WorkdirError, OSError, ValueError):
    paired = paired_table(args.workdirs, args.paired_with) if args.paired_with else None
    print(table(args.workdirs))
    if paired:
      print('\n' + paired)


if __name__ == '__main__':
  main()
