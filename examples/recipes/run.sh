#!/usr/bin/env bash
# Launch a recipe on this node with torchrun: examples/recipes/run.sh RECIPE [pretrain_mhc args]
#
# RECIPE: tiny, 3b, 9b or 27b (a file RECIPE.sh next to this script). Arguments after it go to
# pretrain_mhc.py after the recipe's own, so they override them.
#
# Environment:
#   VARIANT          mhc (default), mhc-lite, hc, or residual (the baseline).
#   DATA_PATH        Megatron --data-path value(s) (tools/preprocess_data.py output prefixes).
#                    MOCK_DATA=1 trains on Megatron's mock data instead (the tiny recipe's default).
#   OUT_DIR          checkpoints, TensorBoard and logs (default runs/RECIPE-VARIANT); the output
#                    is kept in OUT_DIR/logs/train-DATE-HOST.log; a second launch with the same
#                    OUT_DIR resumes from its latest checkpoint.
#   CPU=1            run on CPU with gloo and the local (no TransformerEngine) modules.
#   NPROC_PER_NODE   ranks on this node (default: the visible GPUs, or 1 with CPU=1).
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID
#                    several nodes: every node runs this script with the same MASTER_ADDR (the
#                    first node) and RDZV_ID; torchrun's c10d rendezvous assigns the ranks.
#   TP, PP, EP       parallel sizes (defaults in the recipe).
#   PYTHON           interpreter (default .venv/bin/python if present, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RECIPE="${1:-}"
if [[ -z "$RECIPE" || ! -f "$HERE/$RECIPE.sh" || "$RECIPE" == common || "$RECIPE" == run ]]; then
  echo "usage: $0 RECIPE [pretrain_mhc.py arguments]; RECIPE is one of:" \
       "$(cd "$HERE" && ls -- *.sh | grep -v -e '^common.sh$' -e '^run.sh$' | sed 's/\.sh$//' \
          | tr '\n' ' ')" >&2
  exit 2
fi
shift
case "${VARIANT:=mhc}" in
  mhc|mhc-lite|hc|residual) ;;
  *) echo "error: VARIANT=$VARIANT; use mhc, mhc-lite, hc or residual" >&2; exit 2 ;;
esac
# shellcheck source=/dev/null
source "$HERE/$RECIPE.sh"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT_DIR="${OUT_DIR:-$ROOT/runs/$RECIPE-$VARIANT}"
mkdir -p "$OUT_DIR"

DATA_ARGS=()
if [[ -n "${DATA_PATH:-}" ]]; then
  read -r -a paths <<< "$DATA_PATH"
  DATA_ARGS=(--data-path "${paths[@]}" --split "${SPLIT:-99,1,0}")
elif [[ "${MOCK_DATA:-}" == 1 || "$RECIPE" == tiny ]]; then
  DATA_ARGS=(--mock-data)
else
  echo "error: recipe $RECIPE needs DATA_PATH (prefixes written by tools/preprocess_data.py)," \
       "or MOCK_DATA=1 to train on synthetic tokens" >&2
  exit 2
fi
# shellcheck source=../../tools/keep_log.sh
source "$ROOT/tools/keep_log.sh"
keep_log "$OUT_DIR"  # everything below also goes to $OUT_DIR/logs/train-DATE-HOST.log

DEVICE_ARGS=()
if [[ "${CPU:-}" == 1 ]]; then
  # --cpu implies the local modules and no GPU fusions (mhc_megatron/training/cpu_settings.py).
  DEVICE_ARGS=(--cpu)
  # bf16 has no CPU kernels here; --moe-grouped-gemm stays: without TransformerEngine the
  # experts run torch's grouped GEMM, which CPUs have too (mhc_megatron/megatron/experts.py).
  KEEP=(); for a in "${TRAIN_ARGS[@]}"; do
    [[ "$a" == --bf16 ]] || KEEP+=("$a")
  done; TRAIN_ARGS=("${KEEP[@]}")
  NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
fi

OUTPUT_ARGS=(
  --save "$OUT_DIR/checkpoints" --load "$OUT_DIR/checkpoints" --ckpt-format torch_dist
  --tensorboard-dir "$OUT_DIR/tensorboard" --log-timers-to-tensorboard
  --seed "${SEED:-1234}"
)

NNODES="${NNODES:-1}"
if (( NNODES > 1 )); then
  : "${MASTER_ADDR:?MASTER_ADDR (the first node) is needed with NNODES > 1}"
  LAUNCH=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
          --rdzv-id "${RDZV_ID:-mhc-$RECIPE}")
else
  # A free port unless MASTER_PORT is set: two single-node runs on one machine do not collide.
  LAUNCH=(--nnodes 1 --master-addr "${MASTER_ADDR:-127.0.0.1}"
          --master-port "${MASTER_PORT:-$("$PYTHON" "$ROOT/mhc_megatron/processes.py" free-port)}")
fi

echo "recipe $RECIPE, variant $VARIANT, $NNODES node(s) x $NPROC_PER_NODE rank(s), out $OUT_DIR"
exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  "$ROOT/pretrain_mhc.py" "${DEVICE_ARGS[@]}" "${MODEL_ARGS[@]}" "${TOKENIZER_ARGS[@]}" \
  "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
