"""The reproduction's tables and figures over seeds (``tools/reproduce.py`` writes them).

Input: ``{variant: {seed: RunSummary}}`` (:mod:`stablemoe_megatron.analysis.seeds`) plus each
variant's stage-switch iteration. Output: markdown tables (perplexity mean ± std over seeds and the
paired difference to StableMoE in seed standard deviations; the stage-1 study) and PNG figures
(validation perplexity against training tokens and training wall time with mean ± std bands;
routing fluctuation with bands; stage-1 diagnostics).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stablemoe_megatron.analysis.seeds import RunSummary, Spread, aggregate, mean_band, value_at

REFERENCE = "stablemoe"
METRICS = ("valid_ppl", "test_ppl", "valid_ppl_moe_bypassed", "tokens_per_sec", "train_seconds")

Runs = Dict[str, Dict[int, RunSummary]]


def _sigma_text(spread: Spread) -> str:
    if spread.mean is None:
        return "-"
    sigmas = spread.sigmas()
    return spread.format("{:+.2f}") + ("" if sigmas is None else f" ({sigmas:+.1f} σ)")


def _fluct(runs: Dict[int, RunSummary], key: str) -> str:
    return Spread.of([r.fluctuation.get(key) for r in runs.values()]).format("{:.1f}")


def switch_agreement(runs: Dict[int, RunSummary], switch: Optional[int]) -> Spread:
    """Held-out distillation agreement (probe, % of tokens) at the stage switch (at the end if none)."""
    values = []
    for run in runs.values():
        curve = run.probe_curves.get("distill_agreement", [])
        at = switch if switch is not None else (curve[-1][0] if curve else 0)
        value = value_at(curve, at)
        values.append(None if value is None else 100.0 * value)
    return Spread.of(values)


def main_table(runs: Runs, labels: Dict[str, str], switches: Dict[str, Optional[int]],
               paper: Dict[str, tuple]) -> str:
    """One row per variant: PPL mean ± std, paired difference to StableMoE, speed, fluctuation."""
    stats = aggregate(runs, REFERENCE, METRICS)
    header = ["variant", "seeds", "valid PPL", "test PPL", f"valid − {REFERENCE} (paired)",
              f"test − {REFERENCE} (paired)", "tokens/s", "fluct. >20% / >50% / >80% (%)",
              "distil. agreement at switch (%)", "paper valid / test"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for variant, seeds in runs.items():
        row = stats[variant]
        ref = variant != REFERENCE and f"vs_{REFERENCE}:valid_ppl" in row
        agreement = switch_agreement(seeds, switches.get(variant)) if any(
            r.probe_curves.get("distill_agreement") for r in seeds.values()) else Spread(None, None, 0)
        fluct = " / ".join(_fluct(seeds, f"after_{p}") for p in (20, 50, 80)) if any(
            r.fluctuation for r in seeds.values()) else "-"
        known = paper.get(variant)
        lines.append("| " + " | ".join([
            f"{variant} ({labels.get(variant, '')})", str(len(row["seeds"])), row["valid_ppl"].format(),
            row["test_ppl"].format(),
            _sigma_text(row[f"vs_{REFERENCE}:valid_ppl"]) if ref else "-",
            _sigma_text(row[f"vs_{REFERENCE}:test_ppl"]) if ref else "-",
            row["tokens_per_sec"].format("{:,.0f}"), fluct, agreement.format("{:.1f}"),
            "-" if known is None else " / ".join("-" if x is None else f"{x:.2f}" for x in known),
        ]) + " |")
    return "\n".join(lines)


def _last(curve) -> Optional[float]:
    return curve[-1][1] if curve else None


def _mean_after(curve, start: int) -> Optional[float]:
    values = [y for x, y in curve if x > start]
    return sum(values) / len(values) if values else None


def _peak(curve) -> Optional[float]:
    return max(y for _, y in curve) if curve else None


def _start_peak(rows: Sequence[RunSummary], name: str) -> str:
    start = Spread.of([r.layer_curves[name][0][1] if r.layer_curves.get(name) else None for r in rows])
    peak = Spread.of([_peak(r.layer_curves.get(name)) for r in rows])
    return "-" if peak.mean is None else f"{start.format('{:.2f}')} → {peak.format('{:.2f}')}"


def _minimum(rows: Sequence[RunSummary], name: str) -> str:
    """The lowest logged value and its iteration (first seed's iteration)."""
    curves = [r.layer_curves.get(name) for r in rows if r.layer_curves.get(name)]
    if not curves:
        return "-"
    lows = [min(c, key=lambda p: p[1]) for c in curves]
    return f"{Spread.of([low[1] for low in lows]).format('{:.3f}')} ({lows[0][0]})"


def stage1_table(runs: Runs, labels: Dict[str, str], train_iters: int) -> str:
    """The stage-1 study: the model with its MoE block skipped, gates, load, routing changes."""
    header = ["variant", "seeds", "valid PPL", "valid PPL, MoE block skipped", "skipped − with",
              "mean gate (end)", "load CV (end)", "tokens moved per probe, 2nd half (%)",
              "distil. agreement (end, %)", "MoE input RMS (start → peak)", "shared-component share (peak)",
              "min mean gate (iteration)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for variant, seeds in runs.items():
        rows = list(seeds.values())
        gap = Spread.of([None if r.valid_ppl is None or r.valid_ppl_moe_bypassed is None
                         else r.valid_ppl_moe_bypassed - r.valid_ppl for r in rows])
        moved = Spread.of([None if _mean_after(r.probe_curves.get("changed_fraction", []), train_iters // 2) is None
                           else 100 * _mean_after(r.probe_curves["changed_fraction"], train_iters // 2) for r in rows])
        agree = Spread.of([None if _last(r.probe_curves.get("distill_agreement")) is None
                           else 100 * _last(r.probe_curves["distill_agreement"]) for r in rows])
        lines.append("| " + " | ".join([
            f"{variant} ({labels.get(variant, '')})", str(len(rows)), Spread.of([r.valid_ppl for r in rows]).format(),
            Spread.of([r.valid_ppl_moe_bypassed for r in rows]).format(), gap.format("{:+.2f}"),
            Spread.of([_last(r.layer_curves.get("mean_gate")) for r in rows]).format("{:.3f}"),
            Spread.of([_last(r.layer_curves.get("load_cv")) for r in rows]).format("{:.3f}"),
            moved.format("{:.2f}"), agree.format("{:.1f}"), _start_peak(rows, "input_rms"),
            Spread.of([_peak(r.layer_curves.get("input_shared_fraction")) for r in rows]).format("{:.2f}"),
            _minimum(rows, "mean_gate"),
        ]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def _band(ax, curves, label, scale_x=1.0):
    xs, means, stds = mean_band(curves)
    if not xs:
        return
    xs = [x * scale_x for x in xs]
    line, = ax.plot(xs, means, label=label, linewidth=1.3)
    ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    color=line.get_color(), alpha=0.18, linewidth=0)


def plot_validation(runs: Runs, path: Path) -> Path:
    """Validation PPL vs training tokens and vs training wall time, mean ± std over seeds."""
    from stablemoe_megatron.analysis.plots import _save, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for variant, seeds in runs.items():
        _band(axes[0], [r.valid_curve for r in seeds.values()], variant, 1e-6)
        _band(axes[1], [r.valid_time_curve for r in seeds.values()], variant, 1 / 60)
    for ax, xlabel in zip(axes, ("training tokens (millions)", "training wall time (min, steps only)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("validation perplexity, mean ± std over seeds (band)")
    return _save(fig, path)


def plot_fluctuation_bands(runs: Runs, path: Path) -> Path:
    """% of probe tokens whose routed expert still changes after x % of training, mean ± std."""
    from stablemoe_megatron.analysis.plots import _save, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, seeds in runs.items():
        curves = [list(enumerate(r.fluctuation_curve)) for r in seeds.values() if r.fluctuation_curve]
        if curves:
            _band(ax, curves, variant)
    ax.set_xlabel("% of training")
    ax.set_ylabel("tokens whose expert still changes later (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("routing fluctuation, mean ± std over seeds")
    return _save(fig, path)


def plot_stage1(runs: Runs, path: Path) -> Path:
    """Stage-1 diagnostics over training: mean gate, load CV, moved tokens, agreement, MoE-skipped PPL gap."""
    from stablemoe_megatron.analysis.plots import _save, pyplot

    plt = pyplot()
    panels = [("mean gate", lambda r: r.layer_curves.get("mean_gate", [])),
              ("load CV (training batches)", lambda r: r.layer_curves.get("load_cv", [])),
              ("probe tokens that moved since the last probe", lambda r: r.probe_curves.get("changed_fraction", [])),
              ("distillation agreement (probe)", lambda r: r.probe_curves.get("distill_agreement", [])),
              ("valid PPL: MoE block skipped − with", _bypass_gap),
              ("MoE input RMS", lambda r: r.layer_curves.get("input_rms", [])),
              ("MoE input: shared-component share", lambda r: r.layer_curves.get("input_shared_fraction", [])),
              ("router weight row norm", lambda r: r.layer_curves.get("centroid_norm", []))]
    panels = [(title, getter) for title, getter in panels if any(getter(r) for s in runs.values() for r in s.values())]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, getter) in zip(axes, panels):
        for variant, seeds in runs.items():
            _band(ax, [getter(r) for r in seeds.values()], variant)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    return _save(fig, path)


def _bypass_gap(run: RunSummary) -> List:
    with_moe = dict((x, y) for x, y in run.valid_curve)
    tokens_per_iteration = run.valid_curve[0][0] // max(1, run.bypass_curve[0][0]) if run.bypass_curve and run.valid_curve else 1
    return [(it, ppl - with_moe[it * tokens_per_iteration]) for it, ppl in run.bypass_curve
            if it * tokens_per_iteration in with_moe]


def plot_all(runs: Runs, stage1_runs: Runs, out_dir: Path) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, func, subset in (("validation", plot_validation, runs), ("fluctuation", plot_fluctuation_bands, runs),
                              ("stage1", plot_stage1, stage1_runs)):
        if subset:
            written[key] = func(subset, out_dir / f"{key}.png")
    return written


def select(runs: Runs, names: Sequence[str]) -> Runs:
    return {name: runs[name] for name in names if name in runs}
