"""Real trainer steps on synthetic batches, for the step-time and throughput benches.

A step is exactly the trainer's :func:`stablemoe_megatron.training.step.train_step` (megatron's
forward-backward schedule, DDP grad buffers, megatron's Adam with clipping, the distilled router's
own optimizer in stage 1, the LR schedule), on a model, DDP wrapper and optimizers built by
:func:`stablemoe_megatron.training.build.build` (mode ``"bench"``) from ordinary trainer flags.
Batches are synthetic token ids (uniform over the vocabulary, seeded), already in memory, so data
loading is not measured.

Model FLOPs (:func:`model_flops_per_token`) count the matmuls a training step must do for one token
(forward x 3): the attention projections, dense MLPs, the ACTIVE expert sublayers (top-1: one
expert stack per token), the router, the LM head, and the attention score / value products
(2 x 2 x s x d per layer, not halved for the causal mask, as Megatron-LM's own MFU formula).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Dict, Iterator, List, Optional

import torch

from bench.common import device


def config_from_flags(flags: List[str]):
    from stablemoe_megatron.cli_args import parse_config

    return parse_config(flags)


def padded_vocab(config, vocab: int) -> int:
    return config.model.padded_vocab_size(vocab, config.parallel.tensor_model_parallel_size)


def build_job(config, vocab: int, dense_equivalent: bool = False, stage: int = 1):
    """A :class:`stablemoe_megatron.training.trainer.Trainer` ready for ``train_step`` (groups already set up).

    dense_equivalent: every MoE layer (build the config with ``--num-experts 1``) runs its single
    expert stack on every token without routing or dispatch: the same model as the MoE one at equal
    active FLOPs, with no router, gate or dispatcher (see :func:`make_dense_equivalent`).
    stage: 2 freezes the distilled routers first, as the trainer does at the switch.
    """
    from stablemoe_megatron.training.build import build

    trainer = build(config, "bench", vocab_size=padded_vocab(config, vocab))
    if dense_equivalent:
        make_dense_equivalent(trainer.model)
    if stage == 2:
        trainer.enter_stage_two()
    return trainer


def _dense_forward(self, hidden_states, padding_mask=None):
    """StableMoELayer.forward without routing: its one expert stack on every token, gate 1."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    counts = torch.tensor([flat.shape[0]], dtype=torch.long)  # host count: no sync
    return self.experts(flat, counts).view(hidden_states.shape), None


def make_dense_equivalent(model) -> None:
    """Turn every 1-expert MoE layer of ``model`` into a plain dense stack of its K sublayers.

    The paper layout's block then computes ``h + (z_K - h) = z_K``: K pre-LayerNorm FFN sublayers
    with residuals applied to every token, exactly the active computation of a top-1 MoE layer.
    """
    for layer in model.moe_layers:
        if layer.moe.num_experts != 1:
            raise ValueError("the dense equivalent is built from a 1-expert model (--num-experts 1)")
        layer.forward = types.MethodType(_dense_forward, layer)


@torch.no_grad()
def check_dense_equivalent(job, batch) -> float:
    """max |loss difference| of the dense-equivalent model vs the same 1-expert hash MoE model routed.

    Hash routing with one expert sends every token to it with gate 1, so the routed layer computes
    ``h + 1 * (z_K - h)``: the dense shortcut must give the same per-token losses (up to rounding).
    """
    model = job.model
    tokens = batch["tokens"].to(device())
    args = (tokens, batch["position_ids"].to(device()), None)
    kwargs = dict(labels=batch["labels"].to(device()), host_token_ids=batch["tokens"])
    was_training = model.training
    model.eval()
    dense = job.ddp_model(*args, **kwargs).float()
    patched = {layer: layer.__dict__.pop("forward") for layer in model.moe_layers if "forward" in layer.__dict__}
    try:
        routed = job.ddp_model(*args, **kwargs).float()
    finally:
        for layer, fn in patched.items():
            layer.forward = fn
        model.train(was_training)
    return float((dense - routed).abs().max())


def synthetic_batches(config, vocab: int, seed: int = 0, pool: int = 8) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless micro-batches (host tensors, as the trainer's loader yields) cycling over ``pool``."""
    micro, seq = config.training.micro_batch_size, config.model.seq_length
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(pool):
        tokens = torch.randint(0, vocab, (micro, seq + 1), generator=gen)
        batches.append({
            "tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro, seq), "position_ids": torch.arange(seq).expand(micro, seq).contiguous(),
        })
    i = 0
    while True:
        yield batches[i % pool]
        i += 1


def step(job, batches) -> float:
    """One trainer iteration; returns the loss (a host float: one sync, after the optimizer step)."""
    from stablemoe_megatron.training.step import train_step

    result = train_step(job.step_context(), batches)
    if result.nonfinite:
        raise RuntimeError("non-finite loss in the benchmark step")
    return result.loss


def release(job) -> None:
    """Drop a job's tensors (GPU memory between variants)."""
    job.model = job.ddp_model = job.optimizer = job.side_optimizer = job.scheduler = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def model_flops_per_token(config, vocab: int) -> Dict[str, float]:
    """Training FLOPs per token (forward x 3), split by part; see the module doc."""
    from stablemoe_megatron.routing import get_routing

    m, moe = config.model, config.moe
    d, ffn, layers, seq = m.hidden_size, m.ffn_size, m.num_layers, m.seq_length
    v = padded_vocab(config, vocab)
    fwd = {
        "attention projections": layers * 2 * 4 * d * d,
        "attention scores": layers * 2 * 2 * seq * d,
        "dense MLP": 0.0,
        "experts (active)": 0.0,
        "router": 0.0,
        "LM head": 2 * d * v,
    }
    if moe.enabled:
        placement = moe.moe_placement(layers)
        expert_ffn = moe.expert_ffn_hidden_size or ffn
        k = moe.sublayers_per_moe_layer()
        if moe.megatron_layout:
            fwd["dense MLP"] = (layers - len(placement)) * 2 * 2 * d * ffn
        else:
            fwd["dense MLP"] = layers * 2 * 2 * d * ffn
        per_token_experts = 1.0
        if not get_routing(moe.router).one_pair_per_token:  # expert choice: on average c experts per token
            per_token_experts = moe.expert_capacity_factor or 2.0
        fwd["experts (active)"] = len(placement) * k * 2 * 2 * d * expert_ffn * per_token_experts
        fwd["router"] = len(placement) * 2 * d * moe.num_experts
    else:
        fwd["dense MLP"] = layers * 2 * 2 * d * ffn
    out = {name: 3.0 * value for name, value in fwd.items()}
    out["total"] = sum(out.values())
    return out


def parameter_counts(model) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return {"total": total, "expert": expert, "shared": total - expert}


PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peak, by device name
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.4, "A100": 312.0, "L40S": 362.05, "A10G": 70.0,
}


def peak_tflops(name: Optional[str] = None) -> Optional[float]:
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():  # insertion order: the more specific names first
        if key in name:
            return value
    return None


def replace_config(config, **sections):
    """RunConfig with some fields of its sections replaced: replace_config(c, moe=dict(num_experts=1))."""
    updates = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **updates)


def on_device_note() -> str:
    return f"device {device()}"
