"""The routing report over one or more runs: PNG plots and ``report.md``.

Each run is named by its run directory (RUN_DIR of the recipes), its ``--save`` directory or its
``routing_probe/`` directory; :func:`.locate.locate_history` finds the probe history (see
:mod:`.history`) and the run. The iteration records of the metrics JSONL named in the history's
``meta.json`` (else any ``*.jsonl`` beside ``routing_probe/`` or in RUN_DIR) give the
training-time expert load and distillation agreement. The report goes to ``RUN_DIR/routing_report/``
of the first run unless another directory is given.

The report holds: the runs; the routing-fluctuation values (the % of probe tokens whose last
expert change comes after 20/50/80% of training, :mod:`.fluctuation`) with all runs' curves on
one plot (paper Figure 7); expert load over time and the last logged load statistics;
distillation agreement over time; the StableMoE stage switch marked on the plots over time; and,
like paper Table 9, the most frequent probe tokens of every expert under the final recorded
routing, decoded through the run's tokenizer.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from stablemoe_megatron.analysis.fluctuation import QUOTED, history_curves
from stablemoe_megatron.analysis.history import CONFIG, CURVE, ProbeHistory, stage_switch_iteration
from stablemoe_megatron.analysis.locate import RunLocation, locate_history

REPORT_DIR = "routing_report"   # default output directory, inside the first run's directory

LOAD_KEYS = ("load_min", "load_max", "load_mean", "load_cv", "load_max_over_mean", "dead_experts",
             "dropped_fraction")


@dataclass
class RunData:
    """One run: its probe history, fluctuation curves, metric records and (optionally) tokenizer."""

    name: str
    path: Path                                          # the run directory (RUN_DIR)
    history: ProbeHistory                               # read from history.directory (routing_probe/)
    curves: dict
    metrics: List[dict] = field(default_factory=list)   # iteration records with "moe_layers"
    tokenizer: Optional[object] = None
    tokenizer_note: Optional[str] = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_") or "run"

    @property
    def switch_iteration(self) -> Optional[int]:
        """The stage 1 -> 2 switch seen in the probe records (None: no switch recorded)."""
        return stage_switch_iteration(self.history.records, self.history.meta.get("stage2_start_iter"))

    def probe_series(self, key: str) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """{layer: (iterations, values)} of a per-layer probe-record field, where present."""
        out: Dict[int, Tuple[list, list]] = {}
        for record in self.history.records:
            for entry in record["layers"]:
                if entry.get(key) is not None:
                    its, values = out.setdefault(entry["layer"], ([], []))
                    its.append(record["iteration"])
                    values.append(entry[key])
        return {k: (np.asarray(a), np.asarray(b, dtype=float)) for k, (a, b) in out.items()}

    def training_series(self, key: str) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """{layer: (iterations, values)} of a scalar in the logged ``moe_layers``, where present."""
        out: Dict[int, Tuple[list, list]] = {}
        for record in self.metrics:
            for layer, values in record["moe_layers"].items():
                if key in values:
                    its, vals = out.setdefault(int(layer), ([], []))
                    its.append(record["iteration"])
                    vals.append(values[key])
        return {k: (np.asarray(a), np.asarray(b, dtype=float)) for k, (a, b) in out.items()}

    def load_series(self) -> Dict[int, Tuple[np.ndarray, np.ndarray, str]]:
        """{layer: (iterations [K], tokens per expert [K, N], source)}: training logs, else probes."""
        series: Dict[int, list] = {}
        source = "training batches"
        for record in self.metrics:
            for layer, values in record["moe_layers"].items():
                if "tokens_per_expert" in values:
                    series.setdefault(int(layer), []).append((record["iteration"], values["tokens_per_expert"]))
        if not series:
            source = "probe tokens"
            for record in self.history.records:
                for entry in record["layers"]:
                    series.setdefault(entry["layer"], []).append((record["iteration"], entry["tokens_per_expert"]))
        return {k: (np.asarray([i for i, _ in v]), np.asarray([c for _, c in v], dtype=float), source)
                for k, v in series.items()}

    def last_load_statistics(self) -> Dict[int, dict]:
        """{layer: the load statistics of the last logged interval}."""
        out = {}
        for record in self.metrics:
            for layer, values in record["moe_layers"].items():
                if "load_cv" in values:
                    stats = {k: values[k] for k in LOAD_KEYS if k in values}
                    out[int(layer)] = dict(stats, iteration=record["iteration"])
        return out


def _metric_records(location: RunLocation, meta: dict) -> List[dict]:
    """Iteration records (last one per iteration wins, as after a resume) of the run's metrics JSONL:
    the one named in meta.json, else one beside routing_probe/ or in the run directory (moved runs)."""
    candidates = [Path(meta["metrics_file"])] if meta.get("metrics_file") else []
    candidates += sorted(location.probe_dir.parent.glob("*.jsonl")) + sorted(location.run_dir.glob("*.jsonl"))
    for path in candidates:
        if path.is_file():
            by_iteration = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(record, dict) and "moe_layers" in record and "iteration" in record:
                    by_iteration[record["iteration"]] = record
            return [by_iteration[k] for k in sorted(by_iteration)]
    return []


def _tokenizer(directory: Path, tokenizer_model: Optional[str]):
    """(tokenizer or None, note) from the run's saved configuration."""
    from stablemoe_megatron.cli_args import config_from_yaml_text
    from stablemoe_megatron.data import tokenizer_from_config

    try:
        config = config_from_yaml_text((directory / CONFIG).read_text())
        if tokenizer_model:
            config.data.tokenizer_model = tokenizer_model
        return tokenizer_from_config(config.data), None
    except Exception as exc:  # noqa: BLE001 - any failure only means ids are shown instead of text
        return None, f"token ids shown: the run's tokenizer could not be loaded ({exc})"


