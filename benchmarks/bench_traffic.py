"""Memory traffic of one mHC site and one mHC layer, forward + backward, counted per launch.

Runs in Triton's interpreter on CPU (``TRITON_INTERPRET=1`` is set before the kernels are
imported) under :class:`benchmarks.traffic.TrafficMeter`, at two token counts. Each launch's
bytes ``b(T) = a + s*T`` are split into the part that grows with the tokens (``s*T``, reported
in units of ``S = T*C*2``, one bf16 stream) and the parameter-sized rest ``a`` (bytes). The floor
is the project's ``(6n + 5) S`` per site (``benchmarks/README.md``).

What runs (``x [T, n, C]`` bf16 streams, fp32 parameters, 20 Sinkhorn iterations):

- ``site``: coefficients, pre-mix, a stand-in branch ``y = 2 u`` (its own traffic is labelled
  ``branch`` and left out of the site's totals), post + residual mix; backward from a fixed
  ``d x_next``. Once per implementation: ``separate`` (the three fused ops one after another:
  ``mhc_coefficients``, ``mhc_pre``, ``mhc_post_res``), ``fused`` (``mhc_site_enter`` and
  ``mhc_site_exit``, what the mHC layer runs), ``recompute`` (the layer's stream-recompute
  path on the fused site, which keeps no streams and rebuilds them in backward: two sites of
  one block, per site, since the first reads the block's kept input).
- ``layer``: two fused sites in a row (attention and MLP positions), per site: the second
  site's ``dx`` pass runs chained with the first's exit backward (``kernels.chain``, n <= 4).
- ``model``: ``--model-sites`` fused sites in a row (default 8, four layers), per site: every
  site but the first is chained, as in a pipeline stage of a model.

    python benchmarks/bench_traffic.py                       # n = 4 and 8, C = 2560
    python benchmarks/bench_traffic.py --streams 4 --hidden 512 --tokens 32 64
"""

import argparse
import os
import sys
import types
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a plain checkout

from benchmarks.harness import device_meta, write_json  # noqa: E402
from benchmarks.traffic import TrafficMeter  # noqa: E402

ITERS, EPS = 20, 1e-6
IMPLS = ("separate", "fused", "recompute")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "traffic_interpreter.json"


class _Branch(torch.autograd.Function):
    """Stand-in branch ``y = 2 u`` whose forward and backward traffic is labelled ``branch``."""

    meter: TrafficMeter | None = None

    @staticmethod
    def forward(ctx, u):
        with _Branch.meter.phase("branch"):
            return u * 2

    @staticmethod
    def backward(ctx, dy):
        with _Branch.meter.phase("branch"):
            return dy * 2


def _site_params(n: int, C: int, gen: torch.Generator) -> dict:
    rows = n * n + 2 * n
    return {
        "fn": (0.02 * torch.randn(rows, n * C, generator=gen)).requires_grad_(),
        "base": (0.5 * torch.randn(rows, generator=gen)).requires_grad_(),
        "scale": torch.full((3,), 0.01).requires_grad_(),
    }


def _run_separate(x, p, state):
    from mhc_megatron import kernels

    h_pre, h_post, h_res = kernels.mhc_coefficients(x, p["fn"], p["base"], p["scale"], ITERS, EPS)
    y = _Branch.apply(kernels.mhc_pre(x, h_pre))
    return kernels.mhc_post_res(x, y, h_post, h_res)


def _run_fused(x, p, state):
    from mhc_megatron import kernels

    # Sites in a row chain their backward passes, as the mHC layer and model run them.
    u, _, h_post, h_res, link = kernels.mhc_site_enter(
        x, p["fn"], p["base"], p["scale"], ITERS, EPS, after=state.get("link")
    )
    state["link"] = link
    return kernels.mhc_site_exit(x, _Branch.apply(u), h_post, h_res, link)


def _run_recompute(x, p, state):
    from mhc_megatron import kernels
    from mhc_megatron.kernels import site as fused_site
    from mhc_megatron.megatron.recompute import RecomputeBlock, enter_site, exit_site

    config = types.SimpleNamespace(mhc_sinkhorn_iters=ITERS, mhc_eps=EPS)
    site = types.SimpleNamespace(**p, config=config, observe=lambda *coefficients: None)
    if "block" not in state:  # the sites of one measurement share a block, as a layer's do
        state["block"] = RecomputeBlock(x, kernels.mhc_post_res, fused_site)
    block = state["block"]
    u, h_post, h_res, index = enter_site(block, site, x, kernels.mhc_pre)
    return exit_site(block, x, _Branch.apply(u), h_post, h_res, index)


RUNS = {"separate": _run_separate, "fused": _run_fused, "recompute": _run_recompute}


