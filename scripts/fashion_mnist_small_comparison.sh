#!/usr/bin/env bash
# The README's small-data comparison on the embedded Fashion-MNIST (configs/fashion_mnist_small.py:
# 1,000 training images, 200 epochs), resumable:
#   scripts/fashion_mnist_small_comparison.sh [WORKDIRS [WORKERS]]
# For seeds 0, 1, 2 (the main table for every seed first, then the ablations): every online method (independent, DML, MCL x2, MCL x4,
# MCL x2 + logit KD, L-MCL x2, MCL-OKD and its branches with CE only) and the L-MCL ablations of
# results/lmcl_investigation.md (fixed layer weights of 1, no auxiliary-branch CE, diagonal stage
# pairs, contrastive weights / 18, the authors' meta frequency). Each run trains in WORKDIRS/NAME (default workdirs/small);
# when it finishes, its record (config.json, metrics.jsonl) is copied to results/small/NAME, and
# a run with a record is skipped. A killed run resumes from its checkpoint when the script runs
# again. WORKERS (default 1) runs that many at once (a run is claimed with flock, released when
# its worker dies). Then it prints python -m mcl_jax.report results/small/* with the paired
# differences against independent peers (--paired-with "· independent ·").
# Each run takes up to ~15 min alone on a 2-core CPU (L-MCL the longest; lmcl_meta7 ~22 min),
# 39 runs in all.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/small}
WORKERS=${2:-1}
RECORDS=${RECORDS:-results/small}
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
cfg=configs/fashion_mnist_small.py
mkdir -p "$ROOT" "$RECORDS"

go() {
  local name=$1; shift
  [ -f "$RECORDS/$name/metrics.jsonl" ] && return 0
  (
    flock -n 9 || exit 0  # another worker has it
    [ -f "$RECORDS/$name/metrics.jsonl" ] && exit 0
    start=$(date +%s)
    if "$PY" -m mcl_jax.main "$@" --workdir "$ROOT/$name" >> "$ROOT/$name.log" 2>&1; then
      mkdir -p "$RECORDS/$name"
      for f in config.json config_changes.jsonl metrics.jsonl; do  # metrics last: the marker
        [ -f "$ROOT/$name/$f" ] && cp "$ROOT/$name/$f" "$RECORDS/$name/$f.tmp" \
          && mv "$RECORDS/$name/$f.tmp" "$RECORDS/$name/$f"
      done
      echo "$name: $(( $(date +%s) - start ))s $(date '+%F %H:%M')" >> "$RECORDS/walltimes.txt"
    else
      echo "$name failed: see $ROOT/$name.log" >&2
    fi
  ) 9> "$ROOT/$name.lock"
}

main_table() {
  local s=$1
  go independent_s$s --config $cfg:method=independent,seed=$s
  go dml_s$s --config $cfg:method=dml,seed=$s
  go mcl_s$s --config $cfg:method=mcl,seed=$s
  # MCL x4 as the authors build it: one network, shared stem + stage 0, four branches as peers.
  go mclx4_s$s --config $cfg:method=mcl,branches=4,seed=$s
  go mcl_kd_s$s --config $cfg:method=mcl,seed=$s --config.method.logit_kd=True
  go lmcl_s$s --config $cfg:method=lmcl,seed=$s
  go okd_s$s --config $cfg:method=mcl_okd,seed=$s
  go okd_branches_s$s --config $cfg:method=mcl_okd,seed=$s --config.method.dot_weight=0.0 \
      --config.method.contrast_weight=0.0
}

ablations() {
  local s=$1
  # L-MCL ablations (results/lmcl_investigation.md).
  go lmcl_fixed_w_s$s --config $cfg:method=lmcl,seed=$s --config.method.meta_learned_weights=False
  go lmcl_no_branch_ce_s$s --config $cfg:method=lmcl,seed=$s --config.method.branch_ce=False
  # The authors' meta frequency in this regime (first batch of every 7-step epoch): 200 updates
  # of phi instead of 28; ~2x an L-MCL run's cost (a meta step costs ~7.5 L-MCL steps).
  go lmcl_meta7_s$s --config $cfg:method=lmcl,seed=$s --config.method.meta_every_steps=7
  go lmcl_diagonal_s$s --config $cfg:method=lmcl,seed=$s --config.method.stage_pairs=diagonal
  # The contrastive sum over the 2 x 9 (peer pair, stage pair) combinations as a mean (/ 18).
  go lmcl_mean_s$s --config $cfg:method=lmcl,seed=$s --config.method.alpha=0.005555555555555556 \
      --config.method.beta=0.005555555555555556 --config.method.gamma=0.05555555555555555 \
      --config.method.lam=0.05555555555555555
}

worker() {
  for s in 0 1 2; do main_table "$s"; done
  for s in 0 1 2; do ablations "$s"; done
}

for w in $(seq 1 "$WORKERS"); do worker & done
wait
"$PY" -m mcl_jax.report "$RECORDS"/*_s* --paired-with "· independent ·"
