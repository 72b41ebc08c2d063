"""Stability diagnostics of the mHC sites (spec section 5): amax gains, Sinkhorn errors, gates.

The paper's measure of stability is the amax gain of the residual mixing. For a matrix ``H``
mixing the n streams, the forward gain is its largest absolute row sum (how much a stream can
grow in the forward pass) and the backward gain its largest absolute column sum (the same for
gradients, which flow through ``H^T``). Per site this module reports the gains of the site's own
``H_res`` and of the composite product ``H_res(k) @ ... @ H_res(1)`` over all sites up to it
(attention and MLP sites count separately), each averaged over tokens; plus the Sinkhorn row
and column errors (largest ``|sum - 1|`` over tokens) and the mean ``h_pre`` and ``h_post``.

Recording is off unless ``RECORDER`` is armed: every MHCSite offers its coefficients to it.
Training arms it for one micro-batch every ``--mhc-diagnostics-interval`` iterations
(``mhc_megatron/training/stability_log.py``); ``tools/stability_report.py`` arms it for
evaluation batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SITE_KINDS = ("attention", "mlp")
# Tokens kept per site and record: enough for stable means, and the composite product over
# 2 * layers sites stays a few MB when gathered over pipeline stages.
MAX_TOKENS = 1024


def amax_gains(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward amax gains of mixing matrices.

    Args:
        h: ``[..., n, n]``; ``h[..., i, j]`` mixes stream j into stream i.

    Returns:
        ``(forward [...], backward [...])``: largest absolute row sum, largest absolute column
        sum.
    """
    a = h.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def site_key(layer_number: int, kind: str) -> str:
    """``"L003.attention"``: sorts in model order (layer, then attention before mlp)."""
    return f"L{layer_number:03d}.{kind}"


@dataclass
class SiteRecord:
    """The coefficients of one site for one batch (sampled tokens, fp32, CPU).

    ``h_pre [T, n]``, ``h_post [T, n]``, ``h_res [T, n, n]``.
    """

    h_pre: torch.Tensor
    h_post: torch.Tensor
    h_res: torch.Tensor


