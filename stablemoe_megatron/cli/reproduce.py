"""Small-scale reproduction of the paper's comparisons on the bundled corpus (CPU: 2 cores, ~40-50 min).

    python tools/reproduce.py [--output runs/reproduce] [--variants dense switch ...] [--nproc 2]
    bash examples/reproduce_paper_cpu.sh      # prepares the corpus first, then this

Trains every variant at equal compute (below) with the trainer (``torchrun -m
stablemoe_megatron.train``), one after the other, then writes into ``--output``:

* ``results.md`` / ``results.json``: valid and test perplexity, training tokens/s, routing
  fluctuation (docs/ALGORITHMS.md §5: % of probe tokens whose routed expert still changes after 20 / 50 / 80 % of
  training), wall time, and the exact command of every run;
* ``report/``: the routing report of the MoE runs (``stablemoe-routing-report``: fluctuation
  curves on one axes, expert load, distillation agreement) and ``loss_curves.png``;
* one directory per variant with its ``train.log``, ``metrics.jsonl`` and ``routing_probe/``.

Equal compute: every variant sees the same tokens in the same order (same seed, data, global
batch and iterations), with the same shared backbone (``configs/tiny.yaml``, the recipes' ``SIZE=tiny``:
4 layers, d 128, FFN 512, 4 heads, seq 128, global batch 32, Adam (0.9, 0.98), lr 1e-3 with linear
decay, clip 0.1, dropout 0; here with 10 % warm-up and one evaluation at the end). All MoE variants add ONE
MoE block after block L/2 of N=4 experts, each a stack of K=2 FFN sublayers, and are top-1
(one expert stack per token: the same active FLOPs), except Expert Choice, run with capacity
factor 1 (k = T/N tokens per expert: the same expert FLOPs per batch, on average one expert per
token). ``dense`` is the paper's "Standard Transformer": the backbone without the MoE block, i.e.
equal shared parameters but FEWER FLOPs; ``dense-ffn`` (optional, ``--variants ... dense-ffn``)
is the equal-FLOPs dense control: the same block with ONE expert (every token through the same K
FFN sublayers, gate 1).

A variant whose directory already holds a finished run (a test-perplexity record) is reused, so an
interrupted reproduction continues where it stopped; ``--fresh`` deletes the output first.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stablemoe_megatron.runtime import free_port
from stablemoe_megatron.size_configs import load_size, to_flags

PROG = "reproduce"
REPO = Path(__file__).resolve().parents[2]

# the size of every variant: configs/tiny.yaml (the recipes' SIZE=tiny), except the iterations, the warm-up,
# the evaluation schedule and the seed (train_flags)
SIZE = "tiny"


@functools.lru_cache(maxsize=None)
def _size() -> dict:
    return load_size(SIZE)


def tiny_size() -> dict:
    """configs/tiny.yaml as {section: {field: value}} (a copy)."""
    return copy.deepcopy(_size())

# name -> (paper's name, MoE flags); "{stage2}" is replaced by 10 % of the iterations
VARIANTS: "OrderedDict[str, tuple]" = OrderedDict([
    ("dense", ("Standard Transformer (no MoE block)", [])),
    ("switch", ("Switch Transformer", ["--moe-router", "switch", "--moe-aux-loss-coeff", "0.01"])),
    ("base", ("BASE Layer", ["--moe-router", "base"])),
    ("hash", ("Hash Layer (random table)", ["--moe-router", "hash", "--moe-hash-table", "random"])),
    ("expert-choice", ("Expert Choice (c = 1)", ["--moe-router", "expert-choice", "--moe-expert-capacity-factor", "1"])),
    ("stablemoe", ("StableMoE (stage 2 from 10 %)", ["--moe-router", "stablemoe", "--moe-balance-loss-coeff", "0.3",
                                                     "--moe-distill-router", "wordemb", "--moe-distill-dim", "50",
                                                     "--moe-stage2-start-iter", "{stage2}"])),
    ("stablemoe-stage1", ("StableMoE stage 1 only", ["--moe-router", "stablemoe", "--moe-balance-loss-coeff", "0.3",
                                                     "--moe-distill-router", "wordemb", "--moe-distill-dim", "50"])),
    ("base-distill-freeze", ("BASE + distil-and-freeze (10 %)", ["--moe-router", "base", "--moe-distill-router", "wordemb",
                                                                  "--moe-distill-dim", "50", "--moe-stage2-start-iter",
                                                                  "{stage2}"])),
    ("dense-ffn", ("dense + K FFN sublayers (equal FLOPs)", ["--moe-router", "hash"])),
])
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "dense-ffn"]
# paper Table 2 / Table 5 (base size, valid / test PPL), for the table's last column
PAPER_PPL = {"dense": (23.02, 22.58), "switch": (19.79, 19.20), "base": (20.04, 19.69), "hash": (19.63, 19.25),
             "stablemoe": (19.28, 18.93), "stablemoe-stage1": (19.48, None), "base-distill-freeze": (19.41, None)}


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def train_flags(name: str, run_dir: Path, args) -> List[str]:
    """Trainer flags of one variant (see the module doc for what is shared)."""
    data, iters = Path(args.data_dir), args.train_iters
    size = tiny_size()
    moe_shape = size.pop("moe")  # the MoE variants' experts and sublayers (below)
    size.pop("checkpoint", None)  # checkpoints only with --keep-checkpoints (below)
    size["optimizer"]["lr_warmup_iters"] = max(1, iters // 10)
    size["training"].update(train_iters=iters, eval_interval=iters, eval_iters=args.eval_iters, seed=args.seed)
    flags = [*to_flags(size),
             "--data-path", data / "corpus_train_text_document", "--split", "100,0,0",
             "--valid-data-path", data / "corpus_valid_text_document",
             "--test-data-path", data / "corpus_test_text_document",
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data / "spm.model",
             "--metrics-file", run_dir / "metrics.jsonl"]
    if args.keep_checkpoints:  # the probe history then lives under the --save directory
        flags += ["--save", run_dir / "checkpoints", "--save-interval", iters]
    _, moe = VARIANTS[name]
    if moe:
        experts = 1 if name == "dense-ffn" else moe_shape["num_experts"]
        ep = min(experts, args.nproc)
        flags += ["--num-experts", experts, "--moe-layer-positions", "middle",
                  "--moe-sublayers-per-expert", moe_shape["sublayers_per_expert"], "--expert-model-parallel-size", ep]
        flags += [f.replace("{stage2}", str(max(1, iters // 10))) for f in moe]
        flags += ["--routing-probe-interval", args.probe_interval, "--routing-probe-tokens", args.probe_tokens]
    return [str(f) for f in flags]


def launcher(nproc: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "stablemoe_megatron.train"]


def finished(run_dir: Path) -> bool:
    return any(r.get("split") == "test" for r in read_jsonl(run_dir / "metrics.jsonl"))


def probe_root(run_dir: Path) -> Path:
    """Where the trainer put the routing-probe history: the --save directory if any, else the run's."""
    saved = run_dir / "checkpoints"
    return saved if (saved / "routing_probe").is_dir() else run_dir


