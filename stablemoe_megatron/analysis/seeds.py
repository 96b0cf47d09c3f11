"""Seeded comparisons: read finished runs' metrics, aggregate them over seeds, write tables.

A run is one trainer invocation's ``metrics.jsonl`` (see stablemoe_megatron.training.reporting);
:func:`read_run` turns it into a :class:`RunSummary` (final valid/test perplexity, the validation
curve against training tokens and training wall time, routing-probe and MoE-layer curves).
:func:`aggregate` groups runs by variant over seeds: mean and sample standard deviation
(``statistics.stdev``, n - 1), and the paired difference of each variant to a reference variant
(same seed = same initialisation seed and data order), whose spread over seeds says whether a
difference is larger than the seed-to-seed noise. A resumed run's metrics hold the records of the
interrupted attempt too: for each (kind, iteration) the last record wins.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


def read_jsonl(path: Path) -> List[dict]:
    """The JSON records of a file (missing file: []; a torn last line is skipped)."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def _last_per_iteration(records: Sequence[dict]) -> List[dict]:
    """Records sorted by iteration, the last one written for each iteration (resumed runs repeat some)."""
    by_iteration = {}
    for record in records:
        by_iteration[record["iteration"]] = record
    return [by_iteration[k] for k in sorted(by_iteration)]


@dataclass
class RunSummary:
    """What one finished run measured. Curves are lists of (x, y) pairs sorted by x."""

    valid_ppl: Optional[float] = None
    test_ppl: Optional[float] = None
    valid_ppl_moe_bypassed: Optional[float] = None
    tokens_per_sec: Optional[float] = None  # median over log intervals, the first one excluded
    train_seconds: Optional[float] = None  # training steps only (no evaluation, probes, saving)
    valid_curve: List[Tuple[int, float]] = field(default_factory=list)  # (training tokens, valid PPL)
    valid_time_curve: List[Tuple[float, float]] = field(default_factory=list)  # (training seconds, valid PPL)
    bypass_curve: List[Tuple[int, float]] = field(default_factory=list)  # (iteration, valid PPL, MoE skipped)
    train_loss_curve: List[Tuple[int, float]] = field(default_factory=list)
    layer_curves: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # mean_gate, load_cv, ...
    probe_curves: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # changed_fraction, agreement
    fluctuation: Dict[str, float] = field(default_factory=dict)  # after_20/50/80 (routed view, % of tokens)
    fluctuation_curve: List[float] = field(default_factory=list)  # 101 values, % of training 0..100


LAYER_FIELDS = ("mean_gate", "load_cv", "load_max_over_mean", "distill_agreement", "balance_loss",
                "distill_loss", "dropped_fraction", "input_rms", "input_shared_fraction", "centroid_norm")


def read_run(metrics_file: Path, tokens_per_iteration: int) -> RunSummary:
    """Summarise one run's metrics JSONL (the first MoE layer's statistics for the MoE curves)."""
    records = read_jsonl(metrics_file)
    run = RunSummary()
    steps = _last_per_iteration([r for r in records if "tokens_per_sec" in r and "split" not in r])
    seconds, previous, clock = 0.0, 0, {0: 0.0}
    for record in steps:
        seconds += record["elapsed_ms"] / 1000.0 * (record["iteration"] - previous)
        previous = record["iteration"]
        clock[previous] = seconds
        run.train_loss_curve.append((previous, record["lm_loss"]))
        for layer in list((record.get("moe_layers") or {}).values())[:1]:
            for name in LAYER_FIELDS:
                if layer.get(name) is not None:
                    run.layer_curves.setdefault(name, []).append((previous, layer[name]))
    run.train_seconds = seconds if steps else None
    speeds = [r["tokens_per_sec"] for r in steps[1:]] or [r["tokens_per_sec"] for r in steps]
    run.tokens_per_sec = statistics.median(speeds) if speeds else None
    for split in ("validation", "test", "validation_moe_bypassed"):
        evals = _last_per_iteration([r for r in records if r.get("split") == split])
        if not evals:
            continue
        setattr(run, {"validation": "valid_ppl", "test": "test_ppl"}.get(split, "valid_ppl_moe_bypassed"),
                evals[-1]["val_ppl"])
        if split == "validation":
            run.valid_curve = [(r["iteration"] * tokens_per_iteration, r["val_ppl"]) for r in evals]
            run.valid_time_curve = [(_clock_at(clock, r["iteration"]), r["val_ppl"]) for r in evals]
        elif split == "validation_moe_bypassed":
            run.bypass_curve = [(r["iteration"], r["val_ppl"]) for r in evals]
    _read_probes(run, records)
    return run


