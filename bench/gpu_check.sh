#!/usr/bin/env bash
# make gpu-check: the demo job for 10 steps on CUDA with the official vLLM, then its throughput
# and latencies. Prepared without a GPU; meant to run as is on a Linux x86-64 box with an NVIDIA
# GPU (H100/H200) and PyPI reachable, in about 8 minutes (most of it the install, once).
#
#   make gpu-check                       # or: bash bench/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 GPU_CHECK_RUN_DIR=runs/<job> PYTHON=.venv/bin/python bash bench/gpu_check.sh
#       no GPU, no install, no job: checks the job's config with the same overrides, then runs the
#       same report on an existing (e.g. CPU) run directory.
#
# One GPU: learner and rollout worker share it (num_gpus 0.5 each; vLLM limited to
# GPU_CHECK_VLLM_MEM of its memory) and weights sync over the Ray object store, because NCCL
# refuses two ranks of one group on the same device ("Duplicate GPU detected"), which is what a
# broadcast between them would be. Two or more GPUs: one each, and sync.transport=broadcast (nccl).
# GPU_CHECK_TRANSPORT overrides the transport either way.
#
# Output: the lines below on stdout, and the same in runs/gpu-check/<job>.txt (nvidia-smi,
# versions, the overrides, the report); the whole log in runs/gpu-check/<job>.log, the actors'
# logs in runs/<job>/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
STEPS=${GPU_CHECK_STEPS:-10}
HELDOUT_LIMIT=${GPU_CHECK_HELDOUT_LIMIT:-100}  # held-out items, evaluated before step 1 and after the last
VLLM_MEM=${GPU_CHECK_VLLM_MEM:-0.4}           # rollout.vllm_gpu_memory_utilization
RUN_TIMEOUT_S=${GPU_CHECK_RUN_TIMEOUT_S:-360}  # the job itself; a hang fails the check instead
JOB=${GPU_CHECK_JOB:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
OUT_DIR=runs/gpu-check
RESULTS=$OUT_DIR/$JOB.txt

die() {
  echo "gpu-check: FAILED: $*" >&2
  exit 1
}

mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/$JOB.log") 2>&1
record() { tee -a "$RESULTS"; }  # a section of the results file, echoed

echo "== gpu-check $JOB ($(date -u +%FT%TZ), $(uname -n))" | record

# ---- the GPU, before spending minutes on an install
if [ "$DRY_RUN" = 1 ]; then
  PY=${PYTHON:-python3}
  GPUS=${GPU_CHECK_GPUS:-1}
  echo "dry run: no GPU check, no install, no job; $GPUS GPU(s) assumed" | record
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU and its driver"
  nvidia-smi >/dev/null || die "nvidia-smi fails: no usable NVIDIA GPU/driver"
  { echo "-- nvidia-smi"; nvidia-smi; } | record
  GPUS=$(nvidia-smi -L | grep -c '^GPU ' || true)
  [ "$GPUS" -ge 1 ] || die "nvidia-smi lists no GPU"

  # ---- install (idempotent: a finished $VENV is reused)
  deploy/install_gpu.sh "$VENV"
  PY=$VENV/bin/python
  "$PY" - <<'PYEOF' || die "no CUDA device for torch in $VENV (above)"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch.cuda.is_available() is false: torch {torch.__version__}, CUDA build {torch.version.cuda}")
PYEOF
  { echo "-- versions"; "$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)})")
for name in ("vllm", "deepspeed", "transformers", "ray", "peft"):
    print(f"{name} {md.version(name)}")
PYEOF
  } | record
  "$VENV/bin/rft" prepare-model
fi

# ---- the job's placement on this box
if [ "$GPUS" -ge 2 ]; then
  SHARE=1 TRANSPORT=${GPU_CHECK_TRANSPORT:-broadcast}
else
  SHARE=0.5 TRANSPORT=${GPU_CHECK_TRANSPORT:-object_store}
fi
OVERRIDES=(
  "name=$JOB"
  "steps=$STEPS"
  "rollout.engine=vllm"
  "rollout.num_gpus_per_worker=$SHARE"
  "rollout.vllm_gpu_memory_utilization=$VLLM_MEM"
  "learner.num_gpus=$SHARE"
  "sync.transport=$TRANSPORT"
  "data.heldout_limit=$HELDOUT_LIMIT"
  "eval.every_steps=$STEPS"        # held-out eval only before step 1 and after the last
  "checkpoint.every_steps=$STEPS"  # one checkpoint, at the end
  "metrics.port=0"                 # any free port: another job may hold 9400
  "learner.num_ranks=1"            # the learner group on one GPU (nccl)
)
{ echo "-- job: examples/arithmetic.yaml on $GPUS GPU(s), transport $TRANSPORT"; printf '  -o %s\n' "${OVERRIDES[@]}"; } | record

# The overrides must name real fields before anything is spent on them (the same check as rft run's).
PYTHONPATH=. "$PY" - examples/arithmetic.yaml "${OVERRIDES[@]}" <<'PYEOF' || die "the job's config does not validate (above)"
import sys
from services.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
print(f"config ok: {cfg.name}, {cfg.steps} steps, run dir {cfg.run_dir}")
PYEOF

if [ "$DRY_RUN" = 1 ]; then
  RUN_DIR=${GPU_CHECK_RUN_DIR:?dry run: set GPU_CHECK_RUN_DIR to an existing run directory (runs/<job>)}
else
  RUN_DIR=runs/$JOB
  override_args=()
  for o in "${OVERRIDES[@]}"; do override_args+=(-o "$o"); done
  SECONDS=0
  HF_HUB_OFFLINE=1 timeout "$RUN_TIMEOUT_S" "$VENV/bin/rft" run examples/arithmetic.yaml "${override_args[@]}" \
    || die "rft run failed or passed ${RUN_TIMEOUT_S}s (exit $?); see $OUT_DIR/$JOB.log and $RUN_DIR/logs/"
  echo "job wall time: ${SECONDS}s" | record
fi

# ---- the numbers
echo "-- report (transport $TRANSPORT)" | record
PYTHONPATH=. "$PY" bench/gpu_check_report.py "$RUN_DIR" --output "$RESULTS" \
  || die "no report from $RUN_DIR (above)"
echo "gpu-check: results in $RESULTS"
