"""pretrain_mhc.py, plus a check before every micro-batch that the mHC parameters are identical
on every tensor-parallel rank.

The mHC parameters are replicated over tensor parallelism. Without sequence parallelism every TP
rank sees the same tokens and computes the same gradients; with it each rank sees different
tokens, and only the sum over the TP group (Megatron reduces parameters tagged
``sequence_parallel``) keeps the copies equal. A missing or doubled reduction shows up here as a
non-zero difference after the first optimizer step.

Each check prints, on TP rank 0 of every pipeline stage, one line
``mhc tp replicas: <tensors> tensors on <ranks> ranks, max |difference| <value>``.
"""

import functools
import sys

from mhc_megatron.training.cpu import enable_cpu_mode

MHC_PARAMETER_MARKERS = ("hyper_connection.", "final_layernorm.head_")


def _check_tensor_parallel_replicas(model) -> None:
    import torch
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    params = [
        p.detach().reshape(-1).float()
        for name, p in model.named_parameters()
        if any(marker in name for marker in MHC_PARAMETER_MARKERS)
    ]
    if not params:
        return
    flat = torch.cat(params)
    gathered = [torch.empty_like(flat) for _ in range(group.size())]
    torch.distributed.all_gather(gathered, flat, group=group)
    difference = max((copy - gathered[0]).abs().max().item() for copy in gathered)
    if group.rank() == 0:
        print(
            f"mhc tp replicas: {len(params)} tensors on {group.size()} ranks, "
            f"max |difference| {difference:.3e}",
            flush=True,
        )


def main() -> None:
    if "--cpu" in sys.argv:
        enable_cpu_mode()
    import pretrain_mhc
    from mhc_megatron.training import gpt_step

    forward_step = gpt_step.forward_step

    @functools.wraps(forward_step)
    def forward_step_checking_replicas(data_iterator, model, *args, **kwargs):
        _check_tensor_parallel_replicas(model)
        return forward_step(data_iterator, model, *args, **kwargs)

    gpt_step.forward_step = forward_step_checking_replicas
    pretrain_mhc.main()


if __name__ == "__main__":
    main()
