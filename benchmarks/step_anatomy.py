r"""Where the time of the cohort train step goes on XLA:CPU, by kind of operation.

    python benchmarks/step_anatomy.py --peers 1 [--steps 3] [--batchnorm-bound --rounds 3]

Profiles `--steps` steps of benchmarks/cohort_step.py's step (ResNet-32, batch 128, fixed random
CIFAR batch) with `jax.profiler`, maps every executed operation to its instruction in the compiled
HLO and sums the per-step milliseconds by kind:
- `library conv`: fusions that contain a convolution and run in a library kernel (YNNPACK),
  timed whole;
- `transpose`: loop fusions that only change a tensor's layout (the activations and output
  gradients put batch-minor for the weight-gradient convolutions);
- `library elementwise` / `library reduce`: YNNPACK fusions without a convolution;
- `loop elementwise`: XLA's own generated loops (broadcasts, selects, other elementwise chains);
- `other`: copies, small ops; `eigen conv (dispatch)`: the Eigen convolutions, which run
  asynchronously on the intra-op pool, so the profile holds only their dispatch; their time is in
  `unattributed` = the measured step minus everything attributed (work of the pool that overlaps).
One JSON line: {"kinds": {kind: ms per step}, "counts": {kind: ops per step}, "step_ms": ...}.

`--batchnorm-bound` also times, round robin in one process, the same step with every BatchNorm
replaced by a per-channel affine map (no statistics, no normalisation): the most that any
BatchNorm rewrite could save (`bound_ms`, `batchnorm_ms` medians of `--rounds` x 3 steps each).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import flax.linen as nn
import jax

from cohort_step import build_step, time_step
from mcl_jax.models import cifar_resnet

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = \S+ (\w[\w-]*)\(')
_CALLS = re.compile(r'calls=%([\w.\-]+)')


def _computations(hlo: str) -> dict:
  """{computation name: its body text} of an HLO module's text."""
  out, name = {}, None
  for line in hlo.split('\n'):
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      name = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      out[name] = []
    elif name is not None:
      out[name].append(line)
  return {k: '\n'.join(v) for k, v in out.items()}


def classify(hlo: str) -> dict:
  """{instruction name: kind} for every fusion, convolution and copy of compiled HLO text."""
  bodies, kinds = _computations(hlo), {}
  for line in hlo.split('\n'):
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, op = m.groups()
    called = _CALLS.search(line)
    if op == 'convolution':
      kinds[name] = 'eigen conv (dispatch)'
      continue
    if op == 'custom-call' and 'mcl_jax_conv3x3' in line:
      kinds[name] = 'native conv (mcl_jax.kernels)'
      continue
    if op != 'fusion':
      kinds[name] = 'other'
      continue
    body = bodies.get(called.group(1), '') if called else ''
    library = '__ynn_fusion' in line or '__onednn' in line
    if ' convolution(' in body:
      kinds[name] = 'library conv' if library else 'eigen conv (dispatch)'
    elif library:
      kinds[name] = 'library reduce' if ' reduce(' in body else 'library elementwise'
    elif ' transpose(' in body and not re.search(r' (add|multiply|subtract|maximum)\(', body):
      kinds[name] = 'transpose'
    else:
      kinds[name] = 'loop elementwise'
  return kinds


def profile(compiled, state, data, steps: int) -> tuple[dict, dict, float, object]:
  """(ms per step by kind, ops per step by kind, measured step ms, state) of `steps` steps of a
  compiled step (its own HLO names the profiled operations)."""
  kinds = classify(compiled.as_text())
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, _ = compiled(state, data, None)
      jax.block_until_ready(state)
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    jax.profiler.stop_trace()
    (trace,) = glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)['traceEvents']
  ms, count = collections.Counter(), collections.Counter()
  for event in events:
    kind = kinds.get(event.get('name', ''))
    if event.get('ph') == 'X' and kind:
      ms[kind] += event['dur'] / 1e3 / steps
      count[kind] += 1 / steps
  ms['unattributed'] = step_ms - sum(ms.values())
  return dict(ms), dict(count), step_ms, state


class ChannelAffine(nn.Module):
  """x * scale + bias per channel: BatchNorm's parameters without its statistics."""

  use_running_average: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    return x * scale + self.param('bias', nn.initializers.zeros, (x.shape[-1],))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--arch', default='resnet32')
  ap.add_argument('--peers', type=int, default=1)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--method', default='mcl')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--batchnorm-bound', action='store_true')
  ap.add_argument('--rounds', type=int, default=3)
  args = ap.parse_args(argv)
  setup = (args.arch, args.peers, args.method, 'auto', args.batch)
  _, state, train_step, data = build_step(*setup)
  # Compiled once: the executable that is profiled is the one whose HLO is classified.
  train_step = train_step.lower(state, data, None).compile()
  _, _, state = time_step(train_step, state, data, steps=1)
  ms, count, step_ms, state = profile(train_step, state, data, args.steps)
  out = {
      'arch': args.arch,
      'peers': args.peers,
      'batch': args.batch,
      'method': args.method,
      'backend': jax.default_backend(),
      'step_ms': round(step_ms, 1),
      'kinds': {k: round(v, 1) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
      'counts': {k: round(v) for k, v in count.items()},
  }
  if args.batchnorm_bound:
    batch_norm = cifar_resnet.batch_norm
    cifar_resnet.batch_norm = lambda train, *, dtype, name=None: ChannelAffine(name=name)
    try:
      _, bound_state, bound_step, _ = build_step(*setup)
      bound_step = bound_step.lower(bound_state, data, None).compile()  # as the measured step
      _, _, bound_state = time_step(bound_step, bound_state, data, steps=1)
    finally:
      cifar_resnet.batch_norm = batch_norm
    runs = {'batchnorm': [train_step, state, []], 'bound': [bound_step, bound_state, []]}
    for _ in range(args.rounds):
      for run in runs.values():
        _, times, run[1] = time_step(run[0], run[1], data, steps=3, warmup=0)
        run[2].extend(times)
    for label, run in runs.items():
      out[f'{label}_ms'] = round(statistics.median(run[2]), 1)
    out['bound_over_batchnorm'] = round(out['bound_ms'] / out['batchnorm_ms'], 3)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
