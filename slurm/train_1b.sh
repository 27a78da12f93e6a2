#!/usr/bin/env bash
# Train the ~1B Eso-LM (configs/1b.yaml: TP=2, PP=2, ZeRO-1, bf16) on 4 nodes x 8 GPUs.
#
#   sbatch slurm/train_1b.sh                       # from the repository root; log: slurm/logs/esolm-1b-JOBID.out
#
# Launch: one srun task per GPU (8 per node) running `python -m esolm_dist.train` directly, no
# torchrun: each task takes its rank from SLURM_PROCID and its GPU from SLURM_LOCALID and meets
# the others at MASTER_ADDR:MASTER_PORT (the first node of the job; the port from the job id).
# SLURM starts and stops every process itself, so its signals reach the training processes
# with nothing in between (torchrun's agent does not forward SIGUSR1 and SIGKILLs its workers
# 30 s after a SIGTERM, which is shorter than a 1B checkpoint save).
#
# Stopping and continuing: 10 minutes before the time limit SLURM sends SIGUSR1 to this batch
# shell (--signal=B:USR1@600; `scancel -b --signal=USR1 JOBID` does the same by hand). The trap
# forwards it through srun to every training process, which finish their step, save a
# checkpoint and exit 0; the script then runs `scontrol requeue`, and the requeued job
# (SLURM_RESTART_COUNT=1, 2, ...) resumes from RUN_DIR/checkpoints/latest and continues the
# same MLflow run. A job that had already finished is not requeued.
#
# Environment (optional; defaults in brackets; also slurm/common.sh):
#   ESOLM_CONFIG     run config [configs/1b.yaml; configs/quickstart.yaml with ESOLM_DEVICE=cpu]
#   ESOLM_RUN_DIR    checkpoints + config.yaml, on a filesystem every node sees [$ESOLM_HOME/runs/<config name>]
#   MLFLOW_TRACKING_URI  [sqlite:///$ESOLM_HOME/runs/mlflow.db]
#   ESOLM_OVERRIDES  extra "section.key=value ..." for esolm-train, applied last [none]
#   ESOLM_DEVICE     gpu | cpu [gpu]; cpu adds parallel.device=cpu parallel.backend=gloo
#   ESOLM_SRUN_ARGS  extra srun options [none]
#   MASTER_PORT      rendezvous port [20000 + job id mod 20000]
#   ESOLM_STOP_RESEND_S  repeat a stop signal every N s until a checkpoint is saved [30]
#
# The same script on CPU (the quickstart on gloo, 2 nodes x 1 process):
#   ESOLM_DEVICE=cpu ESOLM_OVERRIDES="train.max_steps=50" \
#     sbatch -N 2 --ntasks-per-node=1 --gpus-per-node=0 slurm/train_1b.sh
#
#SBATCH --job-name=esolm-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail

# The repository: sbatch runs a spooled copy of this script, so ask SLURM where the original is.
if [ -z "${ESOLM_HOME:-}" ]; then
  submitted=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | grep -o ' Command=[^ ]*' | cut -d= -f2-)
  if [ -n "$submitted" ] && [ -f "$(dirname "$submitted")/common.sh" ]; then
    ESOLM_HOME=$(cd "$(dirname "$submitted")/.." && pwd)
  else
    ESOLM_HOME=$SLURM_SUBMIT_DIR
  fi
fi
# shellcheck source=slurm/common.sh
source "$ESOLM_HOME/slurm/common.sh"

# ---- what to train ---------------------------------------------------------------------------------
if [ "$ESOLM_DEVICE" = cpu ]; then
  ESOLM_CONFIG=${ESOLM_CONFIG:-configs/quickstart.yaml}
  DEVICE_OVERRIDES=(parallel.device=cpu parallel.backend=gloo)
else
  ESOLM_CONFIG=${ESOLM_CONFIG:-configs/1b.yaml}
  DEVICE_OVERRIDES=()
fi
[ -f "$ESOLM_CONFIG" ] || esolm_die "ESOLM_CONFIG=$ESOLM_CONFIG does not exist (relative to $ESOLM_HOME)"
config_name=$(basename "$ESOLM_CONFIG"); config_name=${config_name%.*}
ESOLM_RUN_DIR=${ESOLM_RUN_DIR:-$ESOLM_HOME/runs/$config_name}
read -r -a USER_OVERRIDES <<< "${ESOLM_OVERRIDES:-}"
read -r -a SRUN_EXTRA <<< "${ESOLM_SRUN_ARGS:-}"

# Fail now, not after hours: every checkpoint goes to RUN_DIR/checkpoints (each rank checks again).
checkpoints=$ESOLM_RUN_DIR/checkpoints
probe=$checkpoints/.write_probe_$SLURM_JOB_ID
if ! { mkdir -p "$checkpoints" && : > "$probe" && rm -f "$probe"; } 2>/dev/null; then
  esolm_die "checkpoint directory $checkpoints is not writable; set ESOLM_RUN_DIR to a writable folder that every node sees"
fi

# ---- rendezvous ------------------------------------------------------------------------------------
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if getent hosts "$first_node" >/dev/null 2>&1; then
  MASTER_ADDR=$first_node
else  # the node name does not resolve: use the address SLURM itself reaches the node at
  MASTER_ADDR=$(scontrol show node "$first_node" -o | grep -o ' NodeAddr=[^ ]*' | cut -d= -f2)
