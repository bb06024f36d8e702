"""The results table: grouping over seeds, best vs final, mean ± std."""

import json
import os

import pytest

from mcl_jax import config_lib, methods, metrics, report


def fake_run(root, name, seed, method, evals):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  c = config_lib.base_config()
  c.seed, c.method.name, c.model.arch = seed, method, 'resnet8'
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(c.to_json())
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 1, 'train/loss': 2.0}) + '\n')
    for step, (p0, p1, ens) in enumerate(evals, start=2):
      f.write(
          json.dumps(
              {
                  'step': step,
                  'eval/peer_0/top1': p0,
                  'eval/peer_1/top1': p1,
                  'eval/ensemble/top1': ens,
                  'eval/best_peer/top1': max(p0, p1),
              }
          )
          + '\n'
      )
  return workdir


def test_table_groups_seeds_and_reports_best_and_final(tmp_path):
  dirs = [
      fake_run(tmp_path, 'a0', 0, 'mcl', [(0.80, 0.82, 0.83), (0.90, 0.86, 0.91)]),
      fake_run(tmp_path, 'a1', 1, 'mcl', [(0.92, 0.70, 0.93), (0.88, 0.86, 0.89)]),
      fake_run(tmp_path, 'b0', 0, 'dml', [(0.85, 0.84, 0.86)]),
  ]
  lines = report.table(dirs).splitlines()
  assert len(lines) == 4
  mcl = next(l for l in lines if '· mcl ·' in l)
  cells = [c.strip() for c in mcl.strip('|').split('|')]
  assert cells[0] == 'fashion_mnist · mcl · resnet8×2' and cells[1] == '0,1'
  assert cells[3] == '91.00 ± 1.41'  # best-peer: max over evals: 0.90, 0.92
  assert cells[4] == '89.00 ± 1.41'  # final best peer: 0.90, 0.88
  assert cells[5] == '87.50 ± 0.71'  # final mean peer: 0.88, 0.87
  assert cells[6] == '92.00 ± 1.41'  # best ensemble: 0.91, 0.93
  dml = next(l for l in lines if '· dml ·' in l)
  assert '| 85.00 |' in dml


def test_group_names_separate_variants():
  c = config_lib.base_config()
  c.model.arch, c.cohort.num_peers = 'resnet8', 1
  c.method, c.teacher.arch = methods.config('crcd', num_negatives=64), 'resnet20'
  assert report.describe(c.to_dict()) == 'fashion_mnist · crcd from resnet20 (K = 64) · resnet8×1'
  c.method = methods.config('kd')
  assert report.describe(c.to_dict()) == 'fashion_mnist · kd from resnet20 · resnet8×1'
  c.method, c.model.arch = methods.config('mcl_okd'), 'resnet8_okd2'
  okd = report.describe(c.to_dict())
  c.method.dot_weight = c.method.contrast_weight = 0.0
  assert report.describe(c.to_dict()) == okd.replace('mcl_okd', 'mcl_okd (CE only: branches alone)')
  # L-MCL's ablations and a training subset get their own groups.
  c.model.arch, c.cohort.num_peers, c.data.train_examples = 'resnet8', 2, 1000
  c.method = methods.config('lmcl')
  assert report.describe(c.to_dict()) == 'fashion_mnist (1000 images) · lmcl · resnet8×2'
  c.method = methods.config('lmcl', meta_learned_weights=False, stage_pairs='diagonal')
  assert report.describe(c.to_dict()).endswith(
      '· lmcl (fixed w = 1; diagonal stage pairs) · resnet8×2'
  )
  c.method = methods.config('lmcl', meta_every_steps=7)
  assert '· lmcl (meta step every 7 steps) ·' in report.describe(c.to_dict())
  c.method = methods.config('lmcl', branch_ce=False, alpha=0.05)
  assert '· lmcl (no branch CE; α = 0.05, γ = 1, β = 0.1, λ = 1) ·' in report.describe(c.to_dict())


def test_train_set_column_only_when_runs_evaluated_their_training_images(tmp_path):
  dirs = [fake_run(tmp_path, f'a{s}', s, 'mcl', [(0.80, 0.82, 0.83)]) for s in (0, 1)]
  assert 'train set' not in report.table(dirs)
  for workdir, fit in zip(dirs, (0.99, 0.97)):
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      row = {'step': 9, 'eval/peer_0/top1': 0.8, 'eval/peer_1/top1': 0.8}
      row.update({'eval/ensemble/top1': 0.8, 'eval/best_peer/top1': 0.8})
      row.update({'train_eval/peer_0/top1': fit, 'train_eval/peer_1/top1': 1.0})
      f.write(json.dumps(row) + '\n')
  header, _, mcl = report.table(dirs).splitlines()
  assert header.endswith('| train set, mean peer (final) |')
  assert mcl.endswith('| 99.00 ± 0.71 |')  # mean over peers: 0.995, 0.985


