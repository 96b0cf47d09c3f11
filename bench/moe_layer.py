"""MoE-layer benchmark: each of our routers against megatron-core's own TopKRouter + allgather dispatcher.

    python bench/moe_layer.py                       # CPU sizes (2 cores: about 2-4 minutes)
    python bench/moe_layer.py --preset paper        # the paper's base layer (GPU: bf16, 8192 tokens)
    python bench/moe_layer.py --routers switch stablemoe-s2 --repeats 50 --json out.json

Every variant is one MoE layer with the same tokens (``--seq x --batch``), hidden size, experts and
expert FFN size, in the Megatron layout (single-FFN experts, megatron's expert MLP modules on both
sides), in training mode:

* ``megatron``     megatron-core's MoELayer: TopKRouter (top-1, softmax before top-k, Switch aux
                   loss) + MoEAllGatherTokenDispatcher + its SequentialMLP / TEGroupedMLP experts;
* ``switch``       our switch router (the same function: top-1 of softmax(W h), gate = its
                   probability, the same aux loss) + our AllToAllDispatcher;
* ``stablemoe-s1`` StableMoE stage 1 (greedy centroid routing, balance loss, word-embedding
                   distillation loss);
* ``stablemoe-s2`` stage 2 (frozen distilled router, routing = table[token id]) with the CPU copy
                   of the token ids, as the trainer runs it; ``stablemoe-s2-noids`` without it;
* ``hash``         (with host token ids), ``base`` (auction), ``expert-choice`` (capacity factor 1:
                   the same expert FLOPs as top-1 on average).

Before timing, ``switch`` and ``megatron`` get the same weights (router and every expert's fc1 /
fc2) and must agree: layer output, input gradient, router and expert weight gradients
(fp32: 1e-5 relative). Two measurements per variant, fwd and fwd+bwd:

* ``routing + dispatch + combine``: the experts replaced by the identity on both sides (megatron's
  experts multiply by the routing probability; ours leave that to combine), so the time is the
  router, permutation / dispatch, un-permutation / combine and the layer's bookkeeping;
* ``whole layer``: with the experts.

Device-to-host synchronisations per layer forward, counted two ways (see bench/common.py):
``syncs``: every op that would block the host on a GPU (HostSyncCounter: ``.cpu/.item/.tolist``,
``nonzero/masked_select/bincount/unique``, boolean-mask indexing ...), traced on any device;
``d2h``: the dispatcher's own ``_to_host`` calls (the counter the library exposes).

Timing: interleaved rounds, warm-up, medians with interquartile ranges, per-round ratios to
``megatron`` (bench/common.py). On CPU, stablemoe_megatron.cpu_compat's per-op device-rewriting
mode is paused during timing (it exists only on CPU and would tax every op).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    compat_mode_paused,
    count_dispatcher_host_copies,
    count_host_syncs,
    device,
    fmt_ratio,
    fmt_spread,
    init_single_process,
    machine_info,
    markdown_table,
    quantiles,
    time_interleaved,
)

PRESETS = {
    # 2 CPU cores: a few milliseconds per layer call
    "cpu": dict(seq=512, batch=4, hidden=256, ffn=1024, experts=8, vocab=8000, bf16=False),
    # the paper's base MoE layer (Table 7) at one micro-batch of 8 x 1024 tokens
    "paper": dict(seq=1024, batch=8, hidden=768, ffn=3072, experts=32, vocab=50304, bf16=True),
    # the smoke test
    "smoke": dict(seq=16, batch=4, hidden=32, ffn=64, experts=4, vocab=128, bf16=False),
}
AUX_LOSS_COEFF = 0.01
REFERENCE_ROUTER = "switch"  # ours that computes megatron-core's TopKRouter layer (checked, then timed first)
# Variants of a router with a default distilled router (StableMoE): suffix -> (stage, CPU token ids given)
STAGE_VARIANTS = {"-s1": (1, False), "-s2": (2, True), "-s2-noids": (2, False), "-s2-dropless": (2, True)}
# ... "-dropless": no token shuffle and a capacity that keeps every token (c = N): megatron's semantics
DROPLESS = "-dropless"


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a benchmark variant name means: the --moe-router, the stage, whether the layer gets
    the CPU copy of the token ids (as the trainer gives it to token-id routing), and whether it
    runs with the recipe's defaults (StableMoE: capacity factor 2 and the token shuffle, the
    authors') or dropless without the shuffle, as megatron's layer routes."""

    router: str
    stage: int
    host_ids: bool
    dropless: bool = False


