# Sourced by the paper recipes (3b.sh, 9b.sh, 27b.sh) after they set the size variables below.
# Defines MODEL_ARGS (the architecture: what the parameter-count test builds), TOKENIZER_ARGS and
# TRAIN_ARGS (batch, optimizer, schedule, parallelism). From ../../shared/docs/mhc-spec.md section 6 and the
# paper's Table 5: MoE with one leading dense layer, 6 active + 2 shared experts, MLA attention
# (KV rank 512, head dim 128, RoPE dim 64, theta 10000), vocab 129,280, AdamW (0.9, 0.95),
# weight decay 0.1, 2000 warmup steps, LR steps to 0.316x at 80% and 0.1x at 90% of training,
# loss-free load balancing (a per-expert routing bias, no auxiliary loss).
#
# Size variables: NUM_LAYERS HIDDEN HEADS NUM_EXPERTS EXPERT_FFN LR GLOBAL_BATCH TOKENS.
# Parallelism comes from TP, PP, EP (environment, defaults below), the variant from VARIANT.

: "${VARIANT:=mhc}"
: "${TP:=1}" "${PP:=1}" "${EP:=8}"
SEQ_LENGTH=4096
VOCAB_SIZE=129280
# The dense layer's FFN has the width of the 8 experts a token reaches (6 routed + 2 shared):
# with it the model has the paper's Table 5 parameter counts (tests/e2e/test_recipes.py).
DENSE_FFN=$((8 * EXPERT_FFN))
# Tokens / (global batch x sequence): the paper's step count.
TRAIN_ITERS=$((TOKENS / (GLOBAL_BATCH * SEQ_LENGTH)))

MODEL_ARGS=(
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --ffn-hidden-size "$DENSE_FFN"
  --multi-latent-attention --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64
  --v-head-dim 128 --rope-type rope --rotary-base 10000 --position-embedding-type rope
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
  --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --num-experts "$NUM_EXPERTS" --moe-router-topk 6 --moe-ffn-hidden-size "$EXPERT_FFN"
  --moe-shared-expert-intermediate-size $((2 * EXPERT_FFN))
  --moe-layer-freq "([0]*1+[1]*$((NUM_LAYERS - 1)))"
  --moe-router-score-function sigmoid --moe-router-enable-expert-bias
  --moe-router-bias-update-rate 1e-3 --moe-router-load-balancing-type none
  --moe-token-dispatcher-type alltoall
  --mhc-variant "$VARIANT" --mhc-num-streams 4 --mhc-sinkhorn-iters 20 --mhc-gating-init 0.01
  --init-method-std 0.006
  --attention-dropout 0.0 --hidden-dropout 0.0
)
# DeepSeek-V3's tokenizer (vocab 129,280 with its reserved ids), from the Hugging Face Hub or a
# local copy named by TOKENIZER_MODEL.
TOKENIZER_ARGS=(
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER_MODEL:-deepseek-ai/DeepSeek-V3}"
)
TRAIN_ARGS=(
  --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$LR" --lr-warmup-iters 2000 --lr-decay-style constant
  --lr-step-decay-fractions 0.8 0.9 --lr-step-decay-factors 0.316 0.1
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
  --bf16 --use-distributed-optimizer
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP"
  --moe-grouped-gemm --mhc-recompute
  --save-interval 1000 --eval-interval 1000 --eval-iters 10 --log-interval 10
)
if (( TP > 1 )); then TRAIN_ARGS+=(--sequence-parallel); fi
