r"""Compile time and compiled memory of the jitted steps.

    python benchmarks/compile_memory.py [--peers 2,4,8] [--no-meta] [--meta-programs one,per_step]
        [--no-configs]

One JSON line per program: `lower_s` (trace + lower), `compile_s` (XLA compile), and from
`compiled.memory_analysis()` the total (arguments + unaliased outputs + temporaries), temporary,
argument and output memory in MiB. Programs:
- the MCL train step of ResNet-32 x K at batch 128 (benchmarks/cohort_step.py's setup, donated
  state) for each K of --peers;
- the L-MCL meta step of ResNet-32 x 2 at batch 128 (donated, as the training loop runs it), as
  one program and per step (`--meta-programs`; per step: the sum of its programs' times, the
  largest of their memories);
- the train step of every shipped config (configs/*.py at its defaults), built from its
  abstract state (`train.abstract_run`: no data needed), except configs with a teacher.
Compile times depend on the machine and its load; the memory figures do not.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import time

import jax

from cohort_step import build_meta_step, build_step
from mcl_jax import methods, step as step_lib, train

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')


def measure(what: str, jitted, *args, executable: list | None = None) -> dict:
  """The record of one program; `executable`: a list the compiled program is appended to."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  if executable is not None:
    executable.append(compiled)
  mem = compiled.memory_analysis()
  mib = lambda n: round(n / 2**20, 1)  # noqa: E731
  return {
      'program': what,
      'backend': jax.default_backend(),
      'lower_s': round(t1 - t0, 1),
      'compile_s': round(t2 - t1, 1),
      # arguments + outputs not aliased to them + temporaries (XLA:CPU's own peak_memory_in_bytes
      # counts only the arguments)
      'total_mib': mib(
          mem.argument_size_in_bytes
          + mem.output_size_in_bytes
          - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes
      ),
      'temp_mib': mib(mem.temp_size_in_bytes),
      'argument_mib': mib(mem.argument_size_in_bytes),
      'output_mib': mib(mem.output_size_in_bytes),
      'alias_mib': mib(mem.alias_size_in_bytes),
  }


def self_measuring_jit(records: list):
  """A `jit` for `step.make_per_step_meta_step` whose programs `measure` themselves on their first
  call (appending to `records`), then run compiled."""

  def jit(fn, **kwargs):
    jitted, executable = jax.jit(fn, **kwargs), []

    def call(*args):
      if not executable:
        records.append(measure(fn.__qualname__, jitted, *args, executable=executable))
      return executable[0](*args)

    return call

  return jit


def per_step_record(what: str, records: list) -> dict:
  """The programs of a per-step meta round as one record: summed times, the largest memory
  (they run one after another; the trajectory's parameters are held between them)."""
  out = {'program': what, 'backend': jax.default_backend(), 'programs': len(records)}
  for key in ('lower_s', 'compile_s'):
    out[key] = round(sum(r[key] for r in records), 1)
  for key in ('total_mib', 'temp_mib', 'argument_mib', 'output_mib', 'alias_mib'):
    out[key] = max(r[key] for r in records)
  return out


def shipped_config(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--peers', default='2,4,8')
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--no-meta', action='store_true')
  ap.add_argument('--meta-programs', default='one,per_step', help='of one, per_step')
  ap.add_argument('--no-configs', action='store_true')
  args = ap.parse_args(argv)
  for k in [int(k) for k in args.peers.split(',') if k]:
    _, state, train_step, data = build_step('resnet32', k, 'mcl', 'auto', args.batch)
    print(json.dumps(measure(f'mcl train step, resnet32 x {k}', train_step, state, data, None)))
  if not args.no_meta:
    cohort, state, _, data = build_step('resnet32', 2, 'lmcl', 'auto', args.batch)
    for program in args.meta_programs.split(','):
      what = f'lmcl meta step ({program}), resnet32 x 2'
      if program == 'one':
        meta_step = build_meta_step(cohort, methods.config('lmcl'), donate=True, program=program)
        print(json.dumps(measure(what, meta_step, state, data, None)), flush=True)
        continue
      records = []
      meta_step = build_meta_step(
          cohort, methods.config('lmcl'), program=program, jit=self_measuring_jit(records)
      )
      state = jax.block_until_ready(meta_step(state, data, None))
      print(json.dumps(per_step_record(what, records)), flush=True)
  if args.no_configs:
    return
  options = step_lib.compiler_options()
  for path in sorted(glob.glob(os.path.join(CONFIGS, '*.py'))):
    if os.path.basename(path) == 'linear_eval.py':
      continue  # the config of mcl_jax.linear_eval, not a training config
    config = shipped_config(path)
    run = train.abstract_run(config)
    if type(run.method).load_frozen is not methods.Method.load_frozen:
      continue  # needs a teacher's workdir
    jitted = jax.jit(run.train_step, donate_argnums=0, compiler_options=options)
    result = measure(
        f'train step, configs/{os.path.basename(path)}', jitted, run.state, run.batch, None
    )
    result['strategy'] = run.cohort.strategy
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