fi
# From the job id (fixed ports collide between jobs sharing a node), moved on each restart.
MASTER_PORT=${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID + 101 * ${SLURM_RESTART_COUNT:-0}) % 20000 ))}
export MASTER_ADDR MASTER_PORT
cpus_per_task=$(esolm_cpus_per_task)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}

# ---- stop signal: checkpoint, then requeue -----------------------------------------------------------
# The training processes start with SIGUSR1 ignored (the `trap '' USR1; exec` wrapper below: an
# ignored signal stays ignored across exec) until esolm-train installs its handler, so an early
# signal cannot kill a process half-way through its start-up (a half-built JIT extension leaves a
# lock that hangs every later run). Before its trap is set a task would still die of the signal,
# so each task then writes a file into $launch_dir, and nothing is forwarded until every task has.
# An ignored signal is lost, so the trap repeats it every ESOLM_STOP_RESEND_S seconds until a new
# checkpoint appears; it stops repeating then, because a signal that lands while Python shuts
# down (handlers already reset) would kill the process.
launch_dir=$ESOLM_RUN_DIR/.launch/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
if ! { rm -rf "$launch_dir" && mkdir -p "$launch_dir"; }; then esolm_die "cannot create $launch_dir"; fi
export ESOLM_LAUNCH_DIR=$launch_dir
stop_signal=""
srun_pid=""
resender_pid=""
latest_tag() { cat "$checkpoints/latest" 2>/dev/null; }
tasks_ready() { [ "$(find "$launch_dir" -type f | wc -l)" -ge "$SLURM_NTASKS" ]; }
forward_stop() {
  [ -n "$srun_pid" ] && [ -z "$resender_pid" ] || return 0
  local before; before=$(latest_tag)
  ( resend_s=${ESOLM_STOP_RESEND_S:-30}; sent_at=""
    while [ "$(latest_tag)" = "$before" ]; do
      if tasks_ready && { [ -z "$sent_at" ] || [ $(( SECONDS - sent_at )) -ge "$resend_s" ]; }; then
        kill -USR1 "$srun_pid" 2>/dev/null || break  # srun forwards it to every task of the step
        sent_at=$SECONDS
      fi
      sleep 1
    done ) &
  resender_pid=$!
}
# shellcheck disable=SC2317  # called by the trap
on_stop_signal() {
  stop_signal=USR1
  esolm_log "SIGUSR1: asking every training process to finish its step and save a checkpoint"
  forward_stop
}
trap on_stop_signal USR1

run_finished() {  # true when the latest checkpoint is at its run's train.max_steps
  "$ESOLM_PYTHON" - "$checkpoints" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
try:
    meta = json.loads((root / (root / "latest").read_text().strip() / "esolm.json").read_text())
    sys.exit(0 if meta["step"] >= meta["config"]["train"]["max_steps"] else 1)
except (OSError, KeyError, ValueError):
    sys.exit(1)
PY
}

# ---- train -------------------------------------------------------------------------------------------
TRAIN=("$ESOLM_PYTHON" -m esolm_dist.train "$ESOLM_CONFIG" "${DEVICE_OVERRIDES[@]}"
       "train.run_dir=$ESOLM_RUN_DIR" "logging.mlflow_uri=$MLFLOW_TRACKING_URI" "${USER_OVERRIDES[@]}")
esolm_log "rendezvous $MASTER_ADDR:$MASTER_PORT; $SLURM_NTASKS processes, $cpus_per_task CPU(s) each; run dir $ESOLM_RUN_DIR; MLflow $MLFLOW_TRACKING_URI"
esolm_log "srun ${TRAIN[*]}"
# shellcheck disable=SC2016  # expanded by each task's own shell
srun --kill-on-bad-exit=1 --cpus-per-task="$cpus_per_task" "${SRUN_EXTRA[@]}" \
  bash -c 'trap "" USR1; : > "$ESOLM_LAUNCH_DIR/$SLURM_PROCID"; exec "$@"' esolm-train "${TRAIN[@]}" &
srun_pid=$!
if [ -n "$stop_signal" ]; then forward_stop; fi  # signalled while launching
while :; do  # a trapped signal interrupts `wait`: wait again until srun itself has exited
  wait "$srun_pid"
  rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [ -n "$resender_pid" ]; then kill "$resender_pid" 2>/dev/null; fi
rm -rf "$launch_dir"; rmdir "$ESOLM_RUN_DIR/.launch" 2>/dev/null
esolm_log "training processes exited with $rc"

if [ -n "$stop_signal" ]; then
  if run_finished; then
    esolm_log "the run has reached train.max_steps: not requeueing"
    rc=0
  elif [ "$rc" -ne 0 ]; then
    # no clean save: requeueing could repeat the failure forever; the last good checkpoint stays
    esolm_log "not requeueing after a failed stop; resubmit to resume from $checkpoints/latest"
  else
    # logged first: SLURM may end this shell as soon as the requeue is accepted
    esolm_log "requeueing job $SLURM_JOB_ID; it resumes from $checkpoints/latest"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    esolm_log "scontrol requeue failed: resubmit this script to resume from $checkpoints/latest"
    rc=1
  fi
fi
exit "$rc"
