#!/usr/bin/env bash
# One-run CPU comparison: the JAX cohort step per strategy and K against the authors'-style PyTorch
# step (a standalone script that is not part of this repository; its path in TORCH_BENCH) on the
# same machine, interleaved so that machine noise hits both. Usage:
#   JAX_PY=.venv/bin/python TORCH_PY=/path/to/torch-venv/bin/python \
#     TORCH_BENCH=/path/to/torch_mcl_step.py bash benchmarks/cpu_suite.sh > out.jsonl
# The PyTorch venv is separate (`python -m venv tv && tv/bin/pip install torch==2.13.0 numpy`).
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_PY=${JAX_PY:-.venv/bin/python}
TORCH_PY=${TORCH_PY:-}
STEPS=${STEPS:-5}
TORCH_BENCH=${TORCH_BENCH:-}
if [[ -n "$TORCH_PY" && -z "$TORCH_BENCH" ]]; then
  echo "cpu_suite.sh: TORCH_PY is set; set TORCH_BENCH to the PyTorch step script too." >&2
  exit 2
fi
PEERS=${PEERS:-"1 2 4"}
STRATEGIES=${STRATEGIES:-"unroll vmap"}
for k in $PEERS; do
  if [[ -n "$TORCH_PY" ]]; then
    "$TORCH_PY" "$TORCH_BENCH" --peers "$k" --batch 128 --steps "$STEPS" --no-contrastive | sed 's/^{/{"suite":"torch_ce",/'
    [[ $k -gt 1 ]] && "$TORCH_PY" "$TORCH_BENCH" --peers "$k" --batch 128 --steps "$STEPS" | sed 's/^{/{"suite":"torch_mcl",/'
  fi
  for s in $STRATEGIES; do
    "$JAX_PY" benchmarks/cohort_step.py --arch resnet32 --peers "$k" --batch 128 --method independent --strategy "$s" --steps "$STEPS"
  done
  # The MCL step on the default (auto) strategy: its cost over the independent step is the loss terms.
  if [[ $k -gt 1 ]]; then
    "$JAX_PY" benchmarks/cohort_step.py --arch resnet32 --peers "$k" --batch 128 --method mcl --strategy auto --steps "$STEPS"
  fi
  if [[ $k -eq 1 ]]; then  # what the XLA:CPU compile option buys
    "$JAX_PY" benchmarks/cohort_step.py --arch resnet32 --peers 1 --batch 128 --method independent --strategy auto --steps "$STEPS" --no-fast-path --breakdown
    "$JAX_PY" benchmarks/cohort_step.py --arch resnet32 --peers 1 --batch 128 --method independent --strategy auto --steps "$STEPS" --breakdown
  fi
done
