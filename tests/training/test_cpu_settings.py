"""``cpu_settings.py``: the one list of what ``--cpu`` implies, in its three spellings.

The flags parse to exactly the listed argument values, the config fields are TransformerConfig's,
``apply_cpu_settings`` gives the parsed values, and a flag the user passes explicitly wins.
"""

import dataclasses
import sys
from types import SimpleNamespace

from megatron.core.transformer import TransformerConfig
from megatron.training.arguments import parse_args

from mhc_megatron.training.arguments import add_mhc_args
from mhc_megatron.training.cpu_settings import (
    CPU_CONFIG,
    CPU_FLAGS,
    CPU_SETTINGS,
    apply_cpu_settings,
    with_cpu_flags,
)


def _parse(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)
    return parse_args(extra_args_provider=add_mhc_args)


def test_the_flags_parse_to_the_listed_arguments_and_an_explicit_flag_wins(monkeypatch):
    args = _parse(with_cpu_flags(["pretrain_mhc.py", "--cpu"]), monkeypatch)
    assert args.cpu
    for setting in CPU_SETTINGS:
        name, value = setting.arg
        assert getattr(args, name) == value, setting.flags
    defaults = _parse(["pretrain_mhc.py"], monkeypatch)
    assert all(getattr(defaults, s.arg[0]) != s.arg[1] for s in CPU_SETTINGS)  # each one matters
    explicit = with_cpu_flags(
        ["pretrain_mhc.py", "--cpu", "--transformer-impl", "inference_optimized"]
    )
    assert _parse(explicit, monkeypatch).transformer_impl == "inference_optimized"


def test_flags_config_fields_and_applied_arguments_agree():
    assert CPU_FLAGS[0] == "--cpu" and len(CPU_FLAGS) == 1 + sum(len(s.flags) for s in CPU_SETTINGS)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(CPU_CONFIG) <= fields
    args = SimpleNamespace()
    apply_cpu_settings(args)
    assert vars(args) == dict(s.arg for s in CPU_SETTINGS)
