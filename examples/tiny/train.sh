#!/usr/bin/env bash
# The embedded default: a tiny MoE mHC GPT (4 layers, hidden 128, 4 experts top-2, n = 4 streams)
# trained on CPU for a few hundred steps on the Python standard library's own source files
# (on every machine, no download).
#
# Environment: NPROC (ranks, default 1), TRAIN_ITERS (default 300), OUT_DIR (default runs/tiny;
# the output is also kept in $OUT_DIR/logs), PYTHON (default .venv/bin/python if present),
# MASTER_PORT (rendezvous port; default: a free one, so two runs on one machine do not
# collide). Extra arguments go to
# pretrain_mhc.py after the script's own, so Megatron flags given here override them, e.g.
#   NPROC=2 examples/tiny/train.sh --tensor-model-parallel-size 2 --sequence-parallel
# Running it again resumes from $OUT_DIR/checkpoints (any TP/PP/EP layout; a different model is
# refused). A second run on the same OUT_DIR while one is going is refused too. To extend a
# finished run: TRAIN_ITERS=600 examples/tiny/train.sh --override-opt-param-scheduler (the LR
# schedule is recomputed for the new length; the warmup fraction then applies to 600 steps).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NPROC="${NPROC:-1}"
TRAIN_ITERS="${TRAIN_ITERS:-300}"
OUT_DIR="${OUT_DIR:-$ROOT/runs/tiny}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUT_DIR"
# shellcheck source=../../tools/keep_log.sh
source "$ROOT/tools/keep_log.sh"
keep_log "$OUT_DIR"  # everything below also goes to $OUT_DIR/logs/train-DATE-HOST.log

# 1. Data: tokenize the standard library's top-level modules once (byte-level, no download).
DATA_PREFIX="$OUT_DIR/data/stdlib"
"$ROOT/tools/stdlib_corpus.sh" "$OUT_DIR/data" "$PYTHON"

# 2. Train. Byte-level tokens: NullTokenizer with vocab 257 (eod = 256).
ARGS=(
  --cpu --disable-bias-linear  # --cpu: local modules, no GPU fusions (cpu_settings.py)
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 256
  --seq-length 128 --max-position-embeddings 128 --position-embedding-type rope
  --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights
  --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 128 --moe-layer-freq "[0,1,1,1]"
  --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 1e-2
  --moe-router-load-balancing-type aux_loss
  --mhc-variant mhc --mhc-num-streams 4
  --attention-dropout 0.0 --hidden-dropout 0.0
  --micro-batch-size 4 --global-batch-size $((4 * NPROC))
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 --weight-decay 0.1
  --clip-grad 1.0 --adam-beta2 0.95 --init-method-std 0.02
  --train-iters "$TRAIN_ITERS" --eval-interval 100 --eval-iters 2 --log-interval 10
  --data-path "${DATA_PREFIX}_text_document" --split 98,2,0
  --tokenizer-type NullTokenizer --vocab-size 257
  --save "$OUT_DIR/checkpoints" --load "$OUT_DIR/checkpoints" --save-interval 100
  --ckpt-format torch_dist
  --tensorboard-dir "$OUT_DIR/tensorboard" --log-timers-to-tensorboard
  --seed 1234
)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 \
  --master-port "${MASTER_PORT:-$("$PYTHON" "$ROOT/mhc_megatron/processes.py" free-port)}" "$ROOT/pretrain_mhc.py" "${ARGS[@]}" "$@"
