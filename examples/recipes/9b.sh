# The paper's 9B MoE model (Table 5): 9.18B parameters, 1.66B active; 105B tokens.
# Sourced by run.sh (examples/recipes/run.sh 9b); defines MODEL_ARGS, TOKENIZER_ARGS, TRAIN_ARGS.
NUM_LAYERS=18 HIDDEN=1920 HEADS=24 NUM_EXPERTS=64 EXPERT_FFN=1280
LR=5.9e-4 GLOBAL_BATCH=512 TOKENS=105000000000
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
