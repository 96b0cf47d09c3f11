"""Training-step time of StableMoE models against a dense model of equal active FLOPs.

    python bench/step_time.py                    # the reproduction's tiny size, CPU (about 1-2 min)
    python bench/step_time.py --size small       # wider, more compute-bound CPU size
    python bench/step_time.py --size paper       # the paper's base model (GPU, bf16)

Variants, all built by the trainer's own setup from trainer flags and stepped by its own
``train_step`` (bench/training.py), one process, timed side by side (bench/common.py):

* ``dense-equal``  the same model with ONE expert whose MoE layer skips routing and dispatch: the
                   K-sublayer expert stack runs on every token (gate 1). Same backbone, same active
                   FLOPs as a top-1 MoE layer (less the router's d x N matmul): the reference;
* ``stablemoe-s1`` StableMoE in stage 1 (balance + distillation losses, the distilled router's own
                   optimizer);
* ``stablemoe-s2`` StableMoE in stage 2 (frozen token-id routing, host token ids: no sync);
* ``dense``        the paper's "Standard Transformer" (no MoE block: fewer FLOPs), for scale;
* optional ``switch`` / ``hash`` / ``base`` / ``expert-choice`` (capacity factor 1).

A step is ``--accumulate`` micro-batches and one optimizer step. The MoE models hold N times the
expert parameters of the dense equivalent, and the optimizer step costs per parameter, not per
active FLOP: with few tokens per step (CPU sizes) that cost is visible in the ratio.

Goal: StableMoE step time <= 1.10 x the equal-FLOPs dense step with >= 4,096 tokens per step (the
line says "not assessed" below that). ``--profile N`` adds a torch.profiler breakdown of N steps
per variant (bench/profiling.py): routing, dispatch, experts, optimizer, other.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    PAPER_MODEL_FLAGS,
    config_size,
    fmt_ratio,
    fmt_spread,
    init_single_process,
    machine_info,
    markdown_table,
    quantiles,
    time_interleaved,
)
from stablemoe_megatron.routing import get_routing, routing_names  # noqa: E402
from bench.profiling import CATEGORIES, breakdown  # noqa: E402
from bench.training import (  # noqa: E402
    build_job,
    check_dense_equivalent,
    config_from_flags,
    model_flops_per_token,
    parameter_counts,
    release,
    step,
    synthetic_batches,
)

SIZES = {
    # configs/tiny.yaml (the recipes' SIZE=tiny): what the CPU reproduction trains (one micro-batch of 8 x 128)
    "tiny": config_size("tiny", vocab=8000),
    "small": dict(layers=4, hidden=256, ffn=1024, heads=4, seq=256, experts=8, sublayers=2, micro=4, vocab=8000, bf16=False),
    # configs/base.yaml, paper Table 7 base: 12 x 768, 32 experts of 3 sublayers after block 6, seq 1024, GPT-2 vocab
    "paper": config_size("base", vocab=50257),
}
DEFAULT_VARIANTS = ("dense-equal", "stablemoe-s1", "stablemoe-s2", "dense")
# ... and every registered router without stage variants (those with a default distilled router have them)
ALL_VARIANTS = DEFAULT_VARIANTS + tuple(name for name in routing_names() if not get_routing(name).default_distill_router)


def base_flags(size: dict) -> list:
    flags = ["--num-layers", size["layers"], "--hidden-size", size["hidden"], "--ffn-hidden-size", size["ffn"],
             "--num-attention-heads", size["heads"], "--seq-length", size["seq"],
             "--micro-batch-size", size["micro"], "--global-batch-size", size["micro"] * size.get("accumulate", 1),
             "--train-iters", 100000, "--lr", "6e-4", "--lr-warmup-iters", 100, "--clip-grad", "0.1",
             "--adam-beta1", "0.9", "--adam-beta2", "0.98", "--weight-decay", "0.01",
             *PAPER_MODEL_FLAGS]
    if size["bf16"]:
        flags.append("--bf16")
    return [str(f) for f in flags]


def variant_flags(name: str, size: dict) -> list:
    moe = ["--moe-sublayers-per-expert", str(size["sublayers"]), "--moe-layer-positions", "middle"]
    if name == "dense":
        return []
    if name == "dense-equal":
        return ["--num-experts", "1", "--moe-router", "hash"] + moe
    router = name[:-3] if name.endswith(("-s1", "-s2")) else name  # stablemoe-s1 / -s2: the stages
    flags = ["--num-experts", str(size["experts"]), "--moe-router", router] + moe
    if not get_routing(router).one_pair_per_token:  # Expert Choice: on average one expert per token
        flags += ["--moe-expert-capacity-factor", "1"]
    return flags


def run(size: dict, variants, repeats: int, warmup: int, verbose: bool = True, profile_steps: int = 0) -> dict:
    log = print if verbose else (lambda *a, **k: None)
    jobs, batches, info = {}, {}, {}
    for name in variants:
        config = config_from_flags(base_flags(size) + variant_flags(name, size))
        torch.manual_seed(1234)
        job = build_job(config, size["vocab"], dense_equivalent=(name == "dense-equal"),
                        stage=2 if name == "stablemoe-s2" else 1)
        jobs[name] = job
        batches[name] = synthetic_batches(config, size["vocab"])
        flops = model_flops_per_token(config, size["vocab"])
        if name == "dense-equal":
            flops["total"] -= flops["router"]  # no router runs in the dense equivalent
            flops["router"] = 0.0
        info[name] = {"params": parameter_counts(job.model), "train_flops_per_token": flops["total"]}
    checks = {}
    if "dense-equal" in variants:
        batch = next(synthetic_batches(jobs["dense-equal"].config, size["vocab"], seed=99))
        checks["dense-equal vs routed 1-expert model, max |loss diff|"] = check_dense_equivalent(jobs["dense-equal"], batch)
        tol = 1e-2 if size["bf16"] else 1e-4
        if checks["dense-equal vs routed 1-expert model, max |loss diff|"] > tol:
            raise SystemExit(f"the dense equivalent does not compute the 1-expert model: {checks}")
        log("check: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    fns = {name: (lambda n=name: step(jobs[n], batches[n])) for name in variants}
    timings = time_interleaved(fns, repeats=repeats, warmup=warmup, inner=1)
    tokens = size["micro"] * size["seq"] * size.get("accumulate", 1)
    reference = "dense-equal" if "dense-equal" in variants else variants[0]
    result = {"size": dict(size), "repeats": repeats, "warmup": warmup, "tokens_per_step": tokens,
              "reference": reference, "machine": machine_info(), "checks": checks, "variants": {}}
    for name in variants:
        result["variants"][name] = dict(info[name], median_s=timings.median(name),
                                        quartiles_s=quantiles(timings.samples[name]),
                                        ratio_to_reference=timings.ratio(name, reference),
                                        tokens_per_s=tokens / timings.median(name),
                                        samples_s=timings.samples[name])
    if profile_steps:
        for name in variants:
            job = jobs[name]
            result["variants"][name]["profile_ms"] = breakdown(
                lambda: step(job, batches[name]), job.model, (job.optimizer, job.side_optimizer), profile_steps)
    for job in jobs.values():
        release(job)
    return result


def report(result: dict) -> str:
    s, ref = result["size"], result["reference"]
    lines = [f"training step ({s['layers']} layers, hidden {s['hidden']}, FFN {s['ffn']}, seq {s['seq']}, "
             f"{s.get('accumulate', 1)} micro-batch(es) of {s['micro']} = {result['tokens_per_step']} tokens, "
             f"{s['experts']} experts x "
             f"{s['sublayers']} sublayers, {'bf16' if s['bf16'] else 'fp32'}); {result['repeats']} interleaved "
             f"rounds after {result['warmup']} warm-up; median [p25, p75]; ratio = per-round time / {ref}'s"]
    rows = []
    for name, v in result["variants"].items():
        rows.append([name, f"{v['params']['total'] / 1e6:.2f}M ({v['params']['expert'] / 1e6:.2f}M expert)",
                     f"{v['train_flops_per_token'] / 1e6:.1f}M", fmt_spread(*v["quartiles_s"]),
                     fmt_ratio(v["ratio_to_reference"]), f"{v['tokens_per_s']:,.0f}"])
    lines.append(markdown_table(["variant", "params", "train FLOPs/token", "step time", f"/ {ref}", "tokens/s"], rows))
    profiled = {name: v["profile_ms"] for name, v in result["variants"].items() if "profile_ms" in v}
    if profiled:
        lines.append("torch.profiler breakdown, ms per step (self CPU time of the ops, the backward counted with "
                     "the forward op that created it; share of the profiled total):")
        rows = [[name] + [f"{ms[c]:.1f} ({ms[c] / ms['total']:.0%})" for c in CATEGORIES] + [f"{ms['total']:.1f}"]
                for name, ms in profiled.items()]
        lines.append(markdown_table(["variant", *CATEGORIES, "total"], rows))
    if ref == "dense-equal":
        enough = result["tokens_per_step"] >= 4096
        for name in ("stablemoe-s1", "stablemoe-s2"):
            if name in result["variants"]:
                ratio = result["variants"][name]["ratio_to_reference"][1]
                verdict = ("met" if ratio <= 1.10 else "NOT met") if enough else "not assessed (< 4,096 tokens per step)"
                lines.append(f"goal: {name} step <= 1.10x the equal-FLOPs dense step (>= 4,096 tokens per step): "
                             f"{ratio:.3f}x -> {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on a GPU, tiny otherwise")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=list(DEFAULT_VARIANTS))
    p.add_argument("--micro-batch-size", type=int, help="override the size's micro-batch")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per optimizer step (the Adam step over all parameters, which MoE models "
                        "have more of, is amortised over more tokens)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS steps of each variant with torch.profiler and print where "
                        "the time goes (routing, dispatch, experts, optimizer, other)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    init_single_process(args.threads)
    size = dict(SIZES[args.size or ("paper" if torch.cuda.is_available() else "tiny")])
    if args.micro_batch_size:
        size["micro"] = args.micro_batch_size
    size["accumulate"] = args.accumulate
    result = run(size, args.variants, args.repeats, args.warmup, profile_steps=args.profile)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()))
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