def variant(name: str) -> Variant:
    """The :class:`Variant` of ``name`` (``megatron``, a router name, or a router's stage variant)."""
    from stablemoe_megatron.routing import get_routing, routing_names

    if name == "megatron":
        return Variant(REFERENCE_ROUTER, 1, False)
    for suffix, (stage, host_ids) in STAGE_VARIANTS.items():
        if name.endswith(suffix) and name[: -len(suffix)] in routing_names():
            return Variant(name[: -len(suffix)], stage, host_ids, name.endswith(DROPLESS))
    return Variant(name, 1, get_routing(name).uses_token_ids)


def all_routers() -> tuple:
    """Every registered router once, as its stage variants if it has a default distilled router.

    Report order: the reference router, the stage variants, the routers without parameters, the
    other learned ones (registry order within each group).
    """
    from stablemoe_megatron.routing import get_routing, routing_names

    def group(name):
        algorithm = get_routing(name)
        return name != REFERENCE_ROUTER, algorithm.default_distill_router is None, algorithm.learned

    names = sorted(routing_names(), key=group)  # a stable sort
    return tuple(name + suffix if suffix else name for name in names
                 for suffix in (STAGE_VARIANTS if get_routing(name).default_distill_router else ("",)))


ALL_ROUTERS = all_routers()


