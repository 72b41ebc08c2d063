"""Stability report of trained checkpoints: amax gains of every mHC site, as JSON and PNG plots.

For each residual site (attention and MLP of every layer) the report gives the paper's amax gains
(section 3.1, ``docs/mhc-spec.md`` section 5) of the site's own ``H_res`` and of the composite
product ``H_res(k) @ ... @ H_res(1)`` of all sites up to it, forward (largest absolute row sum)
and backward (largest absolute column sum), averaged over the tokens of a few batches (at most
1024 evenly spaced tokens of each: ``diagnostics.MAX_TOKENS``); plus the largest row and column
sum errors ``|sum - 1|`` (Sinkhorn's, for mHC) and the mean ``h_pre``/``h_post``. These are the
numbers ``--mhc-diagnostics-interval`` writes to TensorBoard during training
(``mhc_megatron.megatron.diagnostics``), measured here on a saved checkpoint in eval mode.

Three subcommands:

``measure CKPT --out run.json``
    One checkpoint (the ``--save`` directory of ``pretrain_mhc.py``, or one of its
    ``iter_NNNNNNN`` directories; ``--ckpt-format torch_dist``) to JSON, in one process. The model
    is rebuilt from the arguments saved in the checkpoint (all of them, so the mHC, MLA and MoE
    settings come back too, which Megatron's ``--use-checkpoint-args`` does not cover) as a single
    rank, loaded with Megatron's ``load_checkpoint`` and run on ``--batches`` batches of
    ``--mock-data``, ``--data-path`` or, by default, the data the checkpoint was trained on. On a
    machine without a GPU (or with ``--cpu``) it runs in ``pretrain_mhc.py``'s CPU mode, in fp32
    with the local (non-TransformerEngine) modules. A model without mHC sites
    (``--mhc-variant residual``, or a plain Megatron GPT) mixes its single residual stream with
    the identity: every gain is reported as exactly 1 and the JSON says so.
``plot A.json [B.json ...] --out gains.png``
    A 2x2 figure: single-site and composite gains (log scale), forward and backward, against the
    layer, one line per run.
``report --run hc=CKPT --run mhc=CKPT --out-dir DIR``
    ``measure`` for each run (each in its own process, as Megatron keeps global state;
    ``--jobs N`` runs N at a time), then ``plot``: writes ``DIR/LABEL.json``,
    ``DIR/stability.json`` (all runs) and ``DIR/stability.png``; prints the headline numbers.

Examples:
    python tools/stability_report.py report --run hc=runs/hc/checkpoints \\
        --run mhc=runs/mhc/checkpoints --out-dir runs/stability --mock-data
    python tools/stability_report.py measure runs/mhc/checkpoints --out mhc.json --batches 8
    python tools/stability_report.py plot hc.json mhc.json --out gains.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
ITER_DIR_RE = re.compile(r"iter_(\d+)$")
SITE_KEY_RE = re.compile(r"L(\d+)\.(\w+)$")
# Subplots of the figure: (metric in the JSON, title, log-scale y).
PANELS = (
    ("fwd_gain", "single site, forward (max row sum)", False),
    ("bwd_gain", "single site, backward (max column sum)", False),
    ("composite_fwd_gain", "composite product, forward", True),
    ("composite_bwd_gain", "composite product, backward", True),
)
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D")
IDENTITY_NOTE = (
    "no mHC sites in this model (variant {variant}): its single residual stream is mixed by the "
    "identity, so every gain is exactly 1 (reported, not measured)"
)


class ReportError(Exception):
    """A problem with the user's input; the message says what was expected."""


# --------------------------------------------------------------------------------------------
# Checkpoint lookup (no Megatron import: errors come before the slow start-up)


