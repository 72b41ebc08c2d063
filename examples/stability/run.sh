#!/usr/bin/env bash
# The mHC paper's stability comparison (section 3.1) at CPU scale: deep, narrow GPTs trained from
# the same seed with plain residuals, Hyper-Connections (HC, unconstrained H_res) and mHC
# (Sinkhorn H_res), then tools/stability_report.py on their checkpoints. See README.md here for
# the numbers this gives.
#
# Environment (defaults in brackets):
#   VARIANTS   variants to train, in this order ["residual hc mhc"]; mhc-lite works too
#   LAYERS [24]  HIDDEN [64]  HEADS [4]  STREAMS [4]  SEQ [64]  MBS [4] (micro = global batch)
#   ITERS [200]  LR [3e-3]  WARMUP [10]  INIT [paper]  GATING [0.01]  SEED [1234]
#   MOE [0]    1: a small MoE (4 experts, top-2, every layer but the first)
#   BATCHES [8]  batches of MBS sequences the report averages over
#   JOBS [1]   checkpoints the report measures at a time (one process each)
#   OUT_DIR [runs/stability]  per variant VARIANT/{checkpoints,tensorboard,train.log}; report/
#   PYTHON     interpreter (default .venv/bin/python if present, else python3)
#   MASTER_PORT  rendezvous port (default: a free one)
# Extra arguments go to pretrain_mhc.py for every variant (after the script's own, so they win).
# Running it again with the same OUT_DIR resumes the trainings (a finished one is only re-measured).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${VARIANTS:=residual hc mhc}" "${LAYERS:=24}" "${HIDDEN:=64}" "${HEADS:=4}" "${STREAMS:=4}"
: "${SEQ:=64}" "${MBS:=4}" "${ITERS:=200}" "${LR:=3e-3}" "${WARMUP:=10}" "${INIT:=paper}"
: "${GATING:=0.01}" "${SEED:=1234}" "${MOE:=0}" "${BATCHES:=8}" "${JOBS:=1}"
OUT_DIR="${OUT_DIR:-$ROOT/runs/stability}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUT_DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

# 1. Data: the standard library's top-level modules, byte-level (as examples/tiny; no download).
DATA_PREFIX="$OUT_DIR/data/stdlib"
"$ROOT/tools/stdlib_corpus.sh" "$OUT_DIR/data" "$PYTHON"

# 2. Train each variant from the same seed (same data order, same initial branch weights).
MODEL_ARGS=(
  --num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --ffn-hidden-size $((2 * HIDDEN)) --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  --position-embedding-type rope --normalization RMSNorm --swiglu
  --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
  --init-method-std 0.02 --mhc-num-streams "$STREAMS" --mhc-init "$INIT"
  --mhc-gating-init "$GATING"
)
if [[ "$MOE" == 1 ]]; then
  MODEL_ARGS+=(
    --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size "$HIDDEN"
    --moe-layer-freq "([0]*1+[1]*$((LAYERS - 1)))" --moe-token-dispatcher-type alltoall
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
  )
fi
# --cpu implies the local modules and no GPU fusions (mhc_megatron/training/cpu_settings.py).
CPU_ARGS=(--cpu --disable-bias-linear)
TRAIN_ARGS=(
  --micro-batch-size "$MBS" --global-batch-size "$MBS" --train-iters "$ITERS"
  --lr "$LR" --min-lr "$LR" --lr-warmup-iters "$WARMUP" --lr-decay-style constant
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
  --data-path "${DATA_PREFIX}_text_document" --split "100,0,0"
  --tokenizer-type NullTokenizer --vocab-size 257
  --eval-iters 0 --eval-interval "$ITERS" --log-interval 10 --seed "$SEED"
  --ckpt-format torch_dist --save-interval "$ITERS"
  --mhc-diagnostics-interval $(( ITERS >= 4 ? ITERS / 4 : 1 ))
)
RUNS=()
for VARIANT in $VARIANTS; do
  RUN="$OUT_DIR/$VARIANT"
  mkdir -p "$RUN"
  echo "== training $VARIANT: $LAYERS layers, hidden $HIDDEN, $ITERS iterations, lr $LR ($RUN/train.log)"
  start=$SECONDS
  # MHC_LOG_FILE: pretrain_mhc.py's last line names the log. A free port unless MASTER_PORT is set.
  MHC_LOG_FILE="$RUN/train.log" "$PYTHON" -m torch.distributed.run --nproc-per-node 1 \
    --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-$("$PYTHON" "$ROOT/mhc_megatron/processes.py" free-port)}" \
    "$ROOT/pretrain_mhc.py" \
    "${CPU_ARGS[@]}" "${MODEL_ARGS[@]}" --mhc-variant "$VARIANT" "${TRAIN_ARGS[@]}" \
    --save "$RUN/checkpoints" --load "$RUN/checkpoints" --tensorboard-dir "$RUN/tensorboard" \
    "$@" > "$RUN/train.log" 2>&1 || { tail -n 30 "$RUN/train.log"; exit 1; }
  grep -E "mHC stability|iteration +$ITERS/" "$RUN/train.log" | sed 's/ | consumed.*lm loss/ lm loss/; s/ | loss scale.*//' || true
  echo "   $VARIANT trained in $((SECONDS - start)) s"
  RUNS+=(--run "$VARIANT=$RUN/checkpoints")
done

# 3. The report: JSON per run, stability.json and stability.png in $OUT_DIR/report.
start=$SECONDS
"$PYTHON" "$ROOT/tools/stability_report.py" report "${RUNS[@]}" --out-dir "$OUT_DIR/report" \
  --batches "$BATCHES" --micro-batch-size "$MBS" --jobs "$JOBS" \
  --title "amax gain, $LAYERS layers x hidden $HIDDEN, n = $STREAMS, $ITERS iterations at lr $LR"
echo "   report in $((SECONDS - start)) s"
