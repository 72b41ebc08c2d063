#!/usr/bin/env bash
# Runs a command in the mhc_megatron image with NVIDIA's recommended flags for PyTorch (all GPUs,
# the host's IPC namespace for shared memory, unlimited locked memory, a 64 MiB stack), the
# checkout's runs/ mounted at the project's runs/ and, if given, a data directory at /data
# (read-only).
#
#   examples/docker/run.sh                                   # the tiny CPU example (the default)
#   examples/docker/run.sh bash                              # a shell
#   DATA_DIR=/mnt/corpus DATA_PATH=/data/corpus_text_document VARIANT=hc \
#       examples/docker/run.sh examples/recipes/run.sh 3b
#
# Environment: IMAGE (default mhc-megatron:latest), RUNS_DIR (default the checkout's runs/),
# DATA_DIR (a host directory for /data), HF_HOME (a host Hugging Face cache, for tokenizers),
# GPUS (default all; set it empty on a machine without GPUs). VARIANT, DATA_PATH, OUT_DIR,
# NPROC_PER_NODE, NPROC, TRAIN_ITERS, CPU, MOCK_DATA and TOKENIZER_MODEL are passed through:
# paths in them are paths inside the container.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-mhc-megatron:latest}"
RUNS_DIR="${RUNS_DIR:-$ROOT/runs}"
PROJECT=/workspace/mhc_megatron  # the Dockerfile's WORKDIR
mkdir -p "$RUNS_DIR"

args=(--rm --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
      -v "$(cd "$RUNS_DIR" && pwd):$PROJECT/runs")
if [[ -n "${GPUS-all}" ]]; then args+=(--gpus "${GPUS-all}"); fi
if [[ -n "${DATA_DIR:-}" ]]; then args+=(-v "$(cd "$DATA_DIR" && pwd):/data:ro"); fi
if [[ -n "${HF_HOME:-}" ]]; then args+=(-v "$HF_HOME:/hf-cache" -e HF_HOME=/hf-cache); fi
if [[ -t 0 && -t 1 ]]; then args+=(-it); fi
for name in VARIANT DATA_PATH OUT_DIR NPROC_PER_NODE NPROC TRAIN_ITERS CPU MOCK_DATA \
            TOKENIZER_MODEL; do
  if [[ -n "${!name:-}" ]]; then args+=(-e "$name"); fi
done

exec docker run "${args[@]}" "$IMAGE" "$@"
