"""Training throughput and model FLOPs utilisation (MFU) of the paper's base configuration on one GPU.

    python bench/throughput.py                              # GPU: paper base, bf16, StableMoE stage 1 and 2
    python bench/throughput.py --micro-batch-size 4 --accumulate 16 --stages 2
    python bench/throughput.py --size tiny                  # runs anywhere (CPU: no MFU unless --peak-tflops)

The model is the paper's base setting (docs/ALGORITHMS.md §1, paper Table 7): 12 layers, d 768, FFN 3072, 12 heads, seq
1024, GPT-2 vocabulary (50,257, padded to 50,304), one MoE block after block 6 of 32 experts, each a
stack of 3 FFN sublayers; bf16 with fp32 main weights and grads (megatron's Float16Module, DDP,
Adam), built and stepped by the trainer's own code (bench/training.py) on synthetic token ids.
One iteration = ``--accumulate`` micro-batches + one optimizer step, as the trainer does for a
global batch (the paper's 512K-token batch is 64 such micro-batches on one GPU).

MFU = model FLOPs per second / the device's dense bf16 peak (H100 SXM / H200: 989 TFLOPS; others in
bench/training.py, or ``--peak-tflops``). Model FLOPs count a top-1 MoE model's ACTIVE matmuls only
(bench/training.py ``model_flops_per_token``: 3 x forward, attention scores not halved for the
causal mask, as Megatron-LM reports). Goal (issue #7): >= 40 % on one GPU.

Performance notes: with transformer-engine installed the layers use TE's fused attention and grouped
expert GEMMs (``HAVE_TE``); without it megatron's local spec runs unfused attention (a much lower
MFU). The configuration, backend and peak used are printed with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from stablemoe_megatron.routing import routing_names

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import PAPER_MODEL_FLAGS, config_size, init_single_process, machine_info, quantiles, synchronize  # noqa: E402
from bench.training import (  # noqa: E402
    build_job,
    config_from_flags,
    model_flops_per_token,
    parameter_counts,
    peak_tflops,
    release,
    step,
    synthetic_batches,
)

SIZES = {  # configs/base.yaml (paper Table 7) and configs/tiny.yaml, with a GPT-2 / the bundled corpus' vocabulary
    "paper": config_size("base", vocab=50257),
    "tiny": config_size("tiny", vocab=8000),
}


def flags(size: dict, router: str, accumulate: int) -> list:
    out = ["--num-layers", size["layers"], "--hidden-size", size["hidden"], "--ffn-hidden-size", size["ffn"],
           "--num-attention-heads", size["heads"], "--seq-length", size["seq"],
           "--micro-batch-size", size["micro"], "--global-batch-size", size["micro"] * accumulate,
           "--train-iters", 100000, "--lr", "6e-4", "--lr-warmup-iters", 2000, "--clip-grad", "0.1",
           "--adam-beta1", "0.9", "--adam-beta2", "0.98", "--weight-decay", "0.01",
           *PAPER_MODEL_FLAGS]
    if size["bf16"]:
        out.append("--bf16")
    if router != "dense":
        out += ["--num-experts", size["experts"], "--moe-router", router, "--moe-layer-positions", "middle",
                "--moe-sublayers-per-expert", size["sublayers"]]
    return [str(x) for x in out]


def measure(size: dict, router: str, stage: int, accumulate: int, steps: int, warmup: int) -> dict:
    config = config_from_flags(flags(size, router, accumulate))
    torch.manual_seed(1234)
    job = build_job(config, size["vocab"], stage=stage)
    batches = synthetic_batches(config, size["vocab"])
    params = parameter_counts(job.model)
    flops = model_flops_per_token(config, size["vocab"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(job, batches)
    samples = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        step(job, batches)
        synchronize()
        samples.append(time.perf_counter() - start)
    tokens = size["micro"] * size["seq"] * accumulate
    p25, med, p75 = quantiles(samples)
    out = {"router": router, "stage": stage, "tokens_per_step": tokens, "step_s": med, "step_quartiles_s": [p25, p75],
           "tokens_per_s": tokens / med, "train_flops_per_token": flops["total"], "flops_breakdown": flops,
           "model_tflops_per_s": tokens * flops["total"] / med / 1e12, "params": params,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None}
    release(job)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on a GPU, tiny otherwise")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--router", default="stablemoe", choices=(*routing_names(), "dense"),
                   help="routing algorithm of the MoE model, or dense (no MoE block)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=(1, 2),
                   help="StableMoE stage(s) to measure (stage 2 = frozen token-id routing, 90 %% of the paper's run)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from the GPU's name)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    init_single_process(args.threads)
    size = dict(SIZES[args.size or ("paper" if torch.cuda.is_available() else "tiny")])
    if args.micro_batch_size:
        size["micro"] = args.micro_batch_size
    if args.bf16 is not None:
        size["bf16"] = args.bf16
    from stablemoe_megatron.model.specs import HAVE_TE

    peak = args.peak_tflops or peak_tflops()
    stages = args.stages if args.router == "stablemoe" else [1]
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items()))
    moe_desc = "" if args.router == "dense" else (
        f" x{size['experts']} experts of {size['sublayers']} sublayers (one MoE block after block {size['layers'] // 2})")
    backend = "transformer-engine" if HAVE_TE else "megatron local (no TE)"
    peak_desc = "unknown" if peak is None else f"{peak:.0f} TFLOPS"
    print(f"configuration: {size['layers']} layers, d {size['hidden']}, FFN {size['ffn']}, {size['heads']} heads, "
          f"seq {size['seq']}, vocab {size['vocab']}, {args.router}{moe_desc}, "
          f"{'bf16' if size['bf16'] else 'fp32'}, micro-batch {size['micro']} x {args.accumulate} accumulated "
          f"= {size['micro'] * size['seq'] * args.accumulate} tokens per step, backend {backend}, peak {peak_desc}")
    results = []
    for stage in stages:
        r = measure(size, args.router, stage, args.accumulate, args.steps, args.warmup)
        r["mfu"] = r["model_tflops_per_s"] / peak if peak else None
        results.append(r)
        mfu = "n/a (no peak for this device; --peak-tflops)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        goal = "" if r["mfu"] is None else f" (goal >= 40%: {'met' if r['mfu'] >= 0.40 else 'NOT met'})"
        mem = "" if r["peak_memory_gib"] is None else f", peak memory {r['peak_memory_gib']:.1f} GiB"
        print(f"stage {stage}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_s'] * 1e3:.1f} ms "
              f"[{r['step_quartiles_s'][0] * 1e3:.1f}, {r['step_quartiles_s'][1] * 1e3:.1f}], "
              f"{r['train_flops_per_token'] / 1e9:.3f} GFLOPs/token, {r['model_tflops_per_s']:.2f} model TFLOPS, "
              f"MFU {mfu}{goal}{mem}; params {r['params']['total'] / 1e6:.1f}M "
              f"({r['params']['expert'] / 1e6:.1f}M expert)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "router": args.router, "accumulate": args.accumulate, "peak_tflops": peak,
                       "machine": machine_info(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
