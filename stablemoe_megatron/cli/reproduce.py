"""The paper's comparisons at CPU scale, over seeds (CPU: 2 cores, about 5 minutes per run).

    python tools/reproduce.py [--output runs/reproduce] [--variants stablemoe hash ...] [--seeds 1 2 3]
    bash examples/reproduce_paper_cpu.sh      # builds the large corpus and its datasets first, then this

Trains every variant (``--variants``) for every seed (``--seeds``: the initialisation and the data
order), seed by seed, with the trainer (``torchrun -m stablemoe_megatron.train``), then writes into
``--output``:

* ``results.md`` / ``results.json``: per variant, valid and test perplexity as mean ± std over
  the seeds and the paired difference to StableMoE (same seed) in seed standard deviations,
  training tokens/s, routing fluctuation (docs/ALGORITHMS.md §5: % of probe tokens whose routed
  expert still changes after 20 / 50 / 80 % of training), the held-out distillation agreement at
  the stage switch; the stage-1 study table (valid PPL with the MoE block skipped, final mean gate,
  load CV, tokens moved per probe, agreement); the exact command of every run;
* ``report/``: ``validation.png`` (validation PPL against training tokens and training wall time,
  seed bands), ``fluctuation.png`` (seed bands), ``stage1.png`` (gate, load, moved tokens,
  agreement, MoE-skipped gap over training);
* ``VARIANT/seedS/``: ``train.log``, ``metrics.jsonl``, ``run.json`` (flags, command, wall time)
  and ``checkpoints/`` (resume points, removed when the run finished unless --keep-checkpoints;
  the routing-probe history stays).

Equal compute: every variant sees the same tokens in the same order for a seed (same data,
global batch and iterations), with the same shared backbone (``configs/tiny.yaml``, the recipes'
``SIZE=tiny``: 4 layers, d 128, FFN 512, 4 heads, seq 128, global batch 32, Adam (0.9, 0.98), lr
1e-3 with linear decay, clip 0.1, dropout 0; here with the paper's warm-up share, 2K of 60K
steps, and validation every ``--eval-interval``). All MoE variants add ONE MoE block after block
L/2 of N=4 experts, each a stack of K=2 FFN sublayers, and are top-1 (one expert stack per token:
the same active FLOPs), except Expert Choice, run with capacity factor 1 (k = T/N tokens per
expert: the same expert FLOPs per batch, on average one expert per token). ``dense`` is the
paper's "Standard Transformer": the backbone without the MoE block, i.e. equal shared parameters
but FEWER FLOPs; ``dense-ffn`` is the equal-FLOPs dense control: the same block with ONE expert
(every token through the same K FFN sublayers).

``--recipe authors`` (default) adds the authors' released recipe as explicit flags (RECIPES:
ReLU, no weight decay, zero-initialised expert outputs, orthogonal centroids, distillation
coefficient 0.3 and the other distillation items, StableMoE capacity 2), so a run's command says
everything it ran with; ``previous`` runs this trainer's earlier defaults. The ``s1-*`` and
``dense-previous`` ablations (ABLATIONS) change one item at a time from StableMoE stage 1.

Nothing is redone or lost: a finished run (a test-perplexity record) is reused; an interrupted run
resumes from its last checkpoint (``--save-interval``); a run directory made with other flags
stops the driver with a message (``--fresh`` deletes the output and starts over).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stablemoe_megatron.analysis.seeds import read_jsonl
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

# name -> (paper's name, flags); "{stage2@P}" is replaced by P % of the iterations. Every variant
# also gets its recipe's flags (RECIPES), MoE variants the MoE shape and the probe (train_flags).
_STABLEMOE = ["--moe-router", "stablemoe", "--moe-balance-loss-coeff", "0.3", "--moe-distill-router", "wordemb",
              "--moe-distill-dim", "50"]
VARIANTS: "OrderedDict[str, tuple]" = OrderedDict([
    ("dense", ("Standard Transformer (no MoE block)", [])),
    ("switch", ("Switch Transformer", ["--moe-router", "switch", "--moe-aux-loss-coeff", "0.01"])),
    ("base", ("BASE Layer", ["--moe-router", "base"])),
    ("hash", ("Hash Layer (random table)", ["--moe-router", "hash", "--moe-hash-table", "random"])),
    ("expert-choice", ("Expert Choice (c = 1)", ["--moe-router", "expert-choice", "--moe-expert-capacity-factor", "1"])),
    ("stablemoe", ("StableMoE (stage 2 from 10 %)", [*_STABLEMOE, "--moe-stage2-start-iter", "{stage2@10}"])),
    ("stablemoe-25", ("StableMoE (stage 2 from 25 %)", [*_STABLEMOE, "--moe-stage2-start-iter", "{stage2@25}"])),
    ("stablemoe-50", ("StableMoE (stage 2 from 50 %)", [*_STABLEMOE, "--moe-stage2-start-iter", "{stage2@50}"])),
    ("stablemoe-stage1", ("StableMoE stage 1 only", list(_STABLEMOE))),
    ("stablemoe-alpha0.01", ("StableMoE, alpha 0.01 (stage 2 from 10 %)",
                             [*_STABLEMOE, "--moe-balance-loss-coeff", "0.01", "--moe-stage2-start-iter", "{stage2@10}"])),
    ("base-distill-freeze", ("BASE + distil-and-freeze (10 %)", ["--moe-router", "base", "--moe-distill-router", "wordemb",
                                                                  "--moe-distill-dim", "50", "--moe-stage2-start-iter",
                                                                  "{stage2@10}"])),
    ("dense-ffn", ("dense + K FFN sublayers (equal FLOPs)", ["--moe-router", "hash"])),
])
# The authors' recipe (docs/RECIPE.md), as flags: for every variant; for MoE variants; for variants with
# a distilled router; the capacity of their command for the StableMoE router. "previous": this
# trainer's defaults before it followed the authors.
RECIPES = {
    "authors": {"all": ["--activation", "relu", "--weight-decay", "0"],
                "moe": ["--moe-expert-output-init", "zero", "--moe-centroid-init", "orthogonal"],
                "distilled": ["--moe-distill-loss-coeff", "0.3", "--moe-eval-routing", "distilled",
                              "--moe-distill-embedding-init", "unit", "--moe-distill-teacher", "greedy"],
                "stablemoe": ["--moe-expert-capacity-factor", "2"]},
    # capacity N: nothing dropped
    "previous": {"all": ["--activation", "gelu", "--weight-decay", "0.01"],
                 "moe": ["--moe-expert-output-init", "normal", "--moe-centroid-init", "normal", "--no-moe-token-shuffle",
                         "--moe-balance-count-scope", "micro-batch"],
                 "distilled": ["--moe-distill-loss-coeff", "1.0", "--moe-eval-routing", "backbone",
                               "--moe-distill-embedding-init", "normal", "--moe-distill-teacher", "assignment"],
                 "stablemoe": ["--moe-expert-capacity-factor", "{num_experts}"]},
}


def _all_flags(recipe: dict) -> List[str]:
    """Every flag of a recipe (for a StableMoE variant)."""
    return [flag for part in ("all", "moe", "distilled", "stablemoe") for flag in recipe[part]]


# The stage-1 study: StableMoE stage 1 only with ONE recipe item changed (flags appended last: they win).
ABLATIONS: "OrderedDict[str, tuple]" = OrderedDict([
    ("s1-previous", ("stage 1, this trainer's previous defaults (every item below reverted)",
                     ["--activation", "gelu", "--weight-decay", "0.01", "--moe-expert-output-init", "normal",
                      "--moe-centroid-init", "normal", "--moe-distill-embedding-init", "normal",
                      "--moe-distill-loss-coeff", "1.0", "--moe-eval-routing", "backbone"], "stablemoe-stage1")),
    ("s1-previous-all", ("stage 1, every earlier default (also capacity, counting set, shuffle, teacher)",
                         _all_flags(RECIPES["previous"]), "stablemoe-stage1")),
    ("dense-previous", ("dense, previous defaults (GELU, weight decay 0.01)", list(RECIPES["previous"]["all"]),
                        "dense")),
    ("s1-alpha0", ("stage 1, alpha = 0 (no balance loss)", ["--moe-balance-loss-coeff", "0"], "stablemoe-stage1")),
    ("s1-alpha0.01", ("stage 1, alpha = 0.01", ["--moe-balance-loss-coeff", "0.01"], "stablemoe-stage1")),
    ("s1-alpha0.1", ("stage 1, alpha = 0.1", ["--moe-balance-loss-coeff", "0.1"], "stablemoe-stage1")),
    ("s1-alpha1", ("stage 1, alpha = 1.0", ["--moe-balance-loss-coeff", "1.0"], "stablemoe-stage1")),
    ("s1-expert-init-normal", ("stage 1, expert fc2 N(0, 0.02/sqrt(2L))", ["--moe-expert-output-init", "normal"],
                               "stablemoe-stage1")),
    ("s1-centroid-init-normal", ("stage 1, centroids N(0, 0.02)", ["--moe-centroid-init", "normal"], "stablemoe-stage1")),
    ("s1-gelu", ("stage 1, GELU", ["--activation", "gelu"], "stablemoe-stage1")),
    ("s1-weight-decay", ("stage 1, weight decay 0.01", ["--weight-decay", "0.01"], "stablemoe-stage1")),
    ("s1-no-capacity", ("stage 1, no capacity", ["--moe-expert-capacity-factor", "1000"], "stablemoe-stage1")),
    ("s1-distill-coeff1", ("stage 1, distillation coefficient 1.0", ["--moe-distill-loss-coeff", "1.0"],
                           "stablemoe-stage1")),
])
DEFAULT_VARIANTS = ["stablemoe", "stablemoe-alpha0.01", "dense", "dense-ffn", "hash", "switch", "base",
                    "stablemoe-stage1", "stablemoe-25", "stablemoe-50", "expert-choice", "base-distill-freeze"]
# paper Table 2 / Table 5 / Table 6 (base size, valid / test PPL), for the table's last column
PAPER_PPL = {"dense": (23.02, 22.58), "switch": (19.79, 19.20), "base": (20.04, 19.69), "hash": (19.63, 19.25),
             "stablemoe": (19.28, 18.93), "stablemoe-stage1": (19.48, None), "base-distill-freeze": (19.41, None)}


def variant_definition(name: str):
    """(paper name, variant flags, base variant) of a variant or ablation."""
    if name in ABLATIONS:
        label, overrides, base = ABLATIONS[name]
        return label, VARIANTS[base][1] + overrides, base
    label, flags = VARIANTS[name]
    return label, flags, name


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def _recipe_flags(recipe: dict, moe_flags: Sequence[str]) -> List[str]:
    flags = list(recipe["all"])
    if moe_flags:
        flags += recipe["moe"]
    if "--moe-distill-router" in moe_flags or "stablemoe" in moe_flags:
        flags += recipe["distilled"]
    if "stablemoe" in moe_flags:
        flags += recipe["stablemoe"]
    return flags


def train_flags(name: str, run_dir: Path, args, seed: Optional[int] = None) -> List[str]:
    """Trainer flags of one variant (see the module doc for what is shared), ``seed`` or ``--seed``."""
    data, iters = Path(args.data_dir), args.train_iters
    size = tiny_size()
    moe_shape = size.pop("moe")  # the MoE variants' experts and sublayers (below)
    size.pop("checkpoint", None)  # checkpoints: the resume points (below)
    size["optimizer"]["lr_warmup_iters"] = max(1, round(iters * args.warmup_percent / 100))
    eval_interval = args.eval_interval or iters
    size["training"].update(train_iters=iters, eval_interval=eval_interval, eval_iters=args.eval_iters,
                            seed=args.seed if seed is None else seed)
    size["logging"]["log_interval"] = args.log_interval
    flags = [*to_flags(size),
             "--data-path", data / "corpus_train_text_document", "--split", "100,0,0",
             "--valid-data-path", data / "corpus_valid_text_document",
             "--test-data-path", data / "corpus_test_text_document",
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data / "spm.model",
             "--metrics-file", run_dir / "metrics.jsonl",
             "--save", run_dir / "checkpoints", "--load", run_dir / "checkpoints",
             "--save-interval", args.save_interval or iters]
    _, variant, base = variant_definition(name)
    is_moe = bool(VARIANTS[base][1])
    flags += _recipe_flags(RECIPES[args.recipe], VARIANTS[base][1])
    if is_moe:
        experts = 1 if base == "dense-ffn" else moe_shape["num_experts"]
        ep = min(experts, args.nproc)
        flags += ["--num-experts", experts, "--moe-layer-positions", "middle",
                  "--moe-sublayers-per-expert", moe_shape["sublayers_per_expert"], "--expert-model-parallel-size", ep,
                  "--routing-probe-interval", args.probe_interval, "--routing-probe-tokens", args.probe_tokens]
        if args.eval_moe_bypass:
            flags += ["--eval-moe-bypass"]
    flags += [_fill_stage2(f, iters) for f in variant]
    return [str(moe_shape["num_experts"]) if f == "{num_experts}" else str(f) for f in flags]


def _fill_stage2(flag: str, iters: int) -> str:
    if flag.startswith("{stage2@"):
        percent = int(flag[len("{stage2@"):-1])
        return str(max(1, iters * percent // 100))
    return flag


def launcher(nproc: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "stablemoe_megatron.train"]


def finished(run_dir: Path) -> bool:
    return any(r.get("split") == "test" for r in read_jsonl(run_dir / "metrics.jsonl"))


def probe_root(run_dir: Path) -> Path:
    """Where the trainer put the routing-probe history: the --save directory if any, else the run's."""
    saved = run_dir / "checkpoints"
    return saved if (saved / "routing_probe").is_dir() else run_dir


