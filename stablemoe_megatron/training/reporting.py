"""Logging on the last rank: Megatron's iteration line, TensorBoard scalars, JSONL records.

MoE statistics are gathered from every rank at each log interval (one ``all_gather_object``):
``tokens_per_expert`` is summed over ranks (TP shards and DP replicas route different tokens) and
averaged over the interval's steps; balance / distillation / auxiliary / z losses are partial sums
on sequence-parallel shards, so they are summed over TP and averaged over DP; agreement, mean gate
and dropped fraction are averaged. Scalars are means over the interval's micro-batches.
Each layer with token counts also gets its expert-load statistics
(:func:`stablemoe_megatron.analysis.load.expert_load_statistics`: load_min/max/mean/cv,
load_max_over_mean, dead_experts) and a dropped_fraction (0 for routers that never drop).
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Dict, Optional

import torch

from stablemoe_megatron.analysis.load import expert_load_statistics
from stablemoe_megatron.runtime import is_last_rank

SUMMED_OVER_TP = ("balance_loss", "distill_loss", "aux_loss", "z_loss")
JSONL_LAYER_KEYS = ("tokens_per_expert", "balance_loss", "distill_loss", "distill_agreement", "aux_loss")


def gather_moe_metrics(model, steps: int) -> Dict[int, dict]:
    """{layer number: merged metrics} on every rank (collective); resets the layers' sums."""
    from megatron.core import parallel_state as ps

    local = {}
    for layer, values in model.moe_metrics(reset=True).items():
        local[layer] = {k: (v.detach().cpu().tolist() if v.dim() else float(v)) for k, v in values.items()}
    entry = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), local)
    entries = [entry]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        entries = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(entries, entry)
    return _merge(entries, max(steps, 1))


def _merge(entries, steps: int) -> Dict[int, dict]:
    per_layer: Dict[int, list] = {}
    for tp_rank, dp_rank, layers in entries:
        for layer, values in layers.items():
            per_layer.setdefault(layer, []).append((tp_rank, dp_rank, values))
    merged = {}
    for layer, items in sorted(per_layer.items()):
        out = {}
        counts = [v["tokens_per_expert"] for _, _, v in items if "tokens_per_expert" in v]
        if counts:
            out["tokens_per_expert"] = [sum(c) / steps for c in zip(*counts)]
            out.update(expert_load_statistics(out["tokens_per_expert"]))
        names = {k for _, _, v in items for k in v if k != "tokens_per_expert"}
        for name in sorted(names):
            if name in SUMMED_OVER_TP:
                by_dp: Dict[int, float] = {}
                for _, dp, v in items:
                    by_dp[dp] = by_dp.get(dp, 0.0) + v.get(name, 0.0)
                out[name] = sum(by_dp.values()) / len(by_dp)
            else:
                values = [v[name] for _, _, v in items if name in v]
                out[name] = sum(values) / len(values)
        if counts:
            out.setdefault("dropped_fraction", 0.0)
        merged[layer] = out
    return merged


class Reporter:
    """Writes the run's logs; only the last rank writes anything."""

    def __init__(self, tensorboard_dir: Optional[str], metrics_file: Optional[str], train_iters: int):
        self.active = is_last_rank()
        self.train_iters = train_iters
        self.writer = None
        self.jsonl = None
        if self.active and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if self.active and metrics_file:
            self.jsonl = open(metrics_file, "a", encoding="utf-8")

    def message(self, text: str) -> None:
        if self.active:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}", flush=True)

    def record(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def iteration(self, record: dict, moe: Dict[int, dict]) -> None:
        """Print the Megatron iteration line and write TB scalars and a JSONL record."""
        if not self.active:
            return
        # Every layer record names the standard losses; null = not produced by this router/stage.
        layers = {str(k): {**{name: None for name in JSONL_LAYER_KEYS}, **v} for k, v in moe.items()}
        record = dict(record, moe_layers=layers)
        self.record(record)
        self._tensorboard(record, moe)
        print(self._line(record, moe), flush=True)
        sys.stdout.flush()

    def _line(self, r: dict, moe: Dict[int, dict]) -> str:
        def total(name):
            values = [v[name] for v in moe.values() if name in v]
            return sum(values) if values else None

        parts = [f" iteration {r['iteration']:8d}/{self.train_iters:8d}",
                 f"consumed samples: {r['consumed_samples']:12d}",
                 f"elapsed time per iteration (ms): {r['elapsed_ms']:.1f}",
                 f"learning rate: {r['lr']:.6E}", f"global batch size: {r['global_batch_size']:5d}",
                 f"lm loss: {r['lm_loss']:.6E}"]
        for label, name in (("balance loss", "balance_loss"), ("distill loss", "distill_loss"),
                            ("aux loss", "aux_loss")):
            value = total(name)
            if value is not None:
                parts.append(f"{label}: {value:.6E}")
        if r.get("loss_scale") is not None:
            parts.append(f"loss scale: {r['loss_scale']:.1f}")
        if r.get("grad_norm") is not None:
            parts.append(f"grad norm: {r['grad_norm']:.3f}")
        if r.get("skipped_iterations"):
            parts.append(f"number of skipped iterations: {r['skipped_iterations']:3d}")
        worst = max((v["load_max_over_mean"] for v in moe.values() if "load_max_over_mean" in v), default=None)
        if worst is not None:
            parts.append(f"max/mean expert load: {worst:.2f}")
        dead = sum(v.get("dead_experts", 0) for v in moe.values())
        if dead:
            parts.append(f"dead experts: {dead}")
        parts.append(f"tokens/s: {r['tokens_per_sec']:.0f}")
        parts.append(f"stage: {r['stage']}")
        if r.get("routing_changed") is not None:
            parts.append(f"routing changed: {r['routing_changed']}")
        return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}]" + " | ".join(parts) + " |"

    def _tensorboard(self, r: dict, moe: Dict[int, dict]) -> None:
        if self.writer is None:
            return
        step = r["iteration"]
        for name in ("lm_loss", "lr", "grad_norm", "tokens_per_sec", "stage"):
            if r.get(name) is not None:
                self.writer.add_scalar(f"train/{name}", r[name], step)
        for layer, values in moe.items():
            for name, value in values.items():
                if isinstance(value, list):
                    for expert, count in enumerate(value):
                        self.writer.add_scalar(f"moe/layer{layer}/{name}/expert{expert}", count, step)
                elif value is not None:
                    self.writer.add_scalar(f"moe/layer{layer}/{name}", value, step)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def validation(self, split: str, iteration: int, loss: float) -> None:
        ppl = math.exp(min(loss, 50.0))
        self.message(f"{split} loss at iteration {iteration} | lm loss: {loss:.6E} | lm loss PPL: {ppl:.3f}")
        self.record({"iteration": iteration, "split": split, "val_loss": loss, "val_ppl": ppl})
        self.scalars(split, {"loss": loss, "ppl": ppl}, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
