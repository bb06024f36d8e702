#!/usr/bin/env bash
# The README's self-supervised comparison on the embedded Fashion-MNIST, resumable:
#   scripts/fashion_mnist_moco_comparison.sh [WORKDIRS]
# For seeds 0, 1, 2: MoCo (configs/fashion_mnist_moco_mcl.py:peers=1) and MoCo-MCL x2 (peers=2),
# each followed by the linear evaluation of every peer on cached features
# (configs/linear_eval.py:cached: each training image's feature computed once, un-augmented; the
# protocol's augmented views cost ~30 min a probe on this CPU); and, for scale, the quick start's
# supervised MCL x2 (seed 0) probed the same way. Each run trains in WORKDIRS/NAME (default
# workdirs/moco); its record (config.json, metrics.jsonl, linear_eval_peer_<p>.json) goes to
# results/moco/NAME, and a run with a record is skipped. A killed run resumes when the script runs
# again. Then it prints python -m mcl_jax.report results/moco/* and the linear-evaluation table.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/moco}
RECORDS=${RECORDS:-results/moco}
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$ROOT" "$RECORDS"

go() {  # go NAME PEERS ARGS...: train, probe every peer, keep the record
  local name=$1 peers=$2; shift 2
  [ -f "$RECORDS/$name/metrics.jsonl" ] && return 0
  start=$(date +%s)
  "$PY" -m mcl_jax.main "$@" --workdir "$ROOT/$name" >> "$ROOT/$name.log" 2>&1 \
    || { echo "$name failed: see $ROOT/$name.log" >&2; return 1; }
  trained=$(date +%s)
  mkdir -p "$RECORDS/$name.tmp"
  for p in $(seq 0 $((peers - 1))); do
    "$PY" -m mcl_jax.linear_eval --workdir "$ROOT/$name" --peer "$p" \
      --config configs/linear_eval.py:cached 2>> "$ROOT/$name.log" | tail -n 1 \
      > "$RECORDS/$name.tmp/linear_eval_peer_$p.json" \
      || { echo "$name: linear evaluation of peer $p failed: see $ROOT/$name.log" >&2; return 1; }
  done
  cp "$ROOT/$name/config.json" "$ROOT/$name/metrics.jsonl" "$RECORDS/$name.tmp/"
  rm -rf "$RECORDS/$name" && mv "$RECORDS/$name.tmp" "$RECORDS/$name"
  echo "$name: train $((trained - start))s, linear eval $(( $(date +%s) - trained ))s $(date '+%F %H:%M')" \
    >> "$RECORDS/walltimes.txt"
}

cfg=configs/fashion_mnist_moco_mcl.py
go moco_s0 1 --config $cfg:peers=1,seed=0
go moco_mcl_s0 2 --config $cfg:peers=2,seed=0
go supervised_mcl_s0 2 --config configs/fashion_mnist_mcl.py:seed=0
for s in 1 2; do
  go moco_s$s 1 --config $cfg:peers=1,seed=$s
  go moco_mcl_s$s 2 --config $cfg:peers=2,seed=$s
done
"$PY" -m mcl_jax.report "$RECORDS"/*_s*