class SettingsChanged(RuntimeError):
    """A run directory holds a run made with other flags: never reused or resumed silently."""


def _check_same_flags(run_dir: Path, flags: List[str]) -> Optional[dict]:
    """The run's run.json if it was made with ``flags``; None if there is none; SettingsChanged otherwise."""
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("flags") != flags:
        old, new = meta.get("flags") or [], flags
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        raise SettingsChanged(
            f"{run_dir} holds a run made with other settings (first difference at flag {first}: "
            f"{' '.join(old[max(0, first - 1):first + 2]) or '(none)'} vs {' '.join(new[max(0, first - 1):first + 2]) or '(none)'}): "
            f"use another --output, or --fresh to start the reproduction over")
    return meta


def run_variant(name: str, seed: int, run_dir: Path, args, log=print) -> dict:
    """Train one variant at one seed, resume an interrupted attempt, or reuse a finished run;
    returns {"command", "wall_s", "reused"}."""
    flags = train_flags(name, run_dir, args, seed)
    meta = _check_same_flags(run_dir, flags)
    if meta is not None and finished(run_dir):
        log(f"{PROG}: {name} seed {seed}: reusing the finished run in {run_dir}")
        return dict(meta, reused=True)
    resuming = meta is not None and (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    if not resuming and run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt that left no checkpoint: nothing to keep
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)  # --load of an empty directory: a fresh start
    command = launcher(args.nproc) + flags
    meta = {"flags": flags, "command": " ".join(command[1:]), "nproc": args.nproc, "seed": seed,
            "wall_s": (meta or {}).get("wall_s", 0.0) if resuming else 0.0}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    log(f"{PROG}: {name} seed {seed}: {'resuming' if resuming else 'training'} ({args.train_iters} iterations, "
        f"{args.nproc} process(es)) -> {run_dir}/train.log")
    start, load_start = time.perf_counter(), os.getloadavg()
    with open(run_dir / "train.log", "a") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    meta.update(wall_s=meta["wall_s"] + wall, load_average={"start": load_start, "end": os.getloadavg()})
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"{name} seed {seed}: the trainer exited with {proc.returncode} after {wall:.0f} s; "
                           f"last lines of {run_dir}/train.log:\n" + "\n".join(tail))
    if not args.keep_checkpoints:
        _drop_checkpoints(run_dir / "checkpoints")
    log(f"{PROG}: {name} seed {seed}: done in {wall / 60:.1f} min")
    return dict(meta, reused=False)


