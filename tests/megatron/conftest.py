"""The in-process model tests run in CPU mode on one gloo rank (Megatron's model-parallel state
of size 1). On a machine with a GPU these modules run in a child pytest instead
(``tests/e2e/test_cpu_mode_modules.py``): CPU mode refuses once CUDA is initialised."""

import pytest

from mhc_megatron.processes import init_single_rank
from mhc_megatron.training.cpu import enable_cpu_mode


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    enable_cpu_mode()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created = init_single_rank("gloo")
    model_parallel_cuda_manual_seed(123)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