def _sample(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[s, b, ...]`` to ``[min(s*b, tokens), ...]`` fp32 on CPU, evenly strided tokens.

    The same indices on every pipeline stage, so the composite product pairs the same tokens.
    """
    flat = t.detach().flatten(0, 1)
    step = max(1, -(-flat.shape[0] // tokens))
    return flat[::step][:tokens].float().cpu()


@dataclass
class Recorder:
    """Collects site coefficients while armed.

    Attributes:
        armed: whether sites record.
        max_records: records kept per site while armed (1 in training: the first micro-batch;
            Megatron's full recompute re-runs the forward in backward and must not add more).
        records: ``{site_key: [SiteRecord, ...]}``.
    """

    armed: bool = False
    max_records: int = 1
    max_tokens: int = MAX_TOKENS
    records: dict[str, list[SiteRecord]] = field(default_factory=dict)

    def arm(self, max_records: int = 1) -> None:
        """Starts recording, dropping earlier records."""
        self.records, self.max_records, self.armed = {}, max_records, True

    def disarm(self) -> None:
        """Stops recording; keeps the records."""
        self.armed = False

    def offer(self, layer_number: int, kind: str, h_pre, h_post, h_res) -> None:
        """Records a site's coefficients when armed and the site has room; every site calls it.

        The coefficients are ``h_pre [s, b, n]``, ``h_post [s, b, n]``, ``h_res [s, b, n, n]``.
        """
        if not self.armed:
            return
        records = self.records.setdefault(site_key(layer_number, kind), [])
        if len(records) < self.max_records:
            records.append(
                SiteRecord(*(_sample(t, self.max_tokens) for t in (h_pre, h_post, h_res)))
            )


RECORDER = Recorder()


def stability_statistics(records: dict[str, list[SiteRecord]]) -> dict[str, dict[str, float]]:
    """Per-site statistics from the records of consecutive sites.

    The composite product runs over the sites in ``site_key`` order; record ``r`` of every site
    must come from the same batch (the same tokens). Means are over tokens, then over records.

    Args:
        records: ``{site_key: [SiteRecord, ...]}`` (all sites with the same number of records).

    Returns:
        ``{site_key: {"fwd_gain", "bwd_gain", "composite_fwd_gain", "composite_bwd_gain",
        "row_error", "col_error", "h_pre_mean", "h_post_mean"}}`` in model order. Errors are
        maxima over tokens and records; the rest are means.
    """
    keys = sorted(records)
    if not keys:
        return {}
    batches = min(len(records[k]) for k in keys)
    sums: dict[str, dict[str, float]] = {k: {} for k in keys}
    for r in range(batches):
        composite = None
        for key in keys:
            rec = records[key][r]
            h = rec.h_res.double()  # the product of many matrices: keep rounding out of it
            composite = h if composite is None else h @ composite
            fwd, bwd = amax_gains(h)
            cfwd, cbwd = amax_gains(composite)
            values = {
                "fwd_gain": fwd.mean().item(),
                "bwd_gain": bwd.mean().item(),
                "composite_fwd_gain": cfwd.mean().item(),
                "composite_bwd_gain": cbwd.mean().item(),
                "h_pre_mean": rec.h_pre.mean().item(),
                "h_post_mean": rec.h_post.mean().item(),
            }
            for name, value in values.items():
                sums[key][name] = sums[key].get(name, 0.0) + value / batches
            for name, dim in (("row_error", -1), ("col_error", -2)):
                error = (h.sum(dim) - 1).abs().max().item()
                sums[key][name] = max(sums[key].get(name, 0.0), error)
    return sums


def summarize(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    """The headline numbers of per-site ``stats``.

    Composite gains at the last site, largest single-site gains and Sinkhorn errors.
    """
    if not stats:
        return {}
    last = stats[next(reversed(stats))]
    return {
        "composite_fwd_gain_last": last["composite_fwd_gain"],
        "composite_bwd_gain_last": last["composite_bwd_gain"],
        "composite_fwd_gain_max": max(s["composite_fwd_gain"] for s in stats.values()),
        "composite_bwd_gain_max": max(s["composite_bwd_gain"] for s in stats.values()),
        "fwd_gain_max": max(s["fwd_gain"] for s in stats.values()),
        "bwd_gain_max": max(s["bwd_gain"] for s in stats.values()),
        "row_error_max": max(s["row_error"] for s in stats.values()),
        "col_error_max": max(s["col_error"] for s in stats.values()),
    }


def gather_records(records: dict[str, list[SiteRecord]], group) -> dict[str, list[SiteRecord]]:
    """All pipeline stages' records on every rank of ``group`` (the pipeline group)."""
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return records
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, records, group=group)
    merged: dict[str, list[SiteRecord]] = {}
    for part in gathered:
        merged.update(part)
    return merged


@dataclass
class NonFiniteSites:
    """Which sites produced non-finite coefficients in this iteration's training forward passes.

    Off unless ``enabled`` (the run guards of ``mhc_megatron/training/guards.py`` turn it on). A
    site adds the sum of its coefficients to a per-site device scalar, which stays finite
    exactly while every coefficient is (the entries are bounded: h_pre < 1 + eps, h_post < 2,
    H_res in [0, 1] for mHC); nothing is synchronised until a step turns out non-finite. Input
    streams that hold NaN/inf make the site's coefficients non-finite too, so the first such
    site is where the forward pass went wrong (its input streams or its own projection).
    """

    enabled: bool = False
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def note(self, layer_number: int, kind: str, *coefficients: torch.Tensor) -> None:
        """Adds one site's coefficients of one training micro-batch."""
        if not self.enabled or not torch.is_grad_enabled():
            return
        total = sum(c.detach().sum(dtype=torch.float32) for c in coefficients)
        key = site_key(layer_number, kind)
        previous = self.sums.get(key)
        self.sums[key] = total if previous is None else previous + total

    def first_nonfinite(self) -> str | None:
        """The first site in model order whose coefficients were not finite, or None."""
        for key in sorted(self.sums):
            if not torch.isfinite(self.sums[key]):
                return key
        return None

    def reset(self) -> None:
        """Drops the sums; the optimizer step guard calls it after every step."""
        self.sums = {}


NONFINITE_SITES = NonFiniteSites()
