"""What a CPU run (``pretrain_mhc.py --cpu``) sets besides CPU mode itself, defined once.

CPU mode (``cpu.py``) makes Megatron-Core run on CPU with gloo; these settings choose what can
run there: Megatron's local modules (no apex or TransformerEngine kernels on CPU) and none of
the fusions, which are torch.compile'd GPU kernels that only cost start-up time on CPU
(``--no-bias-swiglu-fusion`` alone saves ~25 s per cold start). None changes the model's
parameters. ``--cpu`` implies them all; tests, tools and benchmarks take the flags
(:data:`CPU_FLAGS`), the TransformerConfig fields (:data:`CPU_CONFIG`) or
:func:`apply_cpu_settings` from here. No torch import: shell-facing tools read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CpuSetting:
    """One setting a CPU run needs, in its three spellings.

    Attributes:
        flags: pretrain_mhc.py's command-line flags.
        arg: the attribute of Megatron's parsed arguments they set, and its value.
        field: the TransformerConfig field it becomes, and its value.
    """

    flags: tuple[str, ...]
    arg: tuple[str, Any]
    field: tuple[str, Any]


CPU_SETTINGS = (
    CpuSetting(("--transformer-impl", "local"), ("transformer_impl", "local"),
               ("transformer_impl", "local")),
    CpuSetting(("--no-persist-layer-norm",), ("no_persist_layer_norm", True),
               ("persist_layer_norm", False)),
    CpuSetting(("--no-gradient-accumulation-fusion",), ("gradient_accumulation_fusion", False),
               ("gradient_accumulation_fusion", False)),
    CpuSetting(("--no-masked-softmax-fusion",), ("masked_softmax_fusion", False),
               ("masked_softmax_fusion", False)),
    CpuSetting(("--no-bias-dropout-fusion",), ("bias_dropout_fusion", False),
               ("bias_dropout_fusion", False)),
    CpuSetting(("--no-rope-fusion",), ("apply_rope_fusion", False),
               ("apply_rope_fusion", False)),
    CpuSetting(("--no-bias-swiglu-fusion",), ("bias_swiglu_fusion", False),
               ("bias_activation_fusion", False)),
    CpuSetting(("--no-bias-gelu-fusion",), ("bias_gelu_fusion", False),
               ("bias_activation_fusion", False)),
)  # fmt: skip
# pretrain_mhc.py's flags for a CPU run, and the TransformerConfig fields of one (tests and
# benchmarks that build a config directly).
CPU_FLAGS = ("--cpu", *(flag for setting in CPU_SETTINGS for flag in setting.flags))
CPU_CONFIG = dict(setting.field for setting in CPU_SETTINGS)


def with_cpu_flags(argv: list[str]) -> list[str]:
    """``argv`` with the CPU settings' flags inserted after the program name.

    They come first, so a flag the user gives explicitly (e.g. ``--transformer-impl``) is parsed
    after them and wins; the run then fails with that module's own message if it cannot run on
    CPU.

    Args:
        argv: ``sys.argv`` of a ``--cpu`` run.
    """
    return [argv[0], *CPU_FLAGS[1:], *argv[1:]]


def apply_cpu_settings(args) -> None:
    """Sets the CPU settings on Megatron's parsed arguments (e.g. a checkpoint's saved ones)."""
    for setting in CPU_SETTINGS:
        name, value = setting.arg
        setattr(args, name, value)
