#!/usr/bin/env bash
# A Cloud TPU pod slice: create (optional), copy the repo, install, and run one process per worker
# (`--worker=all`); jax.distributed.initialize() finds the pod by itself (MCL_JAX_DISTRIBUTED=1).
#
#   launch/tpu_pod.sh [--dry-run] [--create] --tpu NAME --zone ZONE [--project P]
#       [--accelerator v4-32] [--version tpu-ubuntu2204-base] --bucket gs://BUCKET
#       --config CONFIG --workdir gs://BUCKET/runs/NAME [-- --config.key=value ...]
#
#   launch/tpu_pod.sh --create --tpu mcl-v4-32 --zone us-central2-b --accelerator v4-32 \
#       --bucket gs://my-bucket --config configs/imagenet_mcl.py:arch=resnet18,peers=2 \
#       --workdir gs://my-bucket/runs/imagenet_mcl_r18x2
#
# Data: ImageNet prepared once as ArrayRecord under gs://BUCKET/tfds (TFDS_DATA_DIR on every
# worker). Checkpoints and metrics go to --workdir (a bucket: every worker must see it). Re-running
# the same command (without --create) resumes after a preemption.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CREATE=0 TPU='' ZONE='' PROJECT='' ACCEL='v4-32' VERSION='tpu-ubuntu2204-base' BUCKET=''
CONFIG='' WORKDIR='' REMOTE_DIR='mcl_jax'
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --create) CREATE=1; shift ;;
    --tpu) TPU=${2:?}; shift 2 ;;
    --zone) ZONE=${2:?}; shift 2 ;;
    --project) PROJECT=${2:?}; shift 2 ;;
    --accelerator) ACCEL=${2:?}; shift 2 ;;
    --version) VERSION=${2:?}; shift 2 ;;
    --bucket) BUCKET=${2%/}; shift 2 ;;
    --config) CONFIG=${2:?}; shift 2 ;;
    --workdir) WORKDIR=${2:?}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" && -n "$BUCKET" && -n "$CONFIG" && -n "$WORKDIR" ]] ||
  die "--tpu, --zone, --bucket, --config and --workdir are required (see --help)"
[[ "$BUCKET" == gs://* ]] || die "--bucket must be a gs:// bucket, got $BUCKET"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TFDS_DATA_DIR="$BUCKET/tfds"
EXTRA_Q=''
for word in "${EXTRA[@]+"${EXTRA[@]}"}"; do EXTRA_Q+=" $(quote "$word")"; done
REMOTE_CMD="cd ~/$REMOTE_DIR && TFDS_DATA_DIR=$TFDS_DATA_DIR MCL_JAX_DISTRIBUTED=1 python3 -m mcl_jax.main --config $(quote "$CONFIG") --workdir $(quote "$WORKDIR") --config.data.data_dir=$TFDS_DATA_DIR$EXTRA_Q"

echo "# plan: TPU $TPU ($ACCEL) in $ZONE; one process per worker; data $TFDS_DATA_DIR; workdir $WORKDIR"
if [[ "$CREATE" == 1 ]]; then
  plan "${GCLOUD[@]}" create "$TPU" "${WHERE[@]}" --accelerator-type "$ACCEL" --version "$VERSION"
fi
plan "${GCLOUD[@]}" scp --recurse "$REPO" "$TPU:~/$REMOTE_DIR" "${WHERE[@]}" --worker=all
plan "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all \
  --command "pip install -U 'jax[tpu]' && pip install -e ~/$REMOTE_DIR"
plan "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command "$REMOTE_CMD"