def _clock_at(clock: Dict[int, float], iteration: int) -> float:
    """Training seconds at ``iteration`` (linear between logged iterations)."""
    if iteration in clock:
        return clock[iteration]
    keys = sorted(clock)
    below = max((k for k in keys if k < iteration), default=0)
    above = min((k for k in keys if k > iteration), default=below)
    if above == below:
        return clock[below]
    return clock[below] + (clock[above] - clock[below]) * (iteration - below) / (above - below)


def _read_probes(run: RunSummary, records: Sequence[dict]) -> None:
    probes = _last_per_iteration([r["routing_probe"] for r in records if "routing_probe" in r])
    for probe in probes:
        layer = probe["layers"][0]
        for name in ("changed_fraction", "distill_agreement"):
            if layer.get(name) is not None:
                run.probe_curves.setdefault(name, []).append((probe["iteration"], layer[name]))
    finals = [r["routing_fluctuation"] for r in records if "routing_fluctuation" in r]
    if finals:
        layers = finals[-1]["layers"]
        routed = [e for e in layers if e.get("view") == "routed"] or layers
        run.fluctuation = {f"after_{p}": statistics.mean(e[f"after_{p}"] for e in routed) for p in (20, 50, 80)}
        run.fluctuation_curve = list(routed[0].get("curve") or [])


def value_at(curve: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """The last y of ``curve`` at or before ``x`` (None if none)."""
    ys = [y for cx, y in curve if cx <= x]
    return ys[-1] if ys else None


# ------------------------------------------------------------------------------------------------
# over seeds
# ------------------------------------------------------------------------------------------------
@dataclass
class Spread:
    """Mean, sample standard deviation (None for one value) and count of some values."""

    mean: Optional[float]
    std: Optional[float]
    n: int

    @classmethod
    def of(cls, values: Sequence[Optional[float]]) -> "Spread":
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return cls(None, None, 0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def format(self, spec: str = "{:.2f}") -> str:
        if self.mean is None:
            return "-"
        text = spec.format(self.mean)
        return text if self.std is None else f"{text} ± {spec.replace('+', '').format(self.std)}"

    def sigmas(self) -> Optional[float]:
        """mean / std: how many seed standard deviations the mean is from zero (a paired difference)."""
        if self.mean is None or not self.std:
            return None
        return self.mean / self.std


def paired(runs: Dict[int, RunSummary], reference: Dict[int, RunSummary], metric: str) -> Spread:
    """Spread over the seeds both have of ``metric(run) - metric(reference run)``."""
    diffs = []
    for seed in sorted(set(runs) & set(reference)):
        a, b = getattr(runs[seed], metric), getattr(reference[seed], metric)
        if a is not None and b is not None:
            diffs.append(a - b)
    return Spread.of(diffs)


def aggregate(runs: Dict[str, Dict[int, RunSummary]], reference: str, metrics: Sequence[str]) -> Dict[str, dict]:
    """{variant: {metric: Spread, "vs_<reference>:<metric>": paired Spread}} over seeds."""
    out = {}
    for variant, seeds in runs.items():
        row = {metric: Spread.of([getattr(run, metric) for run in seeds.values()]) for metric in metrics}
        if reference in runs and variant != reference:
            for metric in metrics:
                row[f"vs_{reference}:{metric}"] = paired(seeds, runs[reference], metric)
        row["seeds"] = sorted(seeds)
        out[variant] = row
    return out


def mean_band(curves: Sequence[Sequence[Tuple[float, float]]]):
    """(xs, mean, std) over curves at the x values all curves share (x of the first curve when the
    others differ only slightly: wall-time curves are averaged by position)."""
    curves = [c for c in curves if c]
    if not curves:
        return [], [], []
    length = min(len(c) for c in curves)
    xs = [statistics.fmean(c[i][0] for c in curves) for i in range(length)]
    ys = [[c[i][1] for c in curves] for i in range(length)]
    means = [statistics.fmean(v) for v in ys]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
    return xs, means, stds
