"""Checks and tile shapes shared by the kernel modules."""

import triton

from mhc_megatron.kernels import unsupported_num_streams


def check_num_streams(n: int) -> None:
    """Raise ValueError, saying what to change, for an n the kernels do not take."""
    problem = unsupported_num_streams(n)
    if problem:
        raise ValueError(problem)


def stream_tile(n: int, C: int, max_tile: int) -> tuple[int, int, int]:
    """``(N_PAD, BLOCK_C, num_warps)`` for an ``[n, C]`` tile of at most ``max_tile`` values."""
    # At least 2 rows: a 1-wide arange/reduction axis is the least-trodden path in Triton.
    n_pad = max(2, triton.next_power_of_2(n))
    block_c = max(16, min(triton.next_power_of_2(max(C, 1)), max_tile // n_pad))
    num_warps = 8 if n_pad * block_c >= 4096 else 4
    return n_pad, block_c, num_warps
