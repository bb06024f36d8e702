#!/usr/bin/env bash
# GPU cluster under SLURM: one process per host (each sees all its GPUs), coordinator = first host.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_multihost_slurm.sh CONFIG WORKDIR [--config.k=v ...]
#   launch/gpu_multihost_slurm.sh --dry-run CONFIG WORKDIR ...      (prints the plan; no SLURM needed)
#
# WORKDIR must be on a file system every host sees (checkpoints are written by all processes,
# metrics by process 0). Env: PORT (coordinator port, default 12355), PYTHON, TFDS_DATA_DIR.
#SBATCH --job-name=mcl_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=mcl_jax_%j.out
set -euo pipefail
source "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}/launch/_common.sh" 2>/dev/null ||
  source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,9p' "$0"; exit 0; }
[[ $# -ge 2 ]] || die "usage: sbatch $0 CONFIG WORKDIR [--config.k=v ...] (or --dry-run first)"
CONFIG=$1 WORKDIR=$2
shift 2
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  NODES=${SLURM_JOB_NUM_NODES:-?}
else
  [[ "$DRY_RUN" == 1 ]] || die "not inside a SLURM allocation; submit with sbatch (or use --dry-run)"
  HEAD='<first host of $SLURM_JOB_NODELIST>' NODES='<--nodes>'
fi
echo "# plan: $NODES hosts x 1 process (all local GPUs each), coordinator $HEAD:$PORT, workdir $WORKDIR"
# jax.distributed.initialize() takes the process count/id from SLURM and the coordinator from
# JAX_COORDINATOR_ADDRESS.
plan srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  env "JAX_COORDINATOR_ADDRESS=$HEAD:$PORT" MCL_JAX_DISTRIBUTED=1 \
  "TFDS_DATA_DIR=${TFDS_DATA_DIR:-}" \
  "$PYTHON" -m mcl_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
