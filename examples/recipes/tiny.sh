# A tiny model of the paper recipes' shape for CPU runs and tests: MLA, one leading dense layer,
# then MoE layers with 8 routed experts (2 active) + 1 shared, the step LR schedule, loss-free
# balancing, n = 4 streams. Byte-level vocabulary (257: tools/preprocess_data.py's ByteLevel
# tokenizer, or --mock-data). Sourced by run.sh; defines MODEL_ARGS,
# TOKENIZER_ARGS and TRAIN_ARGS.
: "${VARIANT:=mhc}"
: "${TP:=1}" "${PP:=1}" "${EP:=1}"
: "${TRAIN_ITERS:=200}"
MODEL_ARGS=(
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 192
  --multi-latent-attention --kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8
  --v-head-dim 16 --rope-type rope --rotary-base 10000 --position-embedding-type rope
  --seq-length 128 --max-position-embeddings 128
  --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 32
  --moe-shared-expert-intermediate-size 32 --moe-layer-freq "([0]*1+[1]*3)"
  --moe-router-score-function sigmoid --moe-router-enable-expert-bias
  --moe-router-bias-update-rate 1e-3 --moe-router-load-balancing-type none
  --moe-token-dispatcher-type alltoall
  --mhc-variant "$VARIANT" --mhc-num-streams 4 --mhc-sinkhorn-iters 20 --mhc-gating-init 0.01
  --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
)
VOCAB_SIZE=257
TOKENIZER_ARGS=(--tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
TRAIN_ARGS=(
  --micro-batch-size 4 --train-iters "$TRAIN_ITERS"
  --lr 3e-3 --min-lr 3e-3 --lr-warmup-iters 10 --lr-decay-style constant
  --lr-step-decay-fractions 0.8 0.9 --lr-step-decay-factors 0.316 0.1
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP"
  --save-interval 50 --eval-interval 50 --eval-iters 2 --log-interval 5
)
if (( TP > 1 )); then TRAIN_ARGS+=(--sequence-parallel); fi
