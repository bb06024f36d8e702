#!/usr/bin/env bash
# One host, all its devices: the ('data', 'peer') mesh over the local GPUs/TPU chips/CPU.
#
#   launch/local.sh [--dry-run] [--fake-cpu-devices N] CONFIG WORKDIR [--config.key=value ...]
#
#   launch/local.sh configs/cifar100_mcl.py:peers=4 /tmp/mcl_c100 --config.mesh.peer=2
#   launch/local.sh --fake-cpu-devices 8 configs/fashion_mnist_mcl.py:smoke /tmp/fm8
#
# --fake-cpu-devices N splits the CPU into N XLA devices (tests the sharded program without
# accelerators). Running the same command again resumes from WORKDIR's latest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

FAKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --fake-cpu-devices) FAKE=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || die "usage: $0 [--dry-run] [--fake-cpu-devices N] CONFIG WORKDIR [--config.k=v ...]"
CONFIG=$1 WORKDIR=$2
shift 2
# The repository's virtualenv (README's install) unless PYTHON says otherwise: a plain `python`
# without it activated has no mcl_jax.
VENV_PYTHON="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$VENV_PYTHON" ]]; then PYTHON=$VENV_PYTHON; else PYTHON=python; fi
fi
# Transparent huge pages for large host allocations: XLA:CPU allocates its step buffers afresh on
# every step, and without them each step faults every page in again (~30% of a CPU step,
# docs/performance.md#host-memory-on-cpu). glibc reads this only at process start.
ENV=(env "GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}")
if [[ "$FAKE" -gt 0 ]]; then
  ENV+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$FAKE${XLA_FLAGS:+ $XLA_FLAGS}")
fi
echo "# plan: 1 process on this host, config $CONFIG, workdir $WORKDIR"
plan "${ENV[@]}" "$PYTHON" -m mcl_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
