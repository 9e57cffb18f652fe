# The rft image for NVIDIA GPU nodes: the set-up of deploy/install_gpu.sh (the official CUDA vLLM
# wheel, its CUDA torch, the project, the embedded model's wheel) instead of the CPU image's
# `make model`. Used by deploy/compose/gpu-2node.yml and deploy/kuberay/*-gpu-2node.yaml.
#   docker build -f deploy/gpu.Dockerfile -t rft-gpu:0.1.0 .
# The CUDA runtime comes with torch's wheels; the node provides the driver (NVIDIA container
# toolkit / device plugin).
FROM python:3.11-slim-bookworm

# g++ (with gcc): Triton, under vLLM, compiles a small launcher per kernel at run time; util-linux
# provides `unshare` for the grader sandbox.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ util-linux \
    && rm -rf /var/lib/apt/lists/*

# No DS_ACCELERATOR: DeepSpeed detects CUDA (the CPU image pins it to cpu).
ENV PIP_NO_CACHE_DIR=1 \
    RFT_CACHE_DIR=/opt/rft-cache \
    HF_HUB_OFFLINE=1 \
    PATH=/app/.venv/bin:$PATH

WORKDIR /app
COPY . /app
RUN deploy/install_gpu.sh /app/.venv && rft prepare-model

# Ray GCS, Ray dashboard / Jobs API, Ray client, the rft metrics endpoint.
EXPOSE 6379 8265 10001 9400
CMD ["rft", "--help"]
