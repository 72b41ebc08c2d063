# The paper's 3B MoE model (Table 5): 2.97B parameters, 612M active; 39.3B tokens.
# Sourced by run.sh (examples/recipes/run.sh 3b); defines MODEL_ARGS, TOKENIZER_ARGS, TRAIN_ARGS.
NUM_LAYERS=12 HIDDEN=1280 HEADS=16 NUM_EXPERTS=64 EXPERT_FFN=896
LR=8.6e-4 GLOBAL_BATCH=320 TOKENS=39300000000
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