def test_best_classifier_column_only_when_a_run_logs_it(tmp_path):
  """L-MCL's `eval/best_classifier/top1` (branches and aggregate too): the max over evaluations,
  '—' for runs without it."""
  dirs = [fake_run(tmp_path, 'a0', 0, 'mcl', [(0.80, 0.82, 0.83)])]
  assert 'best classifier' not in report.table(dirs)
  dirs.append(fake_run(tmp_path, 'b0', 0, 'lmcl', [(0.80, 0.82, 0.83), (0.84, 0.81, 0.85)]))
  with open(os.path.join(dirs[1], 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  for row, best in zip(rows[1:], (0.86, 0.85)):
    row['eval/best_classifier/top1'] = best
  with open(os.path.join(dirs[1], 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  header, _, mcl, lmcl = report.table(dirs).splitlines()
  assert header.endswith('| best classifier incl. branches (best) |')
  assert mcl.endswith('| — |') and lmcl.endswith('| 86.00 |')
  # A second seed of the group that predates the metric: the cell names the seed it covers.
  dirs.append(fake_run(tmp_path, 'b1', 1, 'lmcl', [(0.80, 0.82, 0.83)]))
  lmcl = report.table(dirs).splitlines()[3]
  assert '| 0,1 |' in lmcl and lmcl.endswith('| 86.00 (seed 0) |')


def test_metrics_file_exists_from_the_start_and_resume_drops_later_lines(tmp_path):
  """A run stopped before its first log point still leaves metrics.jsonl (empty: the report says
  there is no evaluation yet); a resume drops the lines logged after the restored step."""
  workdir = str(tmp_path / 'run')
  writer = metrics.MetricWriter(workdir)
  assert metrics.read_metrics(workdir) == []
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_lib.base_config().to_dict(), f)
  with pytest.raises(ValueError, match='no evaluation'):
    report.run_summary(workdir)
  for step in (2, 4, 6):
    writer.write(step, {'train/loss': float(step)})
  writer.close()
  metrics.MetricWriter(workdir, resume_step=4).close()
  assert [r['step'] for r in metrics.read_metrics(workdir)] == [2, 4]


def test_paired_differences_are_taken_seed_by_seed(tmp_path):
  dirs = [
      fake_run(tmp_path, 'a0', 0, 'mcl', [(0.90, 0.86, 0.91)]),
      fake_run(tmp_path, 'a1', 1, 'mcl', [(0.88, 0.86, 0.89)]),
      fake_run(tmp_path, 'a2', 2, 'mcl', [(0.70, 0.70, 0.70)]),  # no reference run of seed 2
      fake_run(tmp_path, 'b0', 0, 'dml', [(0.85, 0.84, 0.86)]),
      fake_run(tmp_path, 'b1', 1, 'dml', [(0.89, 0.89, 0.90)]),
  ]
  lines = report.paired_table(dirs, '· dml').splitlines()
  assert 'against fashion_mnist · dml · resnet8×2' in lines[0]
  (mcl,) = [l for l in lines if '· mcl ·' in l]
  cells = [c.strip() for c in mcl.strip('|').split('|')]
  assert cells[1] == '0,1'
  # best peer: 0.90 - 0.85 = +5, 0.88 - 0.89 = -1 -> mean 2, std sqrt(18); one seed of two > 0.
  assert cells[2] == f'+2.00 ± {18**0.5:.2f} (1/2)'
  # mean peer (final): 0.88 - 0.845 = +3.5, 0.87 - 0.89 = -2.
  assert cells[4] == f'+0.75 ± {(2 * 2.75**2) ** 0.5:.2f} (1/2)'
  assert not any('· dml ·' in l for l in lines[1:])


def test_paired_with_must_name_exactly_one_group_through_the_cli(tmp_path):
  dirs = [fake_run(tmp_path, 'a0', 0, 'mcl', [(0.9, 0.8, 0.9)])]
  dirs.append(fake_run(tmp_path, 'b0', 0, 'dml', [(0.9, 0.8, 0.9)]))
  with pytest.raises(SystemExit) as exc:
    report.main(dirs + ['--paired-with', 'resnet8'])
  assert exc.value.code == 2
