"""Active parameter counts of a sweep's models, built on the meta device (training/count_params).

``count_active_params`` runs this module as ``python -m mhc_megatron.sweep.params``: one
subprocess for all the models missing from the cache, because Megatron keeps global state and
importing it costs seconds. The child reads ``[[recipe, variant, args], ...]`` as JSON on stdin
and prints ``ACTIVE [count, ...]`` (Megatron prints to stdout too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mhc_megatron.sweep.grid import ROOT, SweepError

# Counting parameters with one rank of everything: the grid's parallel sizes are for training.
ONE_RANK_ARGS = [
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--expert-model-parallel-size", "1", "--context-parallel-size", "1",
]  # fmt: skip
ACTIVE_PREFIX = "ACTIVE "


def count_active_params(keys: list[tuple[str, str, tuple[str, ...]]], cache: Path) -> dict:
    """Active parameters of each (recipe, variant, args), counted on the meta device.

    Args:
        keys: (recipe, variant, pretrain_mhc.py arguments) of each model.
        cache: a JSON file of the counts so far, updated with the new ones.

    Returns:
        {(recipe, variant, args): active parameter count}.

    Raises:
        SweepError: a model could not be built (the message holds the end of its output).
    """
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = sorted({json.dumps(list(key)) for key in keys} - set(known))
    if missing:
        print(f"counting the parameters of {len(missing)} model(s) on the meta device ...")
        env = {k: v for k, v in os.environ.items() if k not in ("VARIANT", "TP", "PP", "EP")}
        # The launcher variables of an enclosing torchrun/SLURM job must not leak into the
        # one-rank process group of the count.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        done = subprocess.run(
            [sys.executable, "-m", "mhc_megatron.sweep.params", *ONE_RANK_ARGS],
            input=json.dumps([json.loads(m) for m in missing]),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            check=False,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith(ACTIVE_PREFIX)), None)
        if done.returncode != 0 or line is None:
            tail = (done.stdout + done.stderr)[-2500:]
            raise SweepError(
                f"counting the parameters failed: tools/count_params.py builds each model from "
                f"its recipe's model arguments plus the run's (the grid's args, size, budget) "
                f"at parallel sizes 1; make those arguments valid on their own (parallel "
                f"sizes belong in env: TP, PP, EP). Its output:\n{tail}"
            )
        known.update(zip(missing, json.loads(line.removeprefix(ACTIVE_PREFIX)), strict=True))
        cache.write_text(json.dumps(known, indent=1) + "\n")
    return {key: known[json.dumps(list(key))] for key in keys}


def main(extra_args: list[str]) -> None:
    """The child: counts the models read from stdin, prints ``ACTIVE [count, ...]``.

    Args:
        extra_args: pretrain_mhc.py arguments appended to every model's (ONE_RANK_ARGS).
    """
    from mhc_megatron.training.count_params import (
        build_meta_model,
        count_parameters,
        recipe_args,
    )

    out = []
    for recipe, variant, args in json.load(sys.stdin):
        model, margs = build_meta_model(recipe_args(recipe, variant) + args + extra_args)
        out.append(count_parameters(model, margs.moe_router_topk, margs.num_experts)["active"])
        del model
    print(ACTIVE_PREFIX + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
