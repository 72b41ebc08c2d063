"""Summary of one ``benchmarks/device_check.sh`` run: ``$OUT/device_check.json``.

Reads what the stages left in the output folder (``stages.jsonl``, ``environment.json``,
``mhc_site.json``, ``mhc_site_compile.json``, ``step.json``, ``experts.json``,
``logs/pretrain_*.log``) and keeps the numbers a closing note quotes: per stage its exit status
and seconds; the site's time over the memory floor and over eager / torch.compile / Liger, with
the correctness check; the step ratios and mHC's share of a 40%-MFU step; grouped over
sequential experts; the training runs' losses and median time per step, mHC over residual.

    python benchmarks/device_summary.py out/device_check [--dry-run 1]

Exits 1 when a stage failed, naming it.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from mhc_megatron import megatron_log

WARMUP_STEPS = 3  # left out of the median: allocator growth, Triton's JIT


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def site_summary(data: dict | None) -> list[dict] | None:
    if data is None:
        return None
    rows = []
    for shape in data["shapes"]:
        ratios = shape.get("ratios", {})
        rows.append({
            "n": shape["n"], "C": shape["C"], "T": shape["T"],
            "site_fwd_bwd": {pair: r["site"]["fwd_bwd"] for pair, r in ratios.items()
                             if "/" in pair and "site" in r and "fwd_bwd" in r["site"]},
            "site_over_residual": ratios.get("site/residual"),
            "row_over_two_sites": ratios.get("row/(2*site)"),  # ours: the chained backward
            "worst_rel": {impl: max((c.get("worst_rel", 0.0) for c in t.values()), default=None)
                          for impl, t in shape.get("correctness", {}).items()},
            "errors": shape.get("errors", {}),
        })  # fmt: skip
    return rows


def step_summary(data: dict | None) -> dict | None:
    if data is None:
        return None
    keys = ("ratios", "shares", "goal", "mfu40_step_ms", "measured_step_overhead")
    configs = {k: {f: v.get(f) for f in ("available", "step_ms", "reason")}
               for k, v in data.get("configs", {}).items()}  # fmt: skip
    return {k: data.get(k) for k in keys} | {"configs": configs}


def experts_summary(data: dict | None) -> list[dict] | None:
    if data is None:
        return None
    keys = ("shape", "tokens", "dtype", "grouped_path", "max_rel", "grouped/sequential")
    return [{k: row.get(k) for k in keys} for row in data["shapes"]]


def training_summary(log: Path) -> dict | None:
    if not log.exists():
        return None
    steps = [
        (line.iteration, line.number("elapsed time per iteration (ms)"), line.number("lm loss"))
        for line in megatron_log.iterations(log.read_text())
    ]
    times = [ms for i, ms, _ in steps if i > WARMUP_STEPS]
    return {
        "steps": len(steps),
        "losses": [loss for _, _, loss in steps],
        "median_step_ms": statistics.median(times) if times else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    training = {
        v: training_summary(out / "logs" / f"pretrain_{v}.log") for v in ("mhc", "residual")
    }
    summary = {
        "dry_run": bool(args.dry_run),
        "environment": _json(out / "environment.json"),
        "stages": stages,
        "mhc_site": site_summary(_json(out / "mhc_site.json")),
        "mhc_site_compile": site_summary(_json(out / "mhc_site_compile.json")),
        "step": step_summary(_json(out / "step.json")),
        "experts": experts_summary(_json(out / "experts.json")),
        "pretrain": training,
    }
    mhc, residual = training["mhc"], training["residual"]
    if mhc and residual and mhc["median_step_ms"] and residual["median_step_ms"]:
        summary["pretrain_step_mhc_over_residual"] = (
            mhc["median_step_ms"] / residual["median_step_ms"]
        )
    (out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'device_check.json'}")
    failed = [s["stage"] for s in stages if s["rc"] != 0]
    for name, run in training.items():
        if run is not None and run["steps"] == 0 and f"pretrain_{name}" not in failed:
            failed.append(f"pretrain_{name} (no iteration lines in its log)")
    if failed:
        print(
            f"error: stages failed: {', '.join(failed)} (their logs are in {out})", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
