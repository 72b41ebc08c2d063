"""The warnings every run without TransformerEngine or Apex prints, hidden and explained once.

Megatron-Core 0.19.2 warns at import, once per module, that TransformerEngine and Apex are
missing and which torch fallback it uses instead (about 25 lines per rank before the first
iteration); it also logs its own deprecations. None of them asks the user to do anything: the
fallbacks are what this project runs without TE/Apex (the CPU mode, pip installs), and the
deprecations are Megatron's to resolve. :func:`install` hides exactly these messages (each
matched by its start) and prints one line that says so; ``MHC_SHOW_KNOWN_WARNINGS=1`` shows
them again. Any other warning is untouched.
"""

import logging
import os
import re
import warnings

SHOW_ENV = "MHC_SHOW_KNOWN_WARNINGS"

# Python warnings (warnings.warn): the start of the message, and why it is harmless.
KNOWN_WARNINGS = {
    "Transformer Engine and Apex are not installed": "Megatron's torch fallbacks run instead",
    "Apex is not installed": "torch's norms run instead of Apex's",
    "Only transformer-engine>=1.7.0 supports MoE experts": "local expert linears without TE",
    "MimoModelConfig is experimental": "imported by Megatron, not used here",
    "`torch.distributed.all_gather_into_tensor` is deprecated": "called inside Megatron",
}
# Log records: logger name -> the start of the message, and why it is harmless.
KNOWN_LOG_RECORDS = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED", "Megatron's notice"),
    "megatron.core.dist_checkpointing.strategies.torch": (
        "MCore's async save is deprecated",
        "Megatron's notice, at each save",
    ),
    "torch.utils.cpp_extension": ("No CUDA runtime is found", "a CPU run"),
    "megatron.core.rerun_state_machine": (
        "RerunStateMachine initialized in mode",
        "Megatron's default result validation, as always",
    ),
}

_installed = False


class _StartsWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def install(announce: bool = True) -> bool:
    """Hides the known warnings in this process (once); returns whether it did.

    Args:
        announce: print the one line that says what is hidden (rank 0 only, read from
            ``RANK`` since no process group exists yet).
    """
    global _installed
    if _installed or os.environ.get(SHOW_ENV, "") not in ("", "0"):
        return False
    for start in KNOWN_WARNINGS:
        # `message` is a regex matched at the start of the text.
        warnings.filterwarnings("ignore", message=re.escape(start))
    for name, (start, _) in KNOWN_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_StartsWith(start))
    _installed = True
    if announce and os.environ.get("RANK", "0") == "0":
        print(
            "> hidden: Megatron's known warnings without TransformerEngine/Apex (its torch "
            "fallbacks run instead) and its deprecation notices; "
            f"{SHOW_ENV}=1 shows them (mhc_megatron/training/known_warnings.py). Megatron's "
            "'one_logger package is required' line is about NVIDIA's telemetry: harmless.",
            flush=True,
        )
    return True
