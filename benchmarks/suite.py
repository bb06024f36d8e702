r"""Every comparison of BENCHMARKS.md from one command, and its tables from the results.

    python benchmarks/suite.py --out benchmarks/results/suite_$(date +%F).jsonl \
        --torch-python /tmp/tv/bin/python --torch-mcl /path/to/torch_mcl_step.py \
        --torch-lmcl /path/to/torch_lmcl_step.py --authors-src /path/to/L-MCL-source
    python benchmarks/suite.py --tables benchmarks/results/suite_YYYY-MM-DD.jsonl

The PyTorch comparators are standalone scripts outside this repository (flags, or the environment
variables TORCH_PY, TORCH_MCL_BENCH, TORCH_LMCL_BENCH, LMCL_AUTHORS_SRC); without them only the JAX
side runs. Every measurement is its own process; each JAX measurement runs right after the PyTorch
one it is compared with, so drifts of a shared machine hit both, and the whole list is repeated
`--repeats` times. Each JSON line of --out is one process's output plus `suite` (what it is),
`env` (the host-malloc setting, below), `repeat` and the load average before and after.

Host malloc (`--envs`): `default` is the environment as it is; `hugetlb` sets
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for BOTH frameworks (transparent huge pages for large
mallocs; launch/local.sh sets it for training runs; docs/performance.md#host-memory-on-cpu).
PyTorch runs with OMP_WAIT_POLICY=PASSIVE (its comparators' advice on a shared machine).

What runs, per env and repeat: for each K of --peers, PyTorch CE-only and JAX `independent` (the
per-backend default strategy, `unroll` on CPU), PyTorch MCL and JAX MCL (K > 1), JAX `vmap` for
the K of --vmap-peers; JAX with and without the XLA:CPU compile option at K = 1; the authors'
L-MCL step and meta round against benchmarks/lmcl_step.py (ResNet-32 x 2, batch 128); the
`moco_mcl` step against `mcl` and against K = 1 (benchmarks/moco_step.py, one process). Once:
`cohort.strategy=autotune` on the quick start (configs/fashion_mnist_mcl.py, no cache) and
benchmarks/compile_memory.py. `--tables` prints the markdown tables of BENCHMARKS.md from --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from timing import loadavg

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENVS = {'default': {}, 'hugetlb': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}}


def run_json(cmd: list[str], env: dict, timeout: int) -> dict:
  """Runs `cmd` and returns its last stdout line as JSON ({'error': ...} if it fails)."""
  proc = subprocess.run(
      cmd,
      capture_output=True,
      text=True,
      cwd=REPO,
      env={**os.environ, **env},
      timeout=timeout,
      check=False,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    return {'error': f'exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}'}
  return json.loads(lines[-1])


def autotune_quickstart() -> None:
  """(Subprocess mode) The decision `cohort.strategy=autotune` takes for the quick start, timed
  afresh (no cache), as one JSON line."""
  sys.path.insert(0, os.path.join(REPO, 'configs'))
  os.environ['MCL_JAX_AUTOTUNE_CACHE'] = ''
  import fashion_mnist_mcl  # pylint: disable=g-import-not-at-top
  from mcl_jax import train  # pylint: disable=g-import-not-at-top

  config = fashion_mnist_mcl.get_config()
  config.cohort.strategy = 'autotune'
  exp = train.Experiment(config)
  print(json.dumps({'config': 'configs/fashion_mnist_mcl.py', **exp.tuning.as_json()}))


def plan(args) -> list[tuple[str, list[str], dict]]:
  """(suite label, command, extra env) of every measurement of one repeat, in order."""
  jax_py, steps = [sys.executable], str(args.steps)
  torch_env = {'OMP_WAIT_POLICY': 'PASSIVE'}
  step = lambda k, method, strategy, *extra: (  # noqa: E731
      jax_py
      + [os.path.join(HERE, 'cohort_step.py'), '--arch', 'resnet32', '--peers', str(k)]
      + ['--batch', '128', '--method', method, '--strategy', strategy, '--steps', steps, *extra]
  )
  torch_mcl = lambda k, *extra: (  # noqa: E731
      [args.torch_python, args.torch_mcl, '--peers', str(k), '--batch', '128', '--steps', steps]
      + list(extra)
  )
  runs = []
  for k in args.peers:
    if args.torch_mcl:
      runs.append(('torch_ce', torch_mcl(k, '--no-contrastive'), torch_env))
    runs.append(('jax_independent', step(k, 'independent', 'auto'), {}))
    if k > 1:
      if args.torch_mcl:
        runs.append(('torch_mcl', torch_mcl(k), torch_env))
      runs.append(('jax_mcl', step(k, 'mcl', 'auto'), {}))
    if k in args.vmap_peers:
      runs.append(('jax_independent_vmap', step(k, 'independent', 'vmap'), {}))
    if k == 1:
      runs.append(
          ('jax_independent_no_fast_path', step(1, 'independent', 'auto', '--no-fast-path'), {})
      )
  if args.torch_lmcl and args.authors_src:
    runs.append(
        (
            'torch_lmcl',
            [args.torch_python, args.torch_lmcl, '--authors-src', args.authors_src]
            + ['--arch', 'resnet32', '--peers', '2', '--batch', '128', '--steps', steps]
            + ['--meta-steps', str(args.meta_steps)],
            torch_env,
        )
    )
  runs.append(
      (
          'jax_lmcl',
          jax_py
          + [os.path.join(HERE, 'lmcl_step.py'), '--arch', 'resnet32', '--peers', '2']
          + ['--batch', '128', '--steps', steps, '--meta-steps', str(args.meta_steps)],
          {},
      )
  )
  runs.append(('jax_moco_step', jax_py + [os.path.join(HERE, 'moco_step.py')], {}))
  return runs


def measure(args) -> None:
  with open(args.out, 'a') as out:

    def record(label, cmd, env_name, env, repeat):
      start = loadavg()
      t0 = time.time()
      result = run_json(cmd, {**ENVS[env_name], **env}, args.timeout)
      line = {
          'suite': label,
          'env': env_name,
          'repeat': repeat,
          'loadavg_before': start,
          'loadavg_after': loadavg(),
          'wall_s': round(time.time() - t0, 1),
          **result,
      }
      out.write(json.dumps(line) + '\n')
      out.flush()
      print(f"{label:30s} {env_name:8s} {line.get('error', '')[:200] or 'ok'}", flush=True)

    for repeat in range(args.repeats):
      for env_name in args.envs:
        for label, cmd, env in plan(args):
          record(label, cmd, env_name, env, repeat)
    env_name = args.envs[-1]
    record(
        'autotune_quickstart', [sys.executable, __file__, '--autotune-quickstart'], env_name, {}, 0
    )
    if not args.no_compile_memory:
      cmd = [sys.executable, os.path.join(HERE, 'compile_memory.py')]
      proc = subprocess.run(
          cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENVS[env_name]}
      )
      for line in proc.stdout.splitlines():
        if line.startswith('{'):
          out.write(
              json.dumps({'suite': 'compile_memory', 'env': env_name, **json.loads(line)}) + '\n'
          )
      print(f"{'compile_memory':30s} {env_name:8s} exit {proc.returncode}", flush=True)


# ----------------------------------------------------------------------------------------------- #
# Tables
# ----------------------------------------------------------------------------------------------- #
def _median(rows, key):
  values = [r[key] for r in rows if r.get(key) is not None]
  return statistics.median(values) if values else None


def _fmt(value, digits=0):
  return '–' if value is None else f'{value:.{digits}f}'


def _ratio(a, b):
  return None if a is None or not b else a / b


def tables(path: str) -> str:
  with open(path) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  rows = [r for r in rows if 'error' not in r]
  pick = lambda suite, env, **kw: [  # noqa: E731
      r
      for r in rows
      if r['suite'] == suite and r['env'] == env and all(r.get(k) == v for k, v in kw.items())
  ]
  out = []
  for env in dict.fromkeys(r['env'] for r in rows if r['suite'] != 'compile_memory'):
    peers = sorted(
        {r['peers'] for r in rows if r['suite'] == 'jax_independent' and r['env'] == env}
    )
    if peers:
      out += [
          f'Cohort train step, ResNet-32, batch 128, host malloc `{env}` (median ms over repeats of each '
          "process's median step):",
          '',
          '| K | PyTorch CE | JAX independent | ratio | PyTorch MCL | JAX MCL | ratio | JAX vmap | JAX no compile option |',
          '|---|---|---|---|---|---|---|---|---|',
      ]
      for k in peers:
        tce = _median(pick('torch_ce', env, peers=k), 'step_ms_median')
        jin = _median(pick('jax_independent', env, peers=k), 'step_ms_median')
        tmcl = _median(pick('torch_mcl', env, peers=k), 'step_ms_median')
        jmcl = _median(pick('jax_mcl', env, peers=k), 'step_ms_median')
        vmap = _median(pick('jax_independent_vmap', env, peers=k), 'step_ms_median')
        slow = _median(pick('jax_independent_no_fast_path', env, peers=k), 'step_ms_median')
        out.append(
            f'| {k} | {_fmt(tce)} | {_fmt(jin)} | {_fmt(_ratio(jin, tce), 2)} | {_fmt(tmcl)} | '
            f'{_fmt(jmcl)} | {_fmt(_ratio(jmcl, tmcl), 2)} | {_fmt(vmap)} | {_fmt(slow)} |'
        )
      out.append('')
    torch_lmcl, jax_lmcl = pick('torch_lmcl', env), pick('jax_lmcl', env)
    if jax_lmcl:
      out += [
          f'L-MCL, ResNet-32 x 2, batch 128, host malloc `{env}` (ms):',
          '',
          '| | train step | meta step | amortised at 50 |',
          '|---|---|---|---|',
      ]
      keys = ('train_step_ms_median', 'meta_step_ms_median', 'amortised_step_ms_at_50')
      both = {}
      for name, group in (("authors' PyTorch", torch_lmcl), ('mcl_jax', jax_lmcl)):
        both[name] = [_median(group, k) for k in keys]
        out.append(f'| {name} | ' + ' | '.join(_fmt(v) for v in both[name]) + ' |')
      if torch_lmcl:
        ratios = [_ratio(j, t) for j, t in zip(both['mcl_jax'], both["authors' PyTorch"])]
        out.append('| JAX / PyTorch | ' + ' | '.join(_fmt(v, 2) for v in ratios) + ' |')
      out.append('')
  for r in [r for r in rows if r['suite'] == 'jax_moco_step']:
    out += [
        f"`moco_mcl` step, batch 128, host malloc `{r['env']}`, one process, round-robin "
        f"(load average {' '.join(r['loadavg_before'])}; median ms):",
        '',
        '| shape | moco K = 1 | moco K = 2 | mcl K = 2 | moco(2) / mcl(2) | moco(2) / moco(1) |',
        '|---|---|---|---|---|---|',
    ]
    for shape in dict.fromkeys(label.split('/')[0] for label in r['step_ms_median']):
      ms = [
          r['step_ms_median'].get(f'{shape}/{m}') for m in ('moco_mcl_k1', 'moco_mcl_k2', 'mcl_k2')
      ]
      out.append(
          f'| {shape} | ' + ' | '.join(_fmt(v) for v in ms) + ' | '
          f"{_fmt(r['ratios'].get(f'{shape}/moco_k2_over_mcl_k2'), 2)} | "
          f"{_fmt(r['ratios'].get(f'{shape}/moco_k2_over_moco_k1'), 2)} |"
      )
    out.append('')
  for r in [r for r in rows if r['suite'] == 'autotune_quickstart']:
    out += [
        f"Autotune on the quick start ({r['config']}): chose **{r['strategy']}** ({r['reason']}).",
        '',
        '| strategy | first call (compile + step) s | steps ms | median ms |',
        '|---|---|---|---|',
    ]
    for name, t in r['timings'].items():
      steps = ', '.join(f'{v:.0f}' for v in t['step_ms'])
      out.append(f"| {name} | {t['first_call_s']} | {steps} | {t['step_ms_median']:.0f} |")
    out.append('')
  memory = [r for r in rows if r['suite'] == 'compile_memory']
  if memory:
    out += [
        'Compile time and compiled memory:',
        '',
        '| program | lower s | compile s | total MiB | temporaries MiB |',
        '|---|---|---|---|---|',
    ]
    for r in memory:
      out.append(
          f"| {r['program']} | {r['lower_s']} | {r['compile_s']} | {r['total_mib']:.0f} | "
          f"{r['temp_mib']:.0f} |"
      )
    out.append('')
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', help='JSONL file to append the results to')
  ap.add_argument('--tables', metavar='JSONL', help='print the markdown tables of a results file')
  ap.add_argument('--torch-python', default=os.environ.get('TORCH_PY', ''))
  ap.add_argument('--torch-mcl', default=os.environ.get('TORCH_MCL_BENCH', ''))
  ap.add_argument('--torch-lmcl', default=os.environ.get('TORCH_LMCL_BENCH', ''))
  ap.add_argument('--authors-src', default=os.environ.get('LMCL_AUTHORS_SRC', ''))
  ap.add_argument('--peers', default='1,2,4')
  ap.add_argument('--vmap-peers', default='2')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--meta-steps', type=int, default=3)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--envs', default='default,hugetlb', help=f'of {sorted(ENVS)}')
  ap.add_argument('--timeout', type=int, default=1800, help='seconds per process')
  ap.add_argument('--no-compile-memory', action='store_true')
  ap.add_argument('--autotune-quickstart', action='store_true', help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.autotune_quickstart:
    return autotune_quickstart()
  if args.tables:
    return print(tables(args.tables))
  if not args.out:
    ap.error('--out (or --tables) is required')
  args.peers = [int(k) for k in args.peers.split(',') if k]
  args.vmap_peers = [int(k) for k in args.vmap_peers.split(',') if k]
  args.envs = [e for e in args.envs.split(',') if e]
  unknown = [e for e in args.envs if e not in ENVS]
  if unknown:
    ap.error(f'--envs: unknown {unknown}; choose from {sorted(ENVS)}')
  if (args.torch_mcl or args.torch_lmcl) and not args.torch_python:
    ap.error('--torch-python (TORCH_PY) is needed to run the PyTorch comparators')
  if args.torch_lmcl and not args.authors_src:
    ap.error("--torch-lmcl needs --authors-src (LMCL_AUTHORS_SRC): the authors' L-MCL source tree")
  return measure(args)


if __name__ == '__main__':
  main()
