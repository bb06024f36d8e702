"""`python -m mcl_jax.rows`: every paper row names a config that loads, validates and builds its
cohort and method state (under `jax.eval_shape`: nothing trains), and docs/rows.md is its output."""

import json
import os
import subprocess
import sys

import pytest

from mcl_jax import cli, rows, train

from support import REPO

ALL = rows.all_rows()


def test_every_paper_has_rows_and_every_row_is_complete():
  assert {r.paper for r in ALL} == set(rows.PAPERS)
  for r in ALL:
    assert r.table and r.row and r.metric and r.published, r
    path = r.config.partition(':')[0]
    assert os.path.isfile(os.path.join(REPO, path)), r.config
  # No two rows claim the same cell of a table.
  cells = [(r.paper, r.table, r.row) for r in ALL]
  assert len(cells) == len(set(cells))


def test_every_row_config_loads_and_validates():
  assert rows.check(ALL) == []


def _distinct_configs():
  """One row per distinct run (model, cohort, method, teacher and data sections)."""
  seen = {}
  for r in ALL:
    c = cli.load_config(r.config)
    key = json.dumps(
        {k: c[k].to_dict() for k in ('model', 'cohort', 'method', 'teacher', 'data')},
        sort_keys=True,
        default=str,
    )
    seen.setdefault(key, (r, c))
  return list(seen.values())


def test_every_row_builds_its_cohort_and_method_state_abstractly():
  """`train.abstract_run` builds the cohort, the method and the whole train state under
  `jax.eval_shape` for the row's exact shapes (CIFAR 32x32x3 / ImageNet 224x224x3)."""
  for r, config in _distinct_configs():
    run = train.abstract_run(config)
    num_peers = sum(g.num_peers for g in run.cohort.groups)
    assert num_peers == config.cohort.num_peers, r.config
    assert run.state.params['peers'], r.config


def test_docs_rows_md_is_the_generated_table():
  """docs/rows.md is `python -m mcl_jax.rows` (regenerate it with that command)."""
  with open(os.path.join(REPO, 'docs', 'rows.md')) as f:
    text = f.read()
  assert rows.markdown(ALL) in text, 'regenerate docs/rows.md: see its first lines'


def test_cli_formats_and_bad_paper(tmp_path):
  run = lambda *a: subprocess.run(  # noqa: E731
      [sys.executable, '-m', 'mcl_jax.rows', *a], cwd=tmp_path, capture_output=True, text=True
  )
  out = run('--paper', 'lmcl', '--format', 'json')
  assert out.returncode == 0, out.stderr
  records = [json.loads(line) for line in out.stdout.splitlines()]
  assert len(records) == len(rows.select('lmcl')) and {r['paper'] for r in records} == {'lmcl'}
  assert all(r['command'].startswith('python -m mcl_jax.main --config configs/') for r in records)
  out = run('--paper', 'mcl_okd', '--format', 'commands')
  commands = [line for line in out.stdout.splitlines() if not line.startswith('#')]
  assert len(commands) == len(rows.select('mcl_okd'))
  bad = run('--paper', 'nope')
  assert bad.returncode == 2 and 'nope' in bad.stderr


def test_select_rejects_unknown_paper():
  with pytest.raises(ValueError, match='unknown paper'):
    rows.select('nope')