def _drop_checkpoints(save_dir: Path) -> None:
    """A finished run's resume points are not needed (the routing-probe history and config stay)."""
    for path in save_dir.glob("iter_*"):
        shutil.rmtree(path, ignore_errors=True)
    (save_dir / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
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


def settings_text(args) -> str:
    size = tiny_size()
    batch, seq = size["training"]["global_batch_size"], size["model"]["seq_length"]
    return (f"{args.train_iters} iterations x {batch} x {seq} tokens ({args.train_iters * batch * seq:,} training "
            f"tokens per run), recipe `{args.recipe}`, data `{args.data_dir}`, {args.nproc} process(es), "
            f"warm-up {args.warmup_percent:g} %, validation every {args.eval_interval or args.train_iters} "
            f"iterations on {args.eval_iters} x {batch} sequences (the test split likewise at the end), routing "
            f"probe of {args.probe_tokens} validation tokens every {args.probe_interval} iterations")


def collect(out: Path, names: Sequence[str], seeds: Sequence[int], tokens_per_iteration: int):
    """{variant: {seed: RunSummary}} of the finished runs, and {variant: {seed: run.json}}."""
    from stablemoe_megatron.analysis.seeds import read_run

    runs, metas = OrderedDict(), {}
    for name in names:
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            if finished(run_dir):
                runs.setdefault(name, {})[seed] = read_run(run_dir / "metrics.jsonl", tokens_per_iteration)
                meta_path = run_dir / "run.json"
                metas.setdefault(name, {})[seed] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return runs, metas


def write_results(out: Path, args, names: Sequence[str], total_wall: Optional[float]) -> Dict[str, Path]:
    """results.md / results.json / report/*.png from every finished run of ``names`` x ``--seeds``."""
    from stablemoe_megatron.analysis import seed_report

    size = tiny_size()
    tokens_per_iteration = size["training"]["global_batch_size"] * size["model"]["seq_length"]
    runs, metas = collect(out, names, args.seeds, tokens_per_iteration)
    if total_wall is None:
        total_wall = sum(meta.get("wall_s") or 0.0 for seeds in metas.values() for meta in seeds.values())
    main_names = [n for n in names if n in VARIANTS]
    stage1_names = [n for n in ["stablemoe-stage1", *ABLATIONS] if n in names and n != "dense-previous"]
    labels = {n: variant_definition(n)[0] for n in names}
    switches = {n: next((int(_fill_stage2(f, args.train_iters)) for f in variant_definition(n)[1]
                         if f.startswith("{stage2@")), None) for n in names}
    main = seed_report.select(runs, main_names)
    ablation_names = [n for n in names if n in ABLATIONS]
    md = ["# Reproduction: every variant over seeds\n", settings_text(args) + f"; total wall time {total_wall / 60:.1f} min.\n",
          "Mean ± sample standard deviation over the seeds; the paired columns are (variant − stablemoe) at "
          "the same seed, mean ± std over seeds, and in brackets that mean in units of its std.\n",
          seed_report.main_table(main, labels, switches, PAPER_PPL), ""]
    if ablation_names or "stablemoe-stage1" in runs:
        md += ["## Stage 1 alone, one recipe item changed at a time\n",
               seed_report.stage1_table(seed_report.select(runs, stage1_names), labels, args.train_iters), "",
               seed_report.main_table(seed_report.select(runs, ["stablemoe-stage1", "dense", *ablation_names]),
                                      labels, switches, {}), ""]
    md += ["Commands (seed of the first run; the others differ in `--seed` and paths):", ""]
    md += [f"- `{name}`: `{next(iter(metas[name].values())).get('command', '?')}`" for name in runs]
    written = seed_report.plot_all(main, seed_report.select(runs, stage1_names), out / "report")
    (out / "results.md").write_text("\n".join(md) + "\n")
    written["results.md"] = out / "results.md"
    (out / "results.json").write_text(json.dumps({
        "settings": settings_text(args), "total_wall_s": total_wall, "machine": machine_info(),
        "runs": {name: {seed: dataclasses.asdict(run) for seed, run in seeds.items()} for name, seeds in runs.items()},
        "meta": metas}, indent=1))
    written["results.json"] = out / "results.json"
    return written


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(REPO / "runs" / "reproduce"), help="output directory")
    p.add_argument("--variants", nargs="+", choices=[*VARIANTS, *ABLATIONS], default=DEFAULT_VARIANTS,
                   metavar="VARIANT",
                   help="variants to run, in this order for each seed: " + ", ".join(VARIANTS) + "; the "
                        "stage-1 study: " + ", ".join(ABLATIONS) + " (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                   help="seeds (initialisation and data order); all variants run for the first seed, then the next")
    p.add_argument("--recipe", choices=list(RECIPES), default="authors",
                   help="authors: the authors' released recipe (docs/RECIPE.md); previous: this trainer's "
                        "defaults before it (GELU, weight decay 0.01, normal inits, ...)")
    p.add_argument("--train-iters", type=int, default=300, help="iterations per run (x 32 x 128 tokens)")
    p.add_argument("--warmup-percent", type=float, default=100 / 30,
                   help="learning-rate warm-up, %% of the iterations (the paper: 2K of 60K)")
    p.add_argument("--nproc", type=int, default=2, help="trainer processes (expert parallel min(4, nproc))")
    p.add_argument("--eval-iters", type=int, default=16, help="validation/test batches of 32 x 128 per evaluation")
    p.add_argument("--eval-interval", type=int, default=50, help="iterations between validations (0: at the end only)")
    p.add_argument("--no-eval-moe-bypass", dest="eval_moe_bypass", action="store_false",
                   help="do not also evaluate MoE runs with the MoE block skipped")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--save-interval", type=int, default=100, help="checkpoint (resume point) interval")
    p.add_argument("--probe-interval", type=int, default=10, help="iterations between routing probes")
    p.add_argument("--probe-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234, help=argparse.SUPPRESS)  # train_flags without a seed
    p.add_argument("--data-dir", default=str(REPO / "data" / "large_processed"),
                   help="examples/prepare_large_corpus.sh output (examples/prepare_corpus.sh: the small corpus)")
    p.add_argument("--fresh", action="store_true", help="delete --output first (default: reuse finished runs)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoints when it finished")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots from finished runs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    data = Path(args.data_dir)
    if not (data / "spm.model").exists():
        print(f"{PROG}: error: {data}/spm.model not found: run examples/prepare_large_corpus.sh (or "
              f"examples/prepare_corpus.sh with --data-dir data/processed) first", file=sys.stderr)
        return 2
    if args.fresh and out.exists():
        shutil.rmtree(out)
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
                _write_quietly(out, args, start)
    total = None if args.report_only else time.perf_counter() - start  # report-only: the runs' own wall times
    written = write_results(out, args, args.variants, total)
    print((out / "results.md").read_text())
    for key, path in written.items():
        print(f"{PROG}: {key}: {path}")
    return 0


def _write_quietly(out: Path, args, start: float) -> None:
    """Refresh the tables after every run (a long reproduction shows its progress)."""
    try:
        write_results(out, args, args.variants, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop the training runs
        print(f"{PROG}: warning: could not refresh the results ({exc})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
