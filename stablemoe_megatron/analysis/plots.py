"""PNG plots of routing histories (matplotlib, imported lazily: ``pip install stablemoe-megatron[report]``).

Each function takes :class:`~stablemoe_megatron.analysis.report.RunData` objects and a PNG path,
draws with the Agg backend (no display needed) and returns the path, or None when there is
nothing to draw.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

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
                          "pip install 'stablemoe-megatron[report]' (or: pip install matplotlib)") from exc
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_fluctuation(runs, path: Path) -> Optional[Path]:
    """All runs' SPEC-5 curves (routed view, every MoE layer) on one axes, like paper Figure 7."""
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
    ax.set_xlabel("x (% of training)")
    ax.set_ylabel("% of probe tokens whose last\nexpert change is after x% of training")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Routing fluctuation (SPEC 5; cf. paper Fig. 7)")
    return _save(fig, path)


def plot_load(run, path: Path) -> Optional[Path]:
    """Expert load over time per MoE layer: load/mean per expert (heat map) and CV, max/mean (lines)."""
    series = run.load_series()
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(series), 2, figsize=(10, 3.2 * len(series)), squeeze=False)
    for row, (layer, (iterations, loads, source)) in enumerate(sorted(series.items())):
        mean = loads.mean(axis=1, keepdims=True)
        relative = np.divide(loads, mean, out=np.zeros_like(loads), where=mean > 0)
        right = iterations[-1] if iterations[-1] > iterations[0] else iterations[0] + 1
        heat = axes[row][0].imshow(relative.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                                   extent=(iterations[0], right, -0.5, loads.shape[1] - 0.5))
        fig.colorbar(heat, ax=axes[row][0], label="load / mean")
        axes[row][0].set_ylabel("expert")
        axes[row][0].set_xlabel("iteration")
        axes[row][0].set_title(f"{run.name} layer {layer}: tokens per expert ({source})", fontsize=9)
        cv = loads.std(axis=1) / np.maximum(loads.mean(axis=1), 1e-12)
        peak = loads.max(axis=1) / np.maximum(loads.mean(axis=1), 1e-12)
        axes[row][1].plot(iterations, cv, label="coefficient of variation")
        axes[row][1].plot(iterations, peak, label="max / mean")
        axes[row][1].plot(iterations, (loads == 0).sum(axis=1), label="dead experts", linestyle=":")
        axes[row][1].set_xlabel("iteration")
        axes[row][1].grid(alpha=0.3)
        axes[row][1].legend(fontsize=8)
    return _save(fig, path)


def plot_agreement(runs, path: Path) -> Optional[Path]:
    """Distillation agreement (distilled router vs the learned router's choice) over time."""
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
