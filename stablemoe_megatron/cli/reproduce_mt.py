"""``tools/reproduce_mt.py``: the paper's translation comparison (Table 3) at CPU scale, over seeds.

Every variant is trained with the same recipe (``configs/mt_tiny.yaml``, the bundled X->En corpus
prepared by ``examples/prepare_mt_corpus.sh``, 2 processes, EP 2 where the layer has experts) at
each seed, then its last checkpoint translates the test set (greedy by default) and is scored with
sacrebleu (``tools/translate.py --score``: detokenised BLEU and chrF per language and averaged).
The report gives mean ± sample std over the seeds, the paired difference to StableMoE at the same
seed, per-language BLEU, and the routing fluctuation of the encoder's and the decoder's MoE layer.

Variants (the paper's Table 3 rows): ``dense`` (no MoE block), ``dense-ffn`` (a dense block of K
FFN sublayers in each stack: the MoE's FLOPs, one expert), ``switch``, ``base``, ``hash`` (random
table) and ``stablemoe`` (stage 2 from 10 % of training). The routers keep the trainer's defaults
(the authors' recipe); ``--variants`` also takes ``stablemoe-alpha0.01`` (balance coefficient 0.01).

Like ``tools/reproduce.py`` it resumes: finished runs (scores written) are kept, an interrupted
run continues from its checkpoint, and a run directory made with other flags is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stablemoe_megatron.cli.reproduce import SettingsChanged, _check_same_flags, finished, launcher, machine_info

PROG = "reproduce-mt"
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "mt_tiny.yaml"
STAGE1_FRACTION = 0.1
_STABLEMOE = ["--moe-router", "stablemoe", "--moe-distill-router", "wordemb", "--moe-distill-dim", "50",
              "--moe-stage2-start-iter", "{stage2}"]
VARIANTS = {  # name: (label, flags after the config file)
    "dense": ("Transformer (no MoE block)", []),
    "dense-ffn": ("dense + K FFN sublayers (equal FLOPs)", ["--moe-router", "hash", "--num-experts", "1"]),
    "switch": ("Switch Transformer", ["--moe-router", "switch", "--moe-aux-loss-coeff", "0.01"]),
    "base": ("BASE Layer", ["--moe-router", "base"]),
    "hash": ("Hash Layer (random table)", ["--moe-router", "hash", "--moe-hash-table", "random"]),
    "stablemoe": ("StableMoE (stage 2 from 10 %)", _STABLEMOE),
    "stablemoe-alpha0.01": ("StableMoE, alpha 0.01", _STABLEMOE + ["--moe-balance-loss-coeff", "0.01"]),
}
# every variant but dense: the MoE shape of the config file (experts, sublayers); --num-experts of a
# variant (dense-ffn: 1) wins, as the later flag
DEFAULT_VARIANTS = ["dense", "dense-ffn", "switch", "base", "hash", "stablemoe"]
REFERENCE = "stablemoe"


def variant_flags(name: str, train_iters: int) -> List[str]:
    """The variant's flags: the config file as flags (its MoE section only for MoE variants, so
    the dense model has none), then the variant's own (stage 2 at 10 % of training)."""
    from stablemoe_megatron.size_configs import load_size, size_flags

    if name not in VARIANTS:
        raise SystemExit(f"{PROG}: error: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    flags = size_flags(CONFIG, without=("moe",))
    if name != "dense":
        moe = load_size(CONFIG)["moe"]
        flags += ["--num-experts", str(moe["num_experts"]), "--moe-sublayers-per-expert", str(moe["sublayers_per_expert"])]
    return flags + [f.format(stage2=int(train_iters * STAGE1_FRACTION)) for f in VARIANTS[name][1]]


def train_flags(name: str, run_dir: Path, args, seed: int) -> List[str]:
    data = Path(args.data_dir)
    moe = variant_flags(name, args.train_iters)
    experts = name not in ("dense", "dense-ffn")
    return [*moe, "--train-iters", str(args.train_iters), "--seed", str(seed),
            "--data-path", str(data / "train"), "--valid-data-path", str(data / "valid"),
            "--test-data-path", str(data / "test"), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(data / "spm.model"), "--metrics-file", str(run_dir / "metrics.jsonl"),
            "--save", str(run_dir / "checkpoints"), "--load", str(run_dir / "checkpoints"),
            "--expert-model-parallel-size", str(args.nproc if experts else 1),
            *(["--routing-probe-interval", str(args.probe_interval), "--routing-probe-tokens", "2048"]
              if name != "dense" else [])]


def _run(command: List[str], log_path: Path, what: str) -> float:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    start = time.perf_counter()
    with open(log_path, "a") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"{what}: exited with {proc.returncode} after {wall:.0f} s; last lines of {log_path}:\n"
                           + "\n".join(tail))
    return wall


