"""Count a model's total and active parameters by building it on the meta device (no memory).

Examples:
    python tools/count_params.py --recipe 27b
    VARIANT=residual python tools/count_params.py --recipe 3b --json
    python tools/count_params.py -- --num-layers 4 --hidden-size 128 ...  (pretrain_mhc.py args)

The counting itself (and what "active" means) is in ``mhc_megatron/training/count_params.py``.
"""

from mhc_megatron.training.count_params import main

if __name__ == "__main__":
    main()