def load_run(path, name: Optional[str] = None, tokenizer_model: Optional[str] = None) -> RunData:
    """Read one run: ``path`` is a run, save or routing_probe directory, or a :class:`RunLocation`."""
    location = path if isinstance(path, RunLocation) else locate_history(path)
    directory = location.probe_dir
    history = ProbeHistory.load(directory)
    curves = None
    if (directory / CURVE).is_file():
        curves = json.loads((directory / CURVE).read_text())
        if curves.get("num_probes") != len(history.records):
            curves = None  # written before more probes were added (a resumed run): recompute
    curves = curves or history_curves(history, history.meta.get("train_iters"))
    tokenizer, note = _tokenizer(directory, tokenizer_model)
    return RunData(name or location.name, location.run_dir, history, curves,
                   _metric_records(location, history.meta), tokenizer, note)


# -- markdown --------------------------------------------------------------------------------------
def _token_text(tokenizer, token_id: int) -> str:
    """A markdown code span of the token as the tokenizer writes it: its piece where the tokenizer
    has pieces (SentencePiece ``▁the`` = " the", GPT-2 ``Ġthe``; a single decoded piece would lose
    that leading space), else its decoded text; blank or unprintable text is repr-escaped."""
    if tokenizer is None:
        return f"`{int(token_id)}`"
    to_piece = getattr(tokenizer, "id_to_piece", None)
    text = to_piece(int(token_id)) if to_piece is not None else tokenizer.detokenize([int(token_id)])
    if not text.strip() or text != text.strip() or not text.isprintable():
        text = repr(text)[1:-1]
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def token_table(run: RunData, layer: int, top_k: int) -> List[str]:
    """Markdown rows: for each expert, its probe-token count and most frequent tokens (final routing)."""
    history = run.history
    if not history.records:
        return ["(no probes recorded)"]
    routed = history.all_choices()[-1][history.layout.slots.index((layer, "routed"))].astype(np.int64)
    tokens = history.tokens.astype(np.int64)
    lines = ["| expert | probe tokens | most frequent tokens (count) |", "|---:|---:|---|"]
    for expert in range(history.layout.num_experts):
        mine = tokens[routed == expert]
        common = Counter(mine.tolist()).most_common(top_k)
        cells = ", ".join(f"{_token_text(run.tokenizer, t)} ({c})" for t, c in common) or "-"
        lines.append(f"| {expert} | {mine.size} | {cells} |")
    unrouted = int(np.count_nonzero(routed == history.layout.none_value))
    if unrouted:
        lines.append(f"| none | {unrouted} | (tokens no expert picked) |")
    return lines


