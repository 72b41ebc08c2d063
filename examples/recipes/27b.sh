# The paper's 27B MoE model (Table 5): 27.0B parameters, 4.14B active; 262B tokens.
# Sourced by run.sh (examples/recipes/run.sh 27b); defines MODEL_ARGS, TOKENIZER_ARGS, TRAIN_ARGS.
# Default parallelism: EP 8 within a node and PP 2, a starting point that has not been measured
# (no multi-GPU machine was available); override with TP, PP, EP.
: "${PP:=2}"
NUM_LAYERS=30 HIDDEN=2560 HEADS=32 NUM_EXPERTS=72 EXPERT_FFN=1536
LR=4.0e-4 GLOBAL_BATCH=1280 TOKENS=262000000000
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