def run_variant(name: str, run_dir: Path, args, log=print) -> dict:
    """Train one variant (or reuse a finished run); returns {"command", "wall_s", "reused"}."""
    meta_path = run_dir / "run.json"
    if finished(run_dir) and meta_path.exists():
        log(f"{PROG}: {name}: reusing the finished run in {run_dir}")
        return dict(json.loads(meta_path.read_text()), reused=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = launcher(args.nproc) + train_flags(name, run_dir, args)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    log(f"{PROG}: {name}: training ({args.train_iters} iterations, {args.nproc} process(es)) -> {run_dir}/train.log")
    start = time.perf_counter()
    load_start = os.getloadavg()
    with open(run_dir / "train.log", "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"{name}: the trainer exited with {proc.returncode} after {wall:.0f} s; "
                           f"last lines of {run_dir}/train.log:\n" + "\n".join(tail))
    meta = {"command": " ".join(command[1:]), "wall_s": wall, "nproc": args.nproc,
            "load_average": {"start": load_start, "end": os.getloadavg()}}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"{PROG}: {name}: done in {wall / 60:.1f} min")
    return dict(meta, reused=False)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def summarize(name: str, run_dir: Path, meta: dict) -> dict:
    """The table row of one finished run."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    evals = {r["split"]: r for r in records if "split" in r}
    iters = [r for r in records if "tokens_per_sec" in r and "split" not in r]
    speeds = [r["tokens_per_sec"] for r in iters[1:]] or [r["tokens_per_sec"] for r in iters]
    row = {"variant": name, "paper_name": VARIANTS[name][0],
           "valid_ppl": evals.get("validation", {}).get("val_ppl"), "test_ppl": evals.get("test", {}).get("val_ppl"),
           "valid_loss": evals.get("validation", {}).get("val_loss"), "test_loss": evals.get("test", {}).get("val_loss"),
           "tokens_per_sec": statistics.median(speeds) if speeds else None,
           "tokens_per_sec_quartiles": _quartiles(speeds), "final_train_loss": iters[-1]["lm_loss"] if iters else None,
           "wall_s": meta.get("wall_s"), "command": meta.get("command"), "fluctuation": None}
    fluct = [r["routing_fluctuation"] for r in records if "routing_fluctuation" in r]
    if fluct:
        layers = fluct[-1]["layers"]
        routed = [entry for entry in layers if entry.get("view") == "routed"] or layers
        row["fluctuation"] = {f"after_{p}": statistics.mean(e[f"after_{p}"] for e in routed) for p in (20, 50, 80)}
        row["fluctuation_views"] = {f"layer{e['layer']}/{e['view']}": {f"after_{p}": e[f"after_{p}"] for p in (20, 50, 80)}
                                    for e in layers}
        row["num_probes"] = fluct[-1].get("num_probes")
        row["probe_tokens"] = fluct[-1].get("num_tokens")
    row["loss_curve"] = [(r["iteration"], r["lm_loss"]) for r in iters]
    return row


def _loads(out: Path) -> dict:
    """Load averages recorded at the start and end of every run (a shared machine slows tokens/s)."""
    return {d.name: json.loads((d / "run.json").read_text()).get("load_average")
            for d in sorted(out.iterdir()) if (d / "run.json").exists()}


def _quartiles(values):
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def _fmt(value, spec="{:.2f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}%"  # the trainer records percentages


def results_table(rows: Sequence[dict]) -> str:
    header = ["variant", "valid PPL", "test PPL", "tokens/s (median)", "fluct. >20%", ">50%", ">80%",
              "wall (min)", "paper valid / test PPL (base size)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        fl = r["fluctuation"] or {}
        paper = PAPER_PPL.get(r["variant"])
        paper_s = "-" if paper is None else " / ".join("-" if x is None else f"{x:.2f}" for x in paper)
        lines.append("| " + " | ".join([
            f"{r['variant']} ({r['paper_name']})", _fmt(r["valid_ppl"]), _fmt(r["test_ppl"]),
            _fmt(r["tokens_per_sec"], "{:,.0f}"), _pct(fl.get("after_20")), _pct(fl.get("after_50")),
            _pct(fl.get("after_80")), _fmt(None if r["wall_s"] is None else r["wall_s"] / 60, "{:.1f}"), paper_s,
        ]) + " |")
    return "\n".join(lines)


def plot_loss_curves(rows: Sequence[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    reference = next((dict(r["loss_curve"]) for r in rows if r["variant"] == "dense" and r["loss_curve"]), None)
    fig, axes = plt.subplots(1, 2 if reference else 1, figsize=(12 if reference else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for r in rows:
        if r["loss_curve"]:
            xs, ys = zip(*r["loss_curve"])
            ax.plot(xs, ys, label=r["variant"], linewidth=1.2)
            if reference:
                pts = [(x, y - reference[x]) for x, y in r["loss_curve"] if x in reference]
                axes[0][1].plot(*zip(*pts), label=r["variant"], linewidth=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training LM loss (mean of the log interval)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training loss (equal tokens, same order)")
    if reference:
        axes[0][1].set_xlabel("iteration")
        axes[0][1].set_ylabel("loss - dense loss (same batches)")
        axes[0][1].axhline(0.0, color="black", linewidth=0.6)
        axes[0][1].grid(alpha=0.3)
        axes[0][1].set_title("difference to the dense model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_info() -> dict:
    import platform

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    return info


def write_results(rows: Sequence[dict], out: Path, args, total_wall: float) -> Dict[str, Path]:
    written = {}
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    moe_runs = [r for r in rows if r["fluctuation"] is not None]
    if moe_runs:
        try:
            from stablemoe_megatron.analysis.report import write_report

            written.update(write_report([probe_root(out / r["variant"]) for r in moe_runs], report_dir,
                                        [r["variant"] for r in moe_runs]))
        except ImportError as exc:  # matplotlib missing: the table is still written
            print(f"{PROG}: routing report skipped ({exc})", file=sys.stderr)
    curves = plot_loss_curves(rows, report_dir / "loss_curves.png")
    if curves:
        written["loss_curves"] = curves
    size = tiny_size()
    batch, seq = size["training"]["global_batch_size"], size["model"]["seq_length"]
    settings = (f"{args.train_iters} iterations x {batch} x {seq} tokens "
                f"({args.train_iters * batch * seq:,} training tokens), "
                f"{args.nproc} process(es), evaluation on {args.eval_iters} x {batch} sequences, "
                f"routing probe of {args.probe_tokens} validation tokens every {args.probe_interval} iterations")
    md = [f"# Reproduction on the bundled corpus\n", settings + f"; total wall time {total_wall / 60:.1f} min.\n",
          results_table(rows), "",
          "Fluctuation: % of probe tokens whose routed expert (the highest-gate one for Expert Choice) at some "
          "probe after x % of training differs from their expert at the final probe (docs/ALGORITHMS.md §5; mean over MoE "
          "layers).", "", "Commands:", ""]
    md += [f"- `{r['variant']}`: `{r['command']}`" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    written["results.md"] = out / "results.md"
    (out / "results.json").write_text(json.dumps({"settings": settings, "total_wall_s": total_wall,
                                                   "machine": machine_info(), "load_average": _loads(out),
                                                   "rows": rows}, indent=1))
    written["results.json"] = out / "results.json"
    return written


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(REPO / "runs" / "reproduce"), help="output directory")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--train-iters", type=int, default=300, help="iterations per variant (300 x 32 x 128 tokens: 0.69 epoch of the corpus)")
    p.add_argument("--nproc", type=int, default=2, help="trainer processes (expert parallel min(4, nproc))")
    p.add_argument("--eval-iters", type=int, default=12, help="validation/test batches of 32 x 128 (12: the whole valid set)")
    p.add_argument("--probe-interval", type=int, default=10, help="iterations between routing probes")
    p.add_argument("--probe-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=str(REPO / "data" / "processed"), help="examples/prepare_corpus.sh output")
    p.add_argument("--fresh", action="store_true", help="delete --output first (default: reuse finished runs)")
    p.add_argument("--keep-checkpoints", action="store_true", help="also save a checkpoint at the end of every run")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plots from finished runs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    data = Path(args.data_dir)
    if not (data / "spm.model").exists():
        print(f"{PROG}: error: {data}/spm.model not found: run examples/prepare_corpus.sh first", file=sys.stderr)
        return 2
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for name in args.variants:
        run_dir = out / name
        if args.report_only:
            if not finished(run_dir):
                print(f"{PROG}: {name}: no finished run in {run_dir}, skipped", file=sys.stderr)
                continue
            meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        else:
            try:
                meta = run_variant(name, run_dir, args)
            except RuntimeError as exc:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
                return 1
        rows.append(summarize(name, run_dir, meta))
    total = sum(r["wall_s"] or 0 for r in rows) if args.report_only else time.perf_counter() - start
    written = write_results(rows, out, args, total)
    print(results_table(rows))
    for key, path in written.items():
        print(f"{PROG}: {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