def _runs_section(runs: Sequence[RunData]) -> List[str]:
    lines = ["## Runs", "", "| run | probe history | router | experts | MoE layer numbers | probes | probe tokens | "
             "interval | last probe | stage switch |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        meta, records = run.history.meta, run.history.records
        switch = run.switch_iteration
        lines.append(f"| {run.name} | {run.history.directory} | {meta.get('router', '?')} | "
                     f"{run.history.layout.num_experts} | {', '.join(map(str, run.history.layout.layers))} | "
                     f"{len(records)} | {run.history.layout.num_tokens} | {meta.get('interval', '?')} | "
                     f"{records[-1]['iteration'] if records else '-'} | {'-' if switch is None else switch} |")
    return lines + [""]


def _fluctuation_section(runs: Sequence[RunData], plots: dict) -> List[str]:
    lines = ["## Routing fluctuation", "",
             "Percentage of probe tokens whose last expert change happens after x% of training (a token's "
             "last fluctuation step is the last probe at which its expert differs from its final expert; "
             "training ends at the last probe). Paper, BASE layer: 40.9 / 29.1 / 15.4; StableMoE: no change "
             "in stage 2.", ""]
    if "fluctuation" in plots:
        lines += [f"![routing fluctuation]({plots['fluctuation'].name})", ""]
    lines += ["| run | layer | view | " + " | ".join(f"after {x}%" for x in QUOTED) + " |",
              "|---|---:|---|" + "---:|" * len(QUOTED)]
    for run in runs:
        for entry in run.curves["layers"]:
            values = " | ".join(f"{entry[f'after_{x}']:.1f}" for x in QUOTED)
            lines.append(f"| {run.name} | {entry['layer']} | {entry['view']} | {values} |")
    return lines + [""]


def _load_section(runs: Sequence[RunData], plots: dict) -> List[str]:
    lines = ["## Expert load", ""]
    for run in runs:
        if f"load_{run.slug}" in plots:
            lines += [f"![expert load of {run.name}]({plots[f'load_{run.slug}'].name})", ""]
        stats = run.last_load_statistics()
        if stats:
            lines += [f"Last logged interval of **{run.name}** (tokens per expert per step):", "",
                      "| layer | iteration | min | max | mean | CV | max/mean | dead experts | dropped |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for layer, s in sorted(stats.items()):
                lines.append(f"| {layer} | {s['iteration']} | {s['load_min']:.1f} | {s['load_max']:.1f} | "
                             f"{s['load_mean']:.1f} | {s['load_cv']:.3f} | {s['load_max_over_mean']:.2f} | "
                             f"{s['dead_experts']} | {s.get('dropped_fraction', 0.0):.3f} |")
            lines.append("")
    return lines


def render_markdown(runs: Sequence[RunData], plots: dict, top_k: int) -> str:
    """The whole report as markdown (plots referenced by file name, beside report.md)."""
    lines = ["# Routing report", ""] + _runs_section(runs) + _fluctuation_section(runs, plots)
    lines += _load_section(runs, plots)
    lines += ["## Distillation agreement", ""]
    lines += [f"![distillation agreement]({plots['agreement'].name})", ""] if "agreement" in plots \
        else ["No run has a distilled router.", ""]
    lines += ["## Most frequent tokens per expert (cf. paper Table 9)", ""]
    for run in runs:
        for layer in run.history.layout.layers:
            last = run.history.records[-1]["iteration"] if run.history.records else "-"
            lines += [f"### {run.name}, layer {layer} (routing at iteration {last})", ""]
            if run.tokenizer_note:
                lines += [f"_{run.tokenizer_note}_", ""]
            elif getattr(run.tokenizer, "id_to_piece", None) is not None:
                lines += ["_Tokens as the tokenizer's pieces (SentencePiece ▁ / GPT-2 Ġ mark a leading space)._", ""]
            lines += token_table(run, layer, top_k) + [""]
    return "\n".join(lines)


def write_report(paths: Sequence, out_dir=None, names: Optional[Sequence[str]] = None, top_k: int = 10,
                 tokenizer_model: Optional[str] = None) -> dict:
    """Load the runs, draw the plots and write ``report.md`` into ``out_dir`` (default: the first
    run's ``RUN_DIR/routing_report/``, so reports of different runs never overwrite each other);
    {name: path} written. Every run is located before anything is written."""
    from stablemoe_megatron.analysis.plots import draw_all

    locations = [locate_history(p) for p in paths]
    names = list(names) if names else _default_names(locations)
    runs = [load_run(loc, n, tokenizer_model) for loc, n in zip(locations, names)]
    out_dir = Path(out_dir) if out_dir is not None else locations[0].run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_all(runs, out_dir)
    report = out_dir / "report.md"
    report.write_text(render_markdown(runs, plots, top_k), encoding="utf-8")
    return dict(plots, report=report)


def _default_names(locations: Sequence[RunLocation]) -> List[str]:
    """Run directory names, with the parent added where two runs share one."""
    dirs = [loc.run_dir.resolve() for loc in locations]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    return names
