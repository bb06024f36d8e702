#!/usr/bin/env bash
# The README's teacher -> student and MCL-OKD comparison on the embedded Fashion-MNIST, resumable:
#   scripts/fashion_mnist_kd_comparison.sh ROOT [WORKERS]
# trains the ResNet-20 teacher once, then for seeds 0, 1, 2: the ResNet-8 student alone, with KD,
# CKD, CRCD, and MCL-OKD with its two branches trained with and without the distillation terms
# (configs/fashion_mnist_kd.py). A finished run leaves ROOT/NAME/done and is skipped; an
# interrupted one resumes from its checkpoint when the script runs again. WORKERS (default 1)
# runs that many at once (each claims a run with mkdir ROOT/NAME.lock; remove stale locks of
# killed runs before restarting). Then: python -m mcl_jax.report ROOT/*_s*
set -uo pipefail
ROOT=${1:?usage: $0 ROOT [WORKERS]}
WORKERS=${2:-1}
PY=${PYTHON:-python}
cfg=configs/fashion_mnist_kd.py
cd "$(dirname "$0")/.."
mkdir -p "$ROOT"

go() {
  local name=$1; shift
  [ -f "$ROOT/$name/done" ] && return 0
  mkdir "$ROOT/$name.lock" 2>/dev/null || return 0
  local start=$(date +%s)
  if "$PY" -m mcl_jax.main "$@" --workdir "$ROOT/$name" >> "$ROOT/$name.log" 2>&1; then
    touch "$ROOT/$name/done"
  fi
  rmdir "$ROOT/$name.lock"
  echo "$name: $(( $(date +%s) - start ))s $(date +%H:%M)" >> "$ROOT/walltimes.txt"
}

worker() {
  go teacher --config $cfg:role=teacher
  while [ ! -f "$ROOT/teacher/done" ]; do  # another worker may be training it
    [ -d "$ROOT/teacher.lock" ] || { echo "no teacher: see $ROOT/teacher.log" >&2; return 1; }
    sleep 10
  done
  local order=(0 1 2)
  [ "$1" -eq 2 ] && order=(2 1 0)
  for s in "${order[@]}"; do
    go student_s$s --config $cfg:method=independent,seed=$s
    go kd_s$s --config $cfg:method=kd,teacher=$ROOT/teacher,seed=$s
    go ckd_s$s --config $cfg:method=ckd,teacher=$ROOT/teacher,seed=$s
    go crcd_s$s --config $cfg:method=crcd,teacher=$ROOT/teacher,seed=$s
    go okd_s$s --config $cfg:method=mcl_okd,seed=$s
    go okd_branches_s$s --config $cfg:method=mcl_okd,seed=$s --config.method.dot_weight=0.0 \
        --config.method.contrast_weight=0.0
  done
}

for w in $(seq 1 "$WORKERS"); do worker "$w" & done
wait