def resolve_checkpoint(path: str | Path) -> tuple[Path, int | None, Path]:
    """Finds the checkpoint to load in ``path``.

    Args:
        path: the ``--save`` directory of pretrain_mhc.py (with
            ``latest_checkpointed_iteration.txt`` or ``iter_NNNNNNN`` directories) or one
            ``iter_NNNNNNN`` directory.

    Returns:
        ``(load_dir, iteration or None for the tracker's latest, iteration directory)``.

    Raises:
        ReportError: no such directory, an empty one, or no torch_dist checkpoint in it.
    """
    path = Path(path)
    expected = (
        "expected the --save directory of pretrain_mhc.py (holding "
        f"{TRACKER} and iter_NNNNNNN/ directories) or one iter_NNNNNNN directory with a "
        "torch_dist checkpoint (metadata.json; saved with --ckpt-format torch_dist)"
    )
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ReportError(f"checkpoint directory {path} {what}; {expected}")
    match = ITER_DIR_RE.match(path.name)
    if match and (path / "metadata.json").is_file():
        return path.parent, int(match.group(1)), path
    iterations = sorted(
        (int(m.group(1)), p) for p in path.iterdir() if (m := ITER_DIR_RE.match(p.name))
    )
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ReportError(f"{tracker} holds {text!r}, not an iteration number; {expected}")
        iteration, explicit = int(text), None
    elif iterations:
        (iteration, _), explicit = iterations[-1], iterations[-1][0]  # no tracker: the latest
    else:
        contents = sorted(p.name for p in path.iterdir())[:8]
        found = f"it contains {', '.join(contents)}" if contents else "it is empty"
        raise ReportError(f"no checkpoint in {path}: {found}; {expected}")
    iter_dir = path / f"iter_{iteration:07d}"
    if not (iter_dir / "metadata.json").is_file():
        raise ReportError(
            f"{iter_dir} holds no torch_dist checkpoint (no metadata.json); {expected}"
        )
    return path, explicit, iter_dir


# --------------------------------------------------------------------------------------------
# measure: one checkpoint -> JSON (one process; imports Megatron)


def _single_rank_args(ckpt_args, load_dir: Path, iteration: int | None, opts, cpu: bool):
    """The checkpoint's training arguments, changed to run its model on one rank for eval.

    Everything that defines the model stays as saved; parallel layout, device, precision of the
    fused kernels, data and I/O change.
    """
    import torch

    args = ckpt_args
    for name, value in {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None, "num_layers_per_virtual_pipeline_stage": None,
        "pipeline_model_parallel_layout": None, "decoder_first_pipeline_num_layers": None,
        "decoder_last_pipeline_num_layers": None, "num_layers_in_first_pipeline_stage": None,
        "num_layers_in_last_pipeline_stage": None, "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": 1, "context_parallel_size": 1, "sequence_parallel": False,
        "data_parallel_size": 1, "world_size": 1, "rank": 0, "local_rank": 0,
        "use_distributed_optimizer": False, "micro_batch_size": opts.micro_batch_size,
        "global_batch_size": opts.micro_batch_size, "step_batch_size_schedule": None,
        "rampup_batch_size": None,
        # Load the model only, at the requested iteration; write nothing.
        "load": str(load_dir), "ckpt_step": iteration, "no_load_optim": True,
        "no_load_rng": True, "finetune": False, "pretrained_checkpoint": None,
        "exit_on_missing_checkpoint": True, "save": None, "tensorboard_dir": None,
        "wandb_project": None, "async_save": False, "non_persistent_ckpt_type": None,
        "non_persistent_global_ckpt_dir": None, "auto_detect_ckpt_format": False,
        # No backward: the stream recompute and Megatron's recompute have nothing to save.
        "mhc_recompute": "none", "recompute_granularity": None, "recompute_method": None,
        "recompute_num_layers": None, "mhc_diagnostics_interval": 0,
    }.items():  # fmt: skip
        setattr(args, name, value)
    args.cpu = cpu
    if cpu:
        from mhc_megatron.training.cpu_settings import apply_cpu_settings

        apply_cpu_settings(args)  # what --cpu implies: the local modules, no GPU fusions
        # fp32 (no bf16 CPU kernels for everything); no TP comm overlap without TP.
        for name in ("bf16", "fp16", "tp_comm_overlap"):
            if hasattr(args, name):
                setattr(args, name, False)
        args.params_dtype = torch.float32
        if getattr(args, "mhc_backend", "auto") == "triton":
            args.mhc_backend = "auto"  # the fused kernels run on CUDA only (or interpreted)
    if opts.mock_data:
        args.mock_data, args.data_path = True, None
    elif opts.data_path:
        args.mock_data, args.data_path, args.split = False, list(opts.data_path), opts.split
    if opts.mock_data or opts.data_path:
        for name in ("train_data_path", "valid_data_path", "test_data_path", "data_args_path"):
            setattr(args, name, None)
    return args


def _initialize(args) -> None:
    """Megatron's global state and a one-rank process group, as ``pretrain()`` sets them up."""
    from megatron.training.global_vars import set_global_variables
    from megatron.training.initialize import initialize_megatron

    from mhc_megatron.processes import free_port

    port = free_port()  # init_process_group reads the rendezvous from the environment
    # Always this process's own one-rank group: a MASTER_PORT inherited from a parent (a test
    # session, a torchrun) would be shared by the measures that `report --jobs` runs at once.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    set_global_variables(args, build_tokenizer=True)
    initialize_megatron(allow_no_cuda=args.cpu)


