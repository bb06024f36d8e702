"""examples/python_api.py, README's "Python API" section, runs as written and reports what the run
logged; README includes it verbatim."""

import os
import re
import subprocess
import sys

from mcl_jax.metrics import read_metrics

from support import REPO

EXAMPLE = os.path.join(REPO, 'examples', 'python_api.py')


def test_readme_includes_the_example_verbatim():
  readme = open(os.path.join(REPO, 'README.md')).read()
  assert '```python\n' + open(EXAMPLE).read() + '```\n' in readme


def test_python_api_example_prints_the_logged_accuracy(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, EXAMPLE, workdir], cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  printed = float(re.search(r'^best peer top-1: (\S+)$', proc.stdout, re.M).group(1))
  evals = [r for r in read_metrics(workdir) if 'eval/best_peer/top1' in r]
  assert printed == evals[-1]['eval/best_peer/top1']
  assert re.search(r'^evaluated step 12 ensemble top-1: ', proc.stdout, re.M)
  assert re.search(r'^peer 0 on 500 test images: \d+\.\d\d%$', proc.stdout, re.M)
  assert os.path.getsize(os.path.join(workdir, 'peer0.msgpack')) > 0