def run_variant(name: str, seed: int, run_dir: Path, args, log=print) -> None:
    """Train (or resume) one variant at one seed, then translate and score the test set."""
    flags = train_flags(name, run_dir, args, seed)
    meta = _check_same_flags(run_dir, flags)
    if meta is not None and (run_dir / "scores.json").exists():
        log(f"{PROG}: {name} seed {seed}: reusing the finished run in {run_dir}")
        return
    if meta is None and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    meta = meta or {"flags": flags, "command": " ".join(launcher(args.nproc)[1:] + flags), "seed": seed, "wall_s": 0.0}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    if not finished(run_dir):
        log(f"{PROG}: {name} seed {seed}: training ({args.train_iters} iterations) -> {run_dir}/train.log")
        meta["wall_s"] += _run(launcher(args.nproc) + flags, run_dir / "train.log", f"{name} seed {seed} training")
        (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    log(f"{PROG}: {name} seed {seed}: translating the test set (beam {args.beam_size})")
    score = [sys.executable, "-m", "stablemoe_megatron.cli.translate", "--checkpoint", str(run_dir / "checkpoints"),
             "--input", str(Path(args.corpus_dir) / "test.jsonl"), "--beam-size", str(args.beam_size),
             "--output", str(run_dir / "translations.jsonl"), "--score", "--score-json", str(run_dir / "scores.json")]
    meta["translate_command"] = " ".join(score[1:])
    meta["translate_s"] = _run(score, run_dir / "translate.log", f"{name} seed {seed} translation")
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    for path in (run_dir / "checkpoints").glob("iter_*"):  # scored: the resume points are not needed
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# results
def read_result(run_dir: Path) -> Optional[dict]:
    """{valid_ppl, test_ppl, bleu, chrf, bleu_<lang>, fluct_<layer>_after_<p>} of a scored run."""
    from stablemoe_megatron.analysis.seeds import read_jsonl

    if not (run_dir / "scores.json").exists():
        return None
    scores = json.loads((run_dir / "scores.json").read_text())
    records = read_jsonl(run_dir / "metrics.jsonl")
    out = {"bleu": scores["average"]["bleu"], "chrf": scores["average"]["chrf"]}
    for lang, entry in scores["languages"].items():
        out[f"bleu_{lang}"] = entry["bleu"]
    for split, key in (("validation", "valid_ppl"), ("test", "test_ppl")):
        evals = [r for r in records if r.get("split") == split]
        out[key] = evals[-1]["val_ppl"] if evals else None
    finals = [r["routing_fluctuation"] for r in records if "routing_fluctuation" in r]
    for layer in (finals[-1]["layers"] if finals else []):
        if layer.get("view") == "routed":
            for p in (20, 50, 80):
                out[f"fluct_L{layer['layer']}_after_{p}"] = layer[f"after_{p}"]
            out[f"curve_L{layer['layer']}"] = layer.get("curve")
    return out


def collect(out: Path, names: Sequence[str], seeds: Sequence[int]) -> Dict[str, Dict[int, dict]]:
    found = {}
    for name in names:
        runs = {s: read_result(out / name / f"seed{s}") for s in seeds}
        found[name] = {s: r for s, r in runs.items() if r is not None}
    return found


def _spread(values) -> str:
    from stablemoe_megatron.analysis.seeds import Spread

    return Spread.of(values).format()


def _paired(runs: Dict[int, dict], reference: Dict[int, dict], key: str) -> str:
    from stablemoe_megatron.analysis.seeds import Spread

    spread = Spread.of([runs[s][key] - reference[s][key] for s in sorted(set(runs) & set(reference))
                        if runs[s].get(key) is not None and reference[s].get(key) is not None])
    sigmas = spread.sigmas()
    return spread.format("{:+.2f}") + (f" ({sigmas:+.1f} σ)" if sigmas is not None else "")


def main_table(found: Dict[str, Dict[int, dict]]) -> str:
    layers = sorted({k.split("_")[1] for runs in found.values() for r in runs.values() for k in r
                     if k.startswith("fluct_")})
    head = ["variant", "seeds", "valid PPL", "test PPL", "valid − stablemoe (paired)", "BLEU (avg)",
            "BLEU − stablemoe (paired)", "chrF (avg)"]
    head += [f"fluct. {layer} >20% / >50% (%)" for layer in layers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = found.get(REFERENCE, {})
    for name, runs in found.items():
        if not runs:
            continue
        rows = list(runs.values())
        cells = [f"{name} ({VARIANTS[name][0]})", str(len(rows)), _spread([r["valid_ppl"] for r in rows]),
                 _spread([r["test_ppl"] for r in rows]),
                 "-" if name == REFERENCE else _paired(runs, reference, "valid_ppl"), _spread([r["bleu"] for r in rows]),
                 "-" if name == REFERENCE else _paired(runs, reference, "bleu"), _spread([r["chrf"] for r in rows])]
        for layer in layers:
            a = [r.get(f"fluct_{layer}_after_20") for r in rows]
            b = [r.get(f"fluct_{layer}_after_50") for r in rows]
            cells.append("-" if all(v is None for v in a) else f"{_spread(a)} / {_spread(b)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def language_table(found: Dict[str, Dict[int, dict]]) -> str:
    langs = sorted({k[5:] for runs in found.values() for r in runs.values() for k in r if k.startswith("bleu_")})
    lines = ["| variant | " + " | ".join(langs) + " | avg |", "|" + "---|" * (len(langs) + 2)]
    for name, runs in found.items():
        if runs:
            rows = list(runs.values())
            cells = [f"{statistics.fmean(r[f'bleu_{lang}'] for r in rows):.2f}" for lang in langs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(r['bleu'] for r in rows):.2f} |")
    return "\n".join(lines)


def plot_fluctuation(found: Dict[str, Dict[int, dict]], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k[6:] for runs in found.values() for r in runs.values() for k in r if k.startswith("curve_")})
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, runs in found.items():
            curves = [r[f"curve_{layer}"] for r in runs.values() if r.get(f"curve_{layer}")]
            if curves:
                mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
                ax.plot(range(len(mean)), mean, label=name)
        ax.set(title=f"MoE layer {layer[1:]}", xlabel="% of training", ylabel="% of probe tokens whose last change is later")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(out: Path, args, names: Sequence[str], total_wall: Optional[float]) -> Path:
    found = collect(out, names, args.seeds)
    runs = sum(len(r) for r in found.values())
    wall = total_wall if total_wall is not None else sum(
        json.loads((out / n / f"seed{s}" / "run.json").read_text()).get("wall_s", 0.0)
        for n in names for s in found.get(n, {}))
    text = ["# Translation reproduction: every variant over seeds\n",
            f"{args.train_iters} iterations of `configs/mt_tiny.yaml` on `{args.data_dir}`, {args.nproc} process(es), "
            f"test set translated with beam {args.beam_size}; {runs} scored run(s); wall time {wall / 60:.1f} min.\n",
            "Mean ± sample standard deviation over the seeds; the paired column is (variant − stablemoe) at the "
            "same seed, mean ± std, and in brackets that mean in units of its std. Fluctuation: % of the probe "
            "tokens whose last expert change comes after 20 % / 50 % of training (routed view), per MoE layer "
            "(encoder layer, then decoder layer).\n", main_table(found), "\n## BLEU per language (mean over seeds)\n",
            language_table(found), "\nCommands (seed of the first run):\n"]
    for name in names:
        if found.get(name):
            meta = json.loads((out / name / f"seed{min(found[name])}" / "run.json").read_text())
            text.append(f"- `{name}`: `{meta['command']}`; scoring: `{meta.get('translate_command', '')}`")
    (out / "results.md").write_text("\n".join(text) + "\n")
    (out / "results.json").write_text(json.dumps({"runs": found, "machine": machine_info()}, indent=1, default=str))
    plot_fluctuation(found, out / "fluctuation.png")
    return out / "results.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/reproduce_mt", help="run directory (resumed when it exists)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--train-iters", type=int, default=400)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--beam-size", type=int, default=1, help="1: greedy (the CPU budget)")
    p.add_argument("--probe-interval", type=int, default=10)
    p.add_argument("--data-dir", default=str(REPO / "data" / "mt_processed"), help="examples/prepare_mt_corpus.sh output")
    p.add_argument("--corpus-dir", default=str(REPO / "data" / "mt"), help="the corpus' jsonl (test.jsonl is scored)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the tables from finished runs")
    p.add_argument("--print-flags", metavar="VARIANT", help="print a variant's trainer flags and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_flags:
        print(" ".join(variant_flags(args.print_flags, args.train_iters)))
        return 0
    out = Path(args.output)
    if not (Path(args.data_dir) / "spm.model").exists():
        print(f"{PROG}: error: {args.data_dir}/spm.model not found: run examples/prepare_mt_corpus.sh first",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        for seed in args.seeds:
            for name in args.variants:
                try:
                    run_variant(name, seed, out / name / f"seed{seed}", args)
                except (RuntimeError, SettingsChanged) as exc:
                    print(f"{PROG}: error: {exc}", file=sys.stderr)
                    return 1
                write_results(out, args, args.variants, time.perf_counter() - start)
    path = write_results(out, args, args.variants, None if args.report_only else time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
