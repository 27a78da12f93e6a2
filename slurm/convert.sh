#!/usr/bin/env bash
# Export a training checkpoint (any TP x PP layout, any ZeRO stage) to one safetensors folder for
# sampling: esolm-convert export, one process on one node (no GPU needed).
#
#   sbatch slurm/convert.sh                        # from the repository root; log: slurm/logs/esolm-convert-JOBID.out
#   ESOLM_RUN_DIR=runs/1b ESOLM_CONVERT_ARGS="--ema --dtype bf16 --verify" sbatch slurm/convert.sh
#
# Environment (optional; defaults in brackets; also slurm/common.sh):
#   ESOLM_RUN_DIR       the training run [$ESOLM_HOME/runs/1b]
#   ESOLM_CHECKPOINT    a step_* folder or a `latest` pointer [$ESOLM_RUN_DIR/checkpoints/latest]
#   ESOLM_EXPORT_DIR    the export folder to write [$ESOLM_HOME/exports/<run dir name>]
#   ESOLM_CONVERT_ARGS  more esolm-convert export options: --ema --dtype bf16 --verify --overwrite [none]
#
#SBATCH --job-name=esolm-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=02:00:00
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
ESOLM_DEVICE=${ESOLM_DEVICE:-cpu}  # the export reads and writes on CPU
# shellcheck source=slurm/common.sh
source "$ESOLM_HOME/slurm/common.sh"

ESOLM_RUN_DIR=${ESOLM_RUN_DIR:-$ESOLM_HOME/runs/1b}
ESOLM_CHECKPOINT=${ESOLM_CHECKPOINT:-$ESOLM_RUN_DIR/checkpoints/latest}
ESOLM_EXPORT_DIR=${ESOLM_EXPORT_DIR:-$ESOLM_HOME/exports/$(basename "$ESOLM_RUN_DIR")}
read -r -a CONVERT_ARGS <<< "${ESOLM_CONVERT_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

COMMAND=("$ESOLM_PYTHON" -m esolm_dist.convert_cli export --checkpoint "$ESOLM_CHECKPOINT" --out "$ESOLM_EXPORT_DIR"
         "${CONVERT_ARGS[@]}")
esolm_log "${COMMAND[*]}"
srun --ntasks=1 "${COMMAND[@]}"
rc=$?
esolm_log "esolm-convert exited with $rc"
exit "$rc"
