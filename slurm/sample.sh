#!/usr/bin/env bash
# Draw samples from an export folder (slurm/convert.sh) with the KV-cached Eso-LM sampler on one GPU.
#
#   sbatch slurm/sample.sh                         # from the repository root; log: slurm/logs/esolm-sample-JOBID.out
#   ESOLM_EXPORT_DIR=exports/1b ESOLM_SAMPLE_ARGS="--num-samples 64 --length 1024 --top-p 0.9" sbatch slurm/sample.sh
#
# Environment (optional; defaults in brackets; also slurm/common.sh):
#   ESOLM_EXPORT_DIR   the export folder [$ESOLM_HOME/exports/1b]
#   ESOLM_SAMPLE_ARGS  esolm-sample options [--num-samples 16 --length 1024]
#   ESOLM_SAMPLES_OUT  JSON lines written here [$ESOLM_EXPORT_DIR/samples-JOBID.jsonl]
#   ESOLM_DEVICE       gpu | cpu [gpu]; on a CPU-only cluster submit with --gpus=0 and ESOLM_DEVICE=cpu
#
#SBATCH --job-name=esolm-sample
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail
if [ -z "${ESOLM_HOME:-}" ]; then  # sbatch runs a spooled copy of this script: find the original
  submitted=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | grep -o ' Command=[^ ]*' | cut -d= -f2-)
  if [ -n "$submitted" ] && [ -f "$(dirname "$submitted")/common.sh" ]; then
    ESOLM_HOME=$(cd "$(dirname "$submitted")/.." && pwd)
  else
    ESOLM_HOME=$SLURM_SUBMIT_DIR
  fi
fi
# shellcheck source=slurm/common.sh
source "$ESOLM_HOME/slurm/common.sh"

ESOLM_EXPORT_DIR=${ESOLM_EXPORT_DIR:-$ESOLM_HOME/exports/1b}
ESOLM_SAMPLES_OUT=${ESOLM_SAMPLES_OUT:-$ESOLM_EXPORT_DIR/samples-$SLURM_JOB_ID.jsonl}
read -r -a SAMPLE_ARGS <<< "${ESOLM_SAMPLE_ARGS:---num-samples 16 --length 1024}"
if [ "$ESOLM_DEVICE" = gpu ]; then device=cuda; else device=cpu; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

COMMAND=("$ESOLM_PYTHON" -m esolm_dist.inference.cli --model "$ESOLM_EXPORT_DIR" --device "$device"
         --out "$ESOLM_SAMPLES_OUT" "${SAMPLE_ARGS[@]}")
esolm_log "${COMMAND[*]}"
srun --ntasks=1 "${COMMAND[@]}"
rc=$?
esolm_log "esolm-sample exited with $rc; samples in $ESOLM_SAMPLES_OUT"
exit "$rc"