def _build_and_load(args) -> list:
    """The model of ``args`` on this rank (Megatron's builder, as ``pretrain()`` builds it), with
    the checkpoint's weights, in eval mode."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.checkpointing import load_checkpoint

    from mhc_megatron.megatron.model import MHCGPTModelBuilder, MHCGPTModelConfig, mhc_layer_spec
    from mhc_megatron.training.arguments import mhc_transformer_config_from_args

    config = mhc_transformer_config_from_args(args)
    model_cfg = gpt_config_from_args(args, config=config, model_config_cls=MHCGPTModelConfig)
    if model_cfg.transformer_layer_spec is None:
        model_cfg.transformer_layer_spec = mhc_layer_spec
    model = MHCGPTModelBuilder(model_cfg).build_distributed_models(
        ProcessGroupCollection.use_mpu_process_groups(),
        wrap_with_ddp=False,
        data_parallel_random_init=False,
    )
    load_checkpoint(model, None, None, strict=True)
    for chunk in model:
        chunk.eval()
    return model


def _batches(args, count: int):
    """``count`` micro-batches ``{tokens, labels, loss_mask, position_ids, attention_mask}`` of
    ``[b, s]`` (mask ``[b, 1, s, s]`` or absent) from the train split of the run's data."""
    import torch
    from torch.utils.data import DataLoader

    from mhc_megatron.training import gpt_step

    train, _, _ = gpt_step.train_valid_test_datasets_provider([count * args.micro_batch_size, 0, 0])
    loader = DataLoader(train, batch_size=args.micro_batch_size, shuffle=False)
    # The current GPU, or the CPU (in CPU mode CUDA reports itself unavailable).
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )
    for _, batch in zip(range(count), loader, strict=False):
        yield {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def identity_statistics(num_layers: int) -> dict[str, dict[str, float]]:
    """The statistics of a model whose residual is one stream mixed by the identity (no sites):
    every gain 1, no Sinkhorn error, ``h_pre = h_post = 1``. Same keys as
    ``stability_statistics``."""
    from mhc_megatron.megatron.diagnostics import SITE_KINDS, site_key

    ones = dict.fromkeys(("fwd_gain", "bwd_gain", "composite_fwd_gain", "composite_bwd_gain"), 1.0)
    values = {**ones, "row_error": 0.0, "col_error": 0.0, "h_pre_mean": 1.0, "h_post_mean": 1.0}
    return {
        site_key(layer, kind): dict(values)
        for layer in range(1, num_layers + 1)
        for kind in SITE_KINDS
    }


def measure(ckpt: str | Path, opts) -> dict:
    """Measures one checkpoint (module docstring); returns the JSON-ready result.

    Args:
        ckpt: checkpoint directory (see :func:`resolve_checkpoint`).
        opts: ``measure``'s parsed options (``label``, ``batches``, ``micro_batch_size``,
            ``mock_data``, ``data_path``, ``split``, ``cpu``).

    Returns:
        ``{"label", "checkpoint", "iteration", "variant", "num_layers", "num_streams", "data",
        "batches", "micro_batch_size", "seq_length", "lm_loss", "device", "forward_seconds",
        "note", "sites": {site_key: {metric: value}}, "summary": {...}}``; ``note`` is None
        unless the model has no sites (then every gain is 1: :func:`identity_statistics`).
    """
    load_dir, iteration, iter_dir = resolve_checkpoint(ckpt)
    import torch

    cpu = opts.cpu or not torch.cuda.is_available()
    if cpu:
        from mhc_megatron.training.cpu import enable_cpu_mode

        enable_cpu_mode()  # before Megatron's import: its CUDA calls land on CPU
    from megatron.core import dist_checkpointing

    from mhc_megatron.megatron.diagnostics import RECORDER, stability_statistics, summarize
    from mhc_megatron.training.gpt_step import check_data_paths

    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    if not isinstance(common, dict) or "args" not in common:
        raise ReportError(
            f"{iter_dir} has no saved training arguments; measure needs a checkpoint written "
            "by pretrain_mhc.py (or Megatron's pretrain) with --save"
        )
    args = _single_rank_args(common["args"], load_dir, iteration, opts, cpu)
    variant = getattr(args, "mhc_variant", None) or "residual"  # a plain Megatron GPT: none
    try:  # before the slow part; its message says what to pass
        check_data_paths(args)
    except FileNotFoundError as error:
        raise ReportError(f"{error} (measure reads the checkpoint's own data by default)") from None
    _initialize(args)
    model = _build_and_load(args)

    start = time.time()
    loss_sum, token_count = 0.0, 0.0
    RECORDER.arm(max_records=opts.batches)
    try:
        with torch.no_grad():
            for batch in _batches(args, opts.batches):
                per_token = model[0](
                    batch["tokens"],
                    batch["position_ids"],
                    batch.get("attention_mask"),
                    labels=batch["labels"],
                )
                mask = batch["loss_mask"].float()
                loss_sum += (per_token.float() * mask).sum().item()
                token_count += mask.sum().item()
    finally:
        RECORDER.disarm()
    records, RECORDER.records = RECORDER.records, {}
    note = None
    if records:
        stats = stability_statistics(records)
    else:
        note = IDENTITY_NOTE.format(variant=variant)
        stats = identity_statistics(args.num_layers)
    return {
        "label": opts.label or variant,
        "checkpoint": str(iter_dir.resolve()),
        "iteration": int(common.get("iteration", iteration or 0)),
        "variant": variant,
        "num_layers": args.num_layers,
        "num_streams": getattr(args, "mhc_num_streams", 1) if records else 1,
        "data": "mock" if args.mock_data else args.data_path,
        "batches": opts.batches,
        "micro_batch_size": args.micro_batch_size,
        "seq_length": args.seq_length,
        "lm_loss": loss_sum / max(token_count, 1.0),
        "device": "cpu" if cpu else torch.cuda.get_device_name(),
        "forward_seconds": round(time.time() - start, 2),
        "note": note,
        "sites": stats,
        "summary": summarize(stats),
    }


# --------------------------------------------------------------------------------------------
# plot: JSON -> PNG (no Megatron)


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Runs from ``measure`` JSON files or ``report``'s ``stability.json`` (``{"runs": [...]}``).

    Raises:
        ReportError: a file that is missing, not JSON, or not written by this tool.
    """
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ReportError(
                f"cannot read {path}: {error}; expected a JSON file written by "
                "stability_report.py measure or report"
            ) from None
        found = data.get("runs") if isinstance(data, dict) and "runs" in data else [data]
        for run in found if isinstance(found, list) else [None]:
            if not (isinstance(run, dict) and isinstance(run.get("sites"), dict) and run["sites"]):
                raise ReportError(
                    f"{path} is not a stability measurement: expected a JSON object with a "
                    "non-empty 'sites' mapping (stability_report.py measure) or {'runs': [...]}"
                )
            runs.append(run)
    return runs


def site_positions(keys) -> list[float]:
    """x positions of sites on a layer axis: ``l - 0.5`` for layer l's attention site, ``l``
    for its MLP site (so runs of different depth share the axis)."""
    positions = []
    for key in keys:
        match = SITE_KEY_RE.match(key)
        if not match:
            raise ReportError(f"site key {key!r} is not of the form L003.attention / L003.mlp")
        layer, kind = int(match.group(1)), match.group(2)
        positions.append(layer - 0.5 if kind == "attention" else float(layer))
    return positions


def plot(runs: list[dict], out: str | Path, title: str | None = None) -> Path:
    """Writes the 2x2 gain figure (module docstring) of ``runs`` to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on these machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, constrained_layout=True)
    for ax, (metric, panel_title, log) in zip(axes.flat, PANELS, strict=True):
        for index, run in enumerate(runs):
            keys = list(run["sites"])
            label = run.get("label", "?") + (" (identity)" if run.get("note") else "")
            # Runs at exactly 1 (mHC, residual) overlap: each run gets its own dash and marker.
            ax.plot(
                site_positions(keys), [run["sites"][k][metric] for k in keys], label=label,
                ls=LINE_STYLES[index % len(LINE_STYLES)], marker=MARKERS[index % len(MARKERS)],
                ms=3, lw=1.2,
            )  # fmt: skip
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        if log:
            ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_ylabel("amax gain")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer (attention site at l - 1/2, MLP site at l)")
    axes[0, 0].legend()
    fig.suptitle(title or "amax gain of H_res per site (mean over tokens)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def headline(run: dict) -> str:
    """One line: the composite gains at the last site and the largest single-site gain."""
    s = run["summary"]
    return (
        f"{run.get('label', '?')}: {run['variant']}, {run['num_layers']} layers, iteration "
        f"{run['iteration']}, lm loss {run['lm_loss']:.3f}; composite gain at the last site "
        f"fwd {s['composite_fwd_gain_last']:.4g} bwd {s['composite_bwd_gain_last']:.4g} "
        f"(max fwd {s['composite_fwd_gain_max']:.4g}); largest single-site fwd "
        f"{s['fwd_gain_max']:.4g} bwd {s['bwd_gain_max']:.4g}"
        + (f"; {run['note']}" if run.get("note") else "")
    )


# --------------------------------------------------------------------------------------------
# report: several checkpoints -> JSON + PNG (one measure process per run)


def _measure_in_subprocess(label: str, ckpt: str, out: Path, opts) -> dict:
    """Runs ``measure`` for one checkpoint in a fresh process (Megatron's global state is set
    once per process); its output goes to ``out`` with suffix ``.log``."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "measure", ckpt, "--out", str(out),
        "--label", label, "--batches", str(opts.batches),
        "--micro-batch-size", str(opts.micro_batch_size),
    ]  # fmt: skip
    if opts.mock_data:
        cmd.append("--mock-data")
    if opts.data_path:
        cmd += ["--data-path", *opts.data_path, "--split", opts.split]
    if opts.cpu:
        cmd.append("--cpu")
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ReportError(f"measuring run {label} ({ckpt}) failed (exit {rc}); {log}:\n{tail}")
    return load_runs([out])[0]


def parse_run(text: str) -> tuple[str, str]:
    """``LABEL=CKPT_DIR`` -> ``(label, dir)``."""
    label, sep, ckpt = text.partition("=")
    if not sep or not label or not ckpt:
        raise argparse.ArgumentTypeError(f"--run takes LABEL=CKPT_DIR, got {text!r}")
    return label, ckpt


def _add_measure_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=4, help="batches to average over (4)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per batch (4)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--mock-data", action="store_true", help="Megatron's mock data")
    data.add_argument(
        "--data-path", nargs="+", help="dataset prefix(es) (default: the checkpoint's own data)"
    )
    parser.add_argument("--split", default="100,0,0", help="with --data-path (train split used)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_measure = sub.add_parser("measure", help="one checkpoint -> JSON")
    p_measure.add_argument("checkpoint", help="--save directory or iter_NNNNNNN directory")
    p_measure.add_argument("--out", required=True, help="JSON file to write")
    p_measure.add_argument("--label", help="name of the run in plots (default: the variant)")
    _add_measure_options(p_measure)
    p_plot = sub.add_parser("plot", help="JSON files -> PNG")
    p_plot.add_argument("json", nargs="+", help="measure JSON files or report's stability.json")
    p_plot.add_argument("--out", required=True, help="PNG file to write")
    p_plot.add_argument("--title")
    p_report = sub.add_parser("report", help="several checkpoints -> JSON + PNG")
    p_report.add_argument(
        "--run", type=parse_run, action="append", required=True, metavar="LABEL=CKPT_DIR",
        help="a run to measure (repeat to compare)",
    )  # fmt: skip
    p_report.add_argument("--out-dir", required=True, help="where the JSON and PNG go")
    p_report.add_argument("--title")
    p_report.add_argument(
        "--jobs", type=int, default=1, help="measure this many runs at a time (1)"
    )
    _add_measure_options(p_report)
    opts = parser.parse_args(argv)
    if min(getattr(opts, name, 1) for name in ("batches", "micro_batch_size", "jobs")) < 1:
        parser.error("--batches, --micro-batch-size and --jobs must be >= 1")
    try:
        if opts.command == "measure":
            result = measure(opts.checkpoint, opts)
            out = Path(opts.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(headline(result))
            print(f"wrote {out}")
        elif opts.command == "plot":
            print(f"wrote {plot(load_runs(opts.json), opts.out, opts.title)}")
        else:
            labels = [label for label, _ in opts.run]
            if len(set(labels)) != len(labels):
                raise ReportError(f"--run labels must differ, got {labels}")
            for _, ckpt in opts.run:  # all inputs first: fail before minutes of measuring
                resolve_checkpoint(ckpt)
            out_dir = Path(opts.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(opts.jobs) as pool:  # threads that wait on processes
                runs = list(
                    pool.map(
                        lambda run: _measure_in_subprocess(*run, out_dir / f"{run[0]}.json", opts),
                        opts.run,
                    )
                )
            for run in runs:
                print(headline(run))
            (out_dir / "stability.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
            png = plot(runs, out_dir / "stability.png", opts.title)
            print(f"wrote {out_dir / 'stability.json'} and {png}")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_code = main()
    from mhc_megatron.processes import skip_final_collection

    skip_final_collection()  # the exit's last collection (bench_startup.py)
    sys.exit(exit_code)
