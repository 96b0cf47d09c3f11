"""PNG plots of routing histories (matplotlib, a dependency of the package, imported lazily so the
trainer never loads it).

Each function takes :class:`~stablemoe_megatron.analysis.report.RunData` objects and a PNG path,
draws with the Agg backend (no display needed) and returns the path, or None when there is
nothing to draw. Plots over iterations mark each run's StableMoE stage switch (stage 1 -> 2,
:func:`.history.stage_switch_iteration`) with a dashed vertical line and a legend entry, since the
routing is expected to stop changing there; expert axes have integer ticks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from stablemoe_megatron.errors import ConfigError


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a ConfigError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("the routing report draws its plots with matplotlib, which is not installed: "
                          "pip install matplotlib (stablemoe-megatron depends on it; reinstalling the "
                          "package installs it too)") from exc
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def mark_stage_switches(ax, runs, position: Callable = lambda run, iteration: iteration,
                        legend: bool = True, color: str = "0.35", where: str = "") -> int:
    """Dashed vertical lines at the runs' stage switches (one per position, naming the runs there);
    ``position(run, iteration)`` maps a switch to the x axis, ``where`` (formatted with ``x``) adds
    that position to the legend entry. Returns the number of lines drawn."""
    at: Dict[float, List[tuple]] = {}
    for run in runs:
        if run.switch_iteration is not None:
            at.setdefault(float(position(run, run.switch_iteration)), []).append((run.name, run.switch_iteration))
    for x, found in sorted(at.items()):
        iterations = sorted({iteration for _, iteration in found})
        label = f"stage 1 → 2 switch at iteration {', '.join(map(str, iterations))}" + where.format(x=x)
        if len(runs) > 1:
            label += f" ({', '.join(name for name, _ in found)})"
        ax.axvline(x, color=color, linestyle="--", linewidth=1.2, label=label if legend else None)
    return len(at)


def _percent_of_training(run, iteration: int) -> float:
    final = run.curves.get("final_iteration") or iteration
    return 100.0 * iteration / final


def plot_fluctuation(runs, path: Path) -> Optional[Path]:
    """All runs' last-fluctuation curves (routed view, every MoE layer) on one axes, like paper
    Figure 7, with the stage switches at their % of training."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    several_layers = any(len(run.history.layout.layers) > 1 for run in runs)
    drawn = 0
    for run in runs:
        for entry in run.curves["layers"]:
            if entry["view"] != "routed":
                continue
            label = run.name + (f" (layer {entry['layer']})" if several_layers else "")
            ax.plot(run.curves["percents"], entry["curve"], label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    mark_stage_switches(ax, runs, _percent_of_training, where=" = {x:.3g}% of training")
    ax.set_xlabel("x (% of training)")
    ax.set_ylabel("% of probe tokens whose last\nexpert change is after x% of training")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Routing fluctuation (cf. paper Fig. 7)")
    return _save(fig, path)


def plot_load(run, path: Path) -> Optional[Path]:
    """Expert load over time per MoE layer: load/mean per expert (heat map) and CV, max/mean (lines),
    with the stage switch marked on both."""
    from matplotlib.ticker import MaxNLocator

    series = run.load_series()
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(series), 2, figsize=(10, 3.2 * len(series)), squeeze=False)
    for row, (layer, (iterations, loads, source)) in enumerate(sorted(series.items())):
        heat_ax, line_ax = axes[row]
        mean = loads.mean(axis=1, keepdims=True)
        relative = np.divide(loads, mean, out=np.zeros_like(loads), where=mean > 0)
        right = iterations[-1] if iterations[-1] > iterations[0] else iterations[0] + 1
        heat = heat_ax.imshow(relative.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                              extent=(iterations[0], right, -0.5, loads.shape[1] - 0.5))
        fig.colorbar(heat, ax=heat_ax, label="load / mean")
        heat_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        heat_ax.set_ylabel("expert")
        heat_ax.set_xlabel("iteration")
        heat_ax.set_title(f"{run.name} layer {layer}: tokens per expert ({source})", fontsize=9)
        mark_stage_switches(heat_ax, [run], legend=False, color="white")
        cv = loads.std(axis=1) / np.maximum(loads.mean(axis=1), 1e-12)
        peak = loads.max(axis=1) / np.maximum(loads.mean(axis=1), 1e-12)
        line_ax.plot(iterations, cv, label="coefficient of variation")
        line_ax.plot(iterations, peak, label="max / mean")
        line_ax.plot(iterations, (loads == 0).sum(axis=1), label="dead experts", linestyle=":")
        mark_stage_switches(line_ax, [run])
        line_ax.set_xlabel("iteration")
        line_ax.grid(alpha=0.3)
        line_ax.legend(fontsize=8)
    return _save(fig, path)


def plot_agreement(runs, path: Path) -> Optional[Path]:
    """Distillation agreement (distilled router vs the learned router's choice) over time, with the
    stage switches (after which the distilled router is frozen and routes)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for run in runs:
        for layer, (iterations, values) in sorted(run.probe_series("distill_agreement").items()):
            ax.plot(iterations, 100 * values, marker=".", label=f"{run.name} layer {layer} (probe tokens)")
            drawn += 1
        for layer, (iterations, values) in sorted(run.training_series("distill_agreement").items()):
            ax.plot(iterations, 100 * values, linestyle="--", alpha=0.7,
                    label=f"{run.name} layer {layer} (training batches, stage 1)")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    mark_stage_switches(ax, runs)
    ax.set_xlabel("iteration")
    ax.set_ylabel("% of tokens: distilled router = learned router")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Distillation agreement")
    return _save(fig, path)


def draw_all(runs: List, out_dir: Path) -> dict:
    """{name: path} of every plot drawn into ``out_dir``."""
    out = {}
    path = plot_fluctuation(runs, out_dir / "fluctuation.png")
    if path:
        out["fluctuation"] = path
    path = plot_agreement(runs, out_dir / "agreement.png")
    if path:
        out["agreement"] = path
    for run in runs:
        path = plot_load(run, out_dir / f"load_{run.slug}.png")
        if path:
            out[f"load_{run.slug}"] = path
    return out
