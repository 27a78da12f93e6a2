# shellcheck shell=bash
# Shared set-up for the sbatch scripts in this folder (sourced, not run). See README.md, "Cluster (SLURM)".
#
# Environment (all optional; defaults in brackets):
#   ESOLM_HOME          the repository [the folder above the submitted script, else $SLURM_SUBMIT_DIR]
#   ESOLM_PYTHON        interpreter with esolm-dist installed [$ESOLM_HOME/.venv/bin/python, else python3]
#   ESOLM_DEVICE        gpu | cpu [gpu]; cpu = gloo on CPU, the quickstart config (for a CPU-only test)
#   MLFLOW_TRACKING_URI where runs are logged [sqlite:///$ESOLM_HOME/runs/mlflow.db]

esolm_log() { echo "[esolm $(date '+%F %T')] $*"; }
esolm_die() { echo "[esolm $(date '+%F %T')] error: $*" >&2; exit 2; }

# ESOLM_HOME is set by the batch script before it sources this file (see esolm_home in train_1b.sh).
cd "$ESOLM_HOME" || esolm_die "ESOLM_HOME=$ESOLM_HOME does not exist on $(hostname)"
[ -d esolm_dist ] || esolm_die "ESOLM_HOME=$ESOLM_HOME is not the esolm-dist repository; submit from its root or set ESOLM_HOME"
export ESOLM_HOME

if [ -z "${ESOLM_PYTHON:-}" ]; then
  if [ -x "$ESOLM_HOME/.venv/bin/python" ]; then ESOLM_PYTHON=$ESOLM_HOME/.venv/bin/python; else ESOLM_PYTHON=python3; fi
fi
export ESOLM_PYTHON

ESOLM_DEVICE=${ESOLM_DEVICE:-gpu}
case "$ESOLM_DEVICE" in
  gpu|cpu) ;;
  *) esolm_die "ESOLM_DEVICE=$ESOLM_DEVICE: use gpu or cpu" ;;
esac
export ESOLM_DEVICE
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$ESOLM_HOME/runs/mlflow.db}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # log lines appear as they happen; tracebacks on hangs
if [ "$ESOLM_DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu; fi

# CPUs for each task of a job step: the node's share for one task (srun does not inherit
# sbatch's --cpus-per-task since SLURM 22.05).
esolm_cpus_per_task() {
  local cpus=${SLURM_CPUS_ON_NODE:-1} tasks=${SLURM_NTASKS_PER_NODE:-1}
  tasks=${tasks%%(*}  # "8(x4)" -> 8
  local n=$(( cpus / (tasks > 0 ? tasks : 1) ))
  echo $(( n > 0 ? n : 1 ))
}

esolm_log "job ${SLURM_JOB_ID:-?} ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
          "${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-1} task(s); device $ESOLM_DEVICE; home $ESOLM_HOME"

# NCCL for multi-node GPU jobs; every value can be overridden from the environment at submission.
if [ "$ESOLM_DEVICE" = gpu ]; then
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # a failed or timed-out collective aborts the job (then SLURM ends it) instead of hanging it
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # dump the collective trace of every rank when a collective times out
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  # megatron-core's tensor-parallel overlap assumes one hardware queue per device
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # InfiniBand: retry longer before failing a link (2^22 x 4 us ~ 17 s), as large jobs see transient errors
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  # Site specific, set at submission when needed: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the
  # bootstrap interface, e.g. ib0 or eth0), NCCL_IB_HCA (which HCAs), NCCL_NET_GDR_LEVEL.
fi