# ------------------------------------------------------------------------------------------------
# building the layers
# ------------------------------------------------------------------------------------------------
def _configs(sizes: dict, router: str):
    """(megatron TransformerConfig, our MoEConfig) for one variant."""
    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    from stablemoe_megatron.routing import get_routing

    chosen = variant(router)
    name = chosen.router
    # a router without one expert per token (Expert Choice) gets capacity factor 1: on average one
    # expert per token, the expert FLOPs of top-1
    options = dict(expert_capacity_factor=None if get_routing(name).one_pair_per_token else 1.0)
    if chosen.dropless:
        options.update(expert_capacity_factor=float(sizes["experts"]), token_shuffle=False)
    moe = MoEConfig(num_experts=sizes["experts"], router=name, layer_freq=1, sublayers_per_expert=1,
                    aux_loss_coeff=AUX_LOSS_COEFF, **options)
    model = ModelConfig(num_layers=2, hidden_size=sizes["hidden"], ffn_hidden_size=sizes["ffn"],
                        num_attention_heads=max(1, sizes["hidden"] // 64), seq_length=sizes["seq"],
                        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False)
    config = transformer_config(model, moe, bf16=sizes["bf16"])
    # no DDP here, so no main_grad buffers for TE's fused weight-gradient accumulation
    config = dataclasses.replace(config, gradient_accumulation_fusion=False,
                                 moe_token_dispatcher_type="allgather",
                                 moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=AUX_LOSS_COEFF,
                                 moe_router_dtype="fp32")  # our routers compute in fp32 too (bf16 runs)
    return config, moe


def build_megatron_layer(sizes: dict):
    """megatron-core's MoELayer: TopKRouter + allgather dispatcher + its expert MLPs."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.spec_utils import build_module

    from stablemoe_megatron.model.specs import HAVE_TE, _backend

    config, _ = _configs(sizes, "megatron")
    spec = get_moe_module_spec_for_backend(_backend(HAVE_TE), num_experts=sizes["experts"],
                                           moe_grouped_gemm=HAVE_TE)
    layer = build_module(spec, config=config)
    layer.set_layer_number(1)
    return layer.to(device()).train()


def build_our_layer(sizes: dict, router: str):
    """Our StableMoELayer for ``router`` (one of ALL_ROUTERS), in training mode, stage set."""
    from megatron.core.transformer.spec_utils import build_module

    from stablemoe_megatron.model.specs import HAVE_TE, moe_layer_spec

    config, moe = _configs(sizes, router)
    spec = moe_layer_spec(moe, sizes["vocab"], HAVE_TE, num_sublayers=1, pre_norm=False)
    layer = build_module(spec, config=config)
    layer.set_layer_number(1)
    layer = layer.to(device()).train()
    if variant(router).stage == 2:
        layer.router.freeze_distilled()
    return layer


def copy_megatron_weights_to_switch(megatron_layer, switch_layer) -> None:
    """Same router weight and expert fc1 / fc2 weights on both sides."""
    with torch.no_grad():
        switch_layer.router.weight.copy_(megatron_layer.router.weight.float())
        ours = dict(switch_layer.experts.sublayers[0].named_parameters())
        theirs = dict(megatron_layer.experts.named_parameters())
        if set(ours) != set(theirs):
            raise RuntimeError(f"expert parameter names differ: {sorted(ours)} vs {sorted(theirs)}")
        for name, param in theirs.items():
            ours[name].copy_(param)


class _IdentityExperts(torch.nn.Module):
    """Our expert interface, returning its input (the gate is applied by combine)."""

    def forward(self, hidden, tokens_per_expert):
        return hidden


class _MegatronIdentityExperts(torch.nn.Module):
    """megatron's expert interface, returning its input times the routing probability (as its MLPs do)."""

    def forward(self, hidden, tokens_per_expert, probs):
        return hidden * probs.unsqueeze(-1).to(hidden.dtype), None


def strip_experts(layer, megatron: bool) -> None:
    layer.experts = _MegatronIdentityExperts() if megatron else _IdentityExperts()


# ------------------------------------------------------------------------------------------------
# inputs and calls
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor  # [S, B, h] leaf, requires grad
    grad: torch.Tensor  # [S, B, h]
    ids: torch.Tensor  # [B, S] device
    host_ids: torch.Tensor  # [B, S] CPU


def make_inputs(sizes: dict, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if sizes["bf16"] else torch.float32
    s, b, h = sizes["seq"], sizes["batch"], sizes["hidden"]
    hidden = torch.randn(s, b, h, generator=gen).to(device(), dtype).requires_grad_(True)
    grad = torch.randn(s, b, h, generator=gen).to(device(), dtype)
    host_ids = torch.randint(0, sizes["vocab"], (b, s), generator=gen)
    ids = host_ids.to(device())
    if ids is host_ids:  # CPU: a distinct tensor stands for the device copy (the sync counter tells them apart)
        ids = host_ids.clone()
    return Inputs(hidden, grad, ids, host_ids)


def prepare_call(layer, router: str, inputs: Inputs) -> None:
    if router != "megatron":
        layer.set_token_ids(inputs.ids, inputs.host_ids if variant(router).host_ids else None)


def forward(layer, inputs: Inputs) -> torch.Tensor:
    out, _ = layer(inputs.hidden)
    return out


def forward_backward(layer, inputs: Inputs) -> torch.Tensor:
    out = forward(layer, inputs)
    out.backward(inputs.grad)
    return out


def _reset_grads(layer, inputs: Inputs) -> None:
    layer.zero_grad(set_to_none=True)
    inputs.hidden.grad = None


# ------------------------------------------------------------------------------------------------
# correctness: our switch == megatron's TopKRouter layer
# ------------------------------------------------------------------------------------------------
def check_switch_matches_megatron(sizes: dict, with_experts: bool = True) -> Dict[str, float]:
    """Relative max differences (output, input grad, router grad, expert grads) of switch vs megatron."""
    mg = build_megatron_layer(sizes)
    ours = build_our_layer(sizes, REFERENCE_ROUTER)
    copy_megatron_weights_to_switch(mg, ours)
    if not with_experts:
        strip_experts(mg, True)
        strip_experts(ours, False)
    inputs = make_inputs(sizes, seed=1)
    results = {}
    outs, grads = {}, {}
    for name, layer in (("megatron", mg), ("switch", ours)):
        prepare_call(layer, name, inputs)
        _reset_grads(layer, inputs)
        outs[name] = forward_backward(layer, inputs).detach().float()
        grads[name] = {"input": inputs.hidden.grad.detach().float().clone(),
                       "router": layer.router.weight.grad.detach().float().clone()}
        if with_experts:
            experts = layer.experts if name == "megatron" else layer.experts.sublayers[0]
            for pname, p in experts.named_parameters():
                grads[name]["expert " + pname] = p.grad.detach().float().clone()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    results["output"] = rel(outs["switch"], outs["megatron"])
    for key in grads["megatron"]:
        results[key + " grad"] = rel(grads["switch"][key], grads["megatron"][key])
    return results


def tolerance(sizes: dict) -> float:
    return 2e-2 if sizes["bf16"] else 1e-5


# ------------------------------------------------------------------------------------------------
# host synchronisations of one forward
# ------------------------------------------------------------------------------------------------
def count_syncs(layer, router: str, inputs: Inputs):
    """(syncs, what, dispatcher d2h calls) of one training forward of ``layer``."""
    prepare_call(layer, router, inputs)
    host = [inputs.host_ids]
    table = getattr(layer.router, "_host_table", None)
    if table is not None:
        host.append(table)
    _reset_grads(layer, inputs)
    with count_dispatcher_host_copies() as d2h, count_host_syncs(host) as counter:
        forward(layer, inputs)
    return counter.count, counter.summary(), (d2h() if router != "megatron" else None)


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def run(sizes: dict, routers: List[str], repeats: int, warmup: int, inner: int,
        measures=("dispatch", "layer", "memory"), check: bool = True, verbose: bool = True) -> dict:
    """Build, check, count syncs, time. Returns a JSON-able dict of everything measured."""
    log = print if verbose else (lambda *a, **k: None)
    result = {"sizes": dict(sizes), "routers": routers, "repeats": repeats, "warmup": warmup, "inner": inner,
              "machine": machine_info(), "tokens": sizes["seq"] * sizes["batch"]}
    if check:
        checks = {"with experts": check_switch_matches_megatron(sizes, True),
                  "identity experts": check_switch_matches_megatron(sizes, False)}
        tol = tolerance(sizes)
        result["check"] = checks
        result["check_tolerance"] = tol
        worst = max(v for c in checks.values() for v in c.values())
        result["check_passed"] = worst <= tol
        log(f"check: our switch vs megatron TopKRouter+allgather, relative max |diff| (tolerance {tol:g}):")
        for label, diffs in checks.items():
            log(f"  {label}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        if not result["check_passed"]:
            raise SystemExit(f"our switch layer does not match megatron's (worst {worst:.2e} > {tol:g}): not timing")
    inputs = make_inputs(sizes)
    variants = ["megatron"] + [r for r in routers if r != "megatron"]
    result["measures"] = {}
    if "memory" in measures:
        result["memory"] = measure_memory(sizes, variants, inputs)
    for measure in (m for m in measures if m != "memory"):
        layers = {}
        for name in variants:
            layer = build_megatron_layer(sizes) if name == "megatron" else build_our_layer(sizes, name)
            if measure == "dispatch":
                strip_experts(layer, name == "megatron")
            layers[name] = layer
        syncs = {name: count_syncs(layer, name, inputs) for name, layer in layers.items()}
        rows = {}
        for mode in ("fwd", "fwd+bwd"):
            step = forward if mode == "fwd" else forward_backward

            def make(name, layer=None):
                layer = layers[name]

                def call():
                    prepare_call(layer, name, inputs)
                    step(layer, inputs)
                return call

            fns: Dict[str, Callable] = {name: make(name) for name in variants}
            with compat_mode_paused():
                timings = time_interleaved(fns, repeats=repeats, warmup=warmup, inner=inner)
            for name in variants:
                entry = rows.setdefault(name, {})
                entry[mode] = {"median_s": timings.median(name),
                               "quartiles_s": quantiles(timings.samples[name]),
                               "ratio_to_megatron": timings.ratio(name, "megatron"),
                               "samples_s": timings.samples[name]}
        for name in variants:
            rows[name]["syncs"], rows[name]["sync_ops"], rows[name]["dispatcher_d2h"] = syncs[name]
        result["measures"][measure] = rows
    return result


def measure_memory(sizes: dict, variants: List[str], inputs: Inputs) -> Dict[str, dict]:
    """Peak memory of one training forward + backward of each whole layer (with experts), above
    what was allocated before the call (bench/profiling.py): {variant: {"peak_bytes", "ratio"}}.
    Each layer is built alone and measured after two warm-up calls (lazy state allocated)."""
    from bench.profiling import peak_memory

    out = {}
    for name in variants:
        layer = build_megatron_layer(sizes) if name == "megatron" else build_our_layer(sizes, name)

        def call():
            prepare_call(layer, name, inputs)
            forward_backward(layer, inputs)
        for _ in range(3):  # the last call's gradients are freed before the measured one
            _reset_grads(layer, inputs)
            call()
        _reset_grads(layer, inputs)
        with compat_mode_paused():
            peak = peak_memory(call)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters() if p.grad is not None)
        out[name] = {"peak_bytes": peak, "grad_bytes": grads}
        del layer
    for name in variants:
        out[name]["ratio"] = out[name]["peak_bytes"] / max(out["megatron"]["peak_bytes"], 1)
    return out


MEASURE_TITLES = {"dispatch": "routing + dispatch + combine (identity experts)", "layer": "whole MoE layer (with experts)"}


def report(result: dict) -> str:
    s = result["sizes"]
    lines = [f"MoE layer: {result['tokens']} tokens ({s['seq']} x {s['batch']}), hidden {s['hidden']}, "
             f"{s['experts']} experts, expert FFN {s['ffn']}, {'bf16' if s['bf16'] else 'fp32'}, "
             f"training mode; {result['repeats']} interleaved rounds x {result['inner']} calls after "
             f"{result['warmup']} warm-up rounds; median [p25, p75]; ratio = per-round time / megatron's"]
    for measure, rows in result["measures"].items():
        lines.append("")
        lines.append(f"### {MEASURE_TITLES[measure]}")
        table = []
        for name, row in rows.items():
            f, fb = row["fwd"], row["fwd+bwd"]
            table.append([name, fmt_spread(*f["quartiles_s"]), fmt_ratio(f["ratio_to_megatron"]),
                          fmt_spread(*fb["quartiles_s"]), fmt_ratio(fb["ratio_to_megatron"]),
                          f"{row['syncs']} ({row['sync_ops']})",
                          "-" if row["dispatcher_d2h"] is None else row["dispatcher_d2h"]])
        lines.append(markdown_table(["variant", "fwd", "fwd / megatron", "fwd+bwd", "fwd+bwd / megatron",
                                     "host syncs per fwd (ops)", "dispatcher d2h"], table))
    if "memory" in result:
        lines.append("")
        lines.append("### peak memory of one forward + backward (whole layer, above what was allocated before)")
        lines.append(markdown_table(["variant", "peak", "/ megatron", "of which parameter gradients"], [
            [name, f"{m['peak_bytes'] / 2 ** 20:.1f} MiB", f"{m['ratio']:.3f}x", f"{m['grad_bytes'] / 2 ** 20:.1f} MiB"]
            for name, m in result["memory"].items()]))
        worst = max((m["ratio"], name) for name, m in result["memory"].items() if name != "megatron")
        lines.append(f"goal: peak memory of our layer <= 1.0x megatron's, every router: worst {worst[1]} "
                     f"{worst[0]:.3f}x -> {'met' if worst[0] <= 1.0 else 'NOT met'}")
    dispatch = result["measures"].get("dispatch", {})
    stage_two = [name for name in ("stablemoe-s2", "stablemoe-s2-dropless") if name in dispatch]
    if stage_two:
        lines.append("")
    for name in stage_two:
        for mode, goal in (("fwd", 0.5), ("fwd+bwd", 0.4)):
            ratio = dispatch[name][mode]["ratio_to_megatron"][1]
            verdict = "met" if ratio <= goal else "NOT met"
            lines.append(f"goal: {name} routing + dispatch + combine {mode} <= {goal}x megatron's: "
                         f"{ratio:.3f}x -> {verdict}")
    if "base" in dispatch:  # BASE's auction: host syncs of one forward, and its forward time
        syncs = dispatch["base"]["syncs"]
        ratio = dispatch["base"]["fwd"]["ratio_to_megatron"][1]
        lines.append("")
        lines.append(f"BASE host syncs per call: {syncs} (goal <= 8: {'met' if syncs <= 8 else 'not met'})")
        lines.append(f"BASE routing + dispatch + combine fwd / megatron's: {ratio:.3f}x "
                     f"(goal <= 2x: {'met' if ratio <= 2 else 'not met'})")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes (default: paper on a GPU, cpu otherwise)")
    for name in ("seq", "batch", "hidden", "ffn", "experts", "vocab"):
        p.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 parameters and inputs")
    p.add_argument("--routers", nargs="+", choices=ALL_ROUTERS, default=list(ALL_ROUTERS))
    p.add_argument("--measures", nargs="+", choices=("dispatch", "layer", "memory"),
                   default=["dispatch", "layer", "memory"])
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 40 CPU / 100 GPU)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--inner", type=int, default=None, help="calls per sample (default 3 CPU / 10 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write every sample and statistic here")
    return p.parse_args(argv)


def sizes_from_args(args) -> dict:
    preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
    sizes = dict(PRESETS[preset])
    for name in ("seq", "batch", "hidden", "ffn", "experts", "vocab", "bf16"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    sizes["preset"] = preset
    return sizes


def main(argv=None) -> int:
    args = parse_args(argv)
    init_single_process(args.threads)
    sizes = sizes_from_args(args)
    gpu = torch.cuda.is_available()
    repeats = args.repeats or (100 if gpu else 40)
    inner = args.inner or (10 if gpu else 3)
    result = run(sizes, args.routers, repeats, args.warmup, inner, tuple(args.measures))
    print("machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()))
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    from stablemoe_megatron.parallel import destroy_parallel_state

    destroy_parallel_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