def measure(impl: str, n: int, C: int, T: int, sites: int = 1) -> list:
    """Records of ``sites`` sites in a row, forward then backward, on ``T`` tokens."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, C, generator=gen).to(torch.bfloat16).requires_grad_()
    params = [_site_params(n, C, gen) for _ in range(sites)]
    grad = torch.randn(T, n, C, generator=gen).to(torch.bfloat16)
    with TrafficMeter() as meter:
        _Branch.meter = meter
        with meter.phase("fwd"):
            out, state = x, {}
            for p in params:
                out = RUNS[impl](out, p, state)
        with meter.phase("bwd"):
            torch.autograd.backward(out, grad)
    return meter.records


def split_by_tokens(small: list, large: list, t_small: int, t_large: int, C: int) -> list[dict]:
    """Per record: the token-proportional bytes in units of S (``T*C*2``) and the rest."""
    if [(r.phase, r.name) for r in small] != [(r.phase, r.name) for r in large]:
        raise RuntimeError("the launches differ between the two token counts; pick others")
    stream = C * 2  # bytes of one bf16 stream per token
    rows = []
    for a, b in zip(small, large, strict=True):
        row = {"phase": a.phase, "kind": a.kind, "name": a.name}
        for key in ("loads", "stores", "issued_loads", "issued_stores"):
            slope = (getattr(b, key) - getattr(a, key)) / (t_large - t_small)
            row[f"{key}_S"] = round(slope / stream, 4)
            row[f"{key}_fixed_bytes"] = int(round(getattr(a, key) - slope * t_small))
        if a.tensors:
            row["tensors_S"] = {
                name: [
                    round((b.tensors.get(name, [0, 0])[i] - counts[i]) / (t_large - t_small) /
                          stream, 4)
                    for i in (0, 1)
                ]
                for name, counts in a.tensors.items()
            }  # fmt: skip
        rows.append(row)
    return rows


def totals(rows: list[dict], n: int, sites: int) -> dict:
    """Per-site totals in S by phase, the branch excluded, and the ratio to the floor."""
    out = {}
    for phase in ("fwd", "bwd"):
        mine = [r for r in rows if r["phase"] == phase]
        out[f"{phase}_S"] = round(sum(r["loads_S"] + r["stores_S"] for r in mine) / sites, 2)
        out[f"{phase}_issued_S"] = round(
            sum(r["issued_loads_S"] + r["issued_stores_S"] if r["kind"] == "triton"
                else r["loads_S"] + r["stores_S"] for r in mine) / sites, 2
        )  # fmt: skip
        out[f"{phase}_launches"] = sum(r["kind"] == "triton" for r in mine) / sites
        out[f"{phase}_torch_ops_S"] = round(
            sum(r["loads_S"] + r["stores_S"] for r in mine if r["kind"] == "torch") / sites, 2
        )
    out["total_S"] = round(out["fwd_S"] + out["bwd_S"], 2)
    out["total_issued_S"] = round(out["fwd_issued_S"] + out["bwd_issued_S"], 2)
    out["floor_S"] = 6 * n + 5
    out["total_over_floor"] = round(out["total_S"] / out["floor_S"], 3)
    return out


def bench(
    n: int, C: int, tokens: tuple[int, int], impls, layer: bool = True, model_sites: int = 8
) -> dict:
    result = {"n": n, "C": C, "tokens": list(tokens), "site": {}}
    for impl in impls:
        # A recompute block's first site reads its kept input; the second's is rebuilt.
        sites = 2 if impl == "recompute" else 1
        small, large = (measure(impl, n, C, t, sites) for t in tokens)
        rows = split_by_tokens(small, large, *tokens, C)
        result["site"][impl] = {"sites": sites, "totals": totals(rows, n, sites), "records": rows}
    for name, sites in (("layer", 2), ("model", model_sites)) if layer else ():
        if sites < 2:
            continue
        small, large = (measure("fused", n, C, t, sites=sites) for t in tokens)
        rows = split_by_tokens(small, large, *tokens, C)
        result[name] = {"impl": "fused", "sites": sites, "per_site": totals(rows, n, sites),
                        "records": rows}  # fmt: skip
    return result


def print_table(result: dict) -> None:
    print(f"\nn = {result['n']}, C = {result['C']} (per site, S = T*C*2 bytes)")
    print(f"{'impl':10s} {'fwd':>7s} {'bwd':>7s} {'total':>7s} {'issued':>7s} {'/floor':>7s}")
    entries = [(k, v["totals"]) for k, v in result["site"].items()]
    entries += [(name, result[name]["per_site"]) for name in ("layer", "model") if name in result]
    for name, t in entries:
        print(f"{name:10s} {t['fwd_S']:7.2f} {t['bwd_S']:7.2f} {t['total_S']:7.2f} "
              f"{t['total_issued_S']:7.2f} {t['total_over_floor']:7.3f}")  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--tokens", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--no-layer", action="store_true", help="skip the layer and the model")
    parser.add_argument("--model-sites", type=int, default=8, help="sites in a row of 'model'")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    data = {
        "meta": device_meta(torch.device("cpu"), ["torch", "triton"])
        | {"args": {k: str(v) for k, v in vars(args).items()}, "method": __doc__},
        "shapes": [],
    }
    for n in args.streams:
        result = bench(n, args.hidden, tuple(args.tokens), impls, layer=not args.no_layer,
                       model_sites=args.model_sites)  # fmt: skip
        print_table(result)
        data["shapes"].append(result)
    write_json(args.out, data)
    print(f"\nwrote {args.out}")
    return data


if __name__ == "__main__":
    main()
