"""The routing probe (a training callback): every N iterations, route a fixed set of held-out tokens and log what changed.

:meth:`RoutingProbe.for_trainer` picks the probe tokens (``--routing-probe-tokens`` tokens of the
validation data, seeded by ``--seed``: identical on every rank and across resumes), and opens the
history (:mod:`stablemoe_megatron.analysis.history`) on the last rank.

A probe (:meth:`RoutingProbe.run`, a collective: every rank calls it) is one forward-only pass of
megatron's schedule over the probe sequences, in evaluation mode (no dropout, no capacity dropping,
BASE routes greedily, Expert Choice by its causal thresholds; the layers' training statistics are
untouched because they only accumulate in training mode) with ``torch.no_grad``. It works under
every layout: every pipeline stage runs the schedule; every data-parallel rank routes all probe
sequences (the probe is small, and expert-parallel all-to-alls need every rank in the forward),
and the ranks of data-parallel rank 0 send their layers' choices (their sequence shard under
sequence parallelism) to the last rank with one ``all_gather_object``; the last rank assembles
them, compares with the previous probe, logs and appends to the history.

Views recorded per MoE layer: ``routed`` (the expert the layer used; the highest-gate expert for
Expert Choice, or "none"), and ``backbone`` / ``distilled`` (the learned router's greedy choice
and the distilled token-id router's choice) where the router has a distilled router, or
``backbone`` (the top-probability expert) for Expert Choice.

Logged (last rank), per probe, to the metrics JSONL (and ``probes.jsonl`` of the history)::

    {"routing_probe": {"iteration": i, "stage": s, "num_tokens": n, "layers": [
        {"layer": L, "changed_fraction": x,            # routed view vs the previous probe (null at the first)
         "backbone_changed_fraction": y, "distilled_changed_fraction": z,   # where recorded
         "distill_agreement": a,                       # backbone == distilled, where a distilled router
         "no_expert_fraction": u, "tokens_per_expert": [N counts of probe tokens]}, ...]}}

and TensorBoard ``routing_probe/layer{L}/{field}``; at the end of training (:meth:`RoutingProbe.on_train_end`)
``{"routing_fluctuation": {"final_iteration", "train_iters", "num_probes", "num_tokens", "percents":
[0..100], "layers": [{"layer", "view", "after_20", "after_50", "after_80", "curve": [101 values]}]}}``,
also written to ``routing_probe/fluctuation.json``, and TB ``routing_fluctuation/layer{L}/{view}/after_{x}pct``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from stablemoe_megatron.analysis.fluctuation import QUOTED, changed_fraction, describe_curves, history_curves
from stablemoe_megatron.analysis.history import CONFIG, CURVE, PROBE_DIR, Layout, ProbeHistory
from stablemoe_megatron.model.config import is_encoder_decoder
from stablemoe_megatron.runtime import is_last_rank as _is_last_rank
from stablemoe_megatron.training.trainer import Callback


def router_views(router) -> List[str]:
    """The views recorded for a router (see the module docstring)."""
    from stablemoe_megatron.moe.routers import ExpertChoiceRouter

    if getattr(router, "distilled", None) is not None:
        return ["routed", "backbone", "distilled"]
    if isinstance(router, ExpertChoiceRouter):
        return ["routed", "backbone"]
    return ["routed"]


def routed_expert_ids(decision, num_tokens: int, num_experts: int, none_value: int) -> torch.Tensor:
    """[T] the expert each token was sent to (highest gate if several; ``none_value`` if none).
    Column N of the [T, N + 1] table takes the pairs dropped by the capacity (expert id N)."""
    dense = torch.full((num_tokens, num_experts + 1), -math.inf, device=decision.gates.device)
    dense[decision.token_index, decision.expert_index] = decision.gates.detach().float()
    best = dense[:, :num_experts].max(dim=1)
    return torch.where(torch.isneginf(best.values), torch.full_like(best.indices, none_value), best.indices)


def _view_ids(router, view: str, inputs, decision, num_experts: int, none_value: int) -> torch.Tensor:
    if view == "routed":
        return routed_expert_ids(decision, inputs.hidden.shape[0], num_experts, none_value)
    if view == "distilled":
        return router.distilled_expert_ids(inputs)[0]
    if hasattr(router, "backbone_expert_ids"):
        return router.backbone_expert_ids(inputs.hidden)
    return router.scores(inputs.hidden).argmax(dim=-1)


class _Recorder:
    """Forward hooks on this stage's routers, collecting each call's views as [B, S_local] arrays."""

    def __init__(self, model, layout: Layout):
        self.layout = layout
        self.calls: Dict[int, list] = {layer.layer_number: [] for layer in model.moe_layers}
        self.handles = [layer.router.register_forward_hook(self._hook(layer.layer_number))
                        for layer in model.moe_layers]

    def _hook(self, layer_number: int):
        def hook(router, args, decision):
            inputs = args[0]
            batch = inputs.full_token_ids.shape[0]
            seq_local = inputs.hidden.shape[0] // batch
            start = inputs.local_positions.start or 0
            views = {}
            for view in self.layout.views[layer_number]:
                ids = _view_ids(router, view, inputs, decision, self.layout.num_experts, self.layout.none_value)
                views[view] = ids.view(seq_local, batch).t().cpu().numpy().astype(self.layout.dtype)
            self.calls[layer_number].append((start, start + seq_local, views))
        return hook

    def close(self) -> Dict[int, tuple]:
        """{layer: (start, stop, {view: [calls x B, S_local]})} over the calls, in call order."""
        for handle in self.handles:
            handle.remove()
        out = {}
        for layer, calls in self.calls.items():
            if calls:
                start, stop = calls[0][0], calls[0][1]
                out[layer] = (start, stop, {v: np.concatenate([c[2][v] for c in calls]) for v in calls[0][2]})
        return out


def _micro_batches(sequences: torch.Tensor, micro_batch_size: int, targets: Optional[torch.Tensor] = None):
    """Batches in the trainer's format over [n_pad, S] sequences (labels are unused); with
    ``targets`` [n_pad, S] parallel-text batches (source = sequences, decoder input = targets)."""
    seq = sequences.shape[1]
    positions = torch.arange(seq).unsqueeze(0)
    for i in range(0, sequences.shape[0], micro_batch_size):
        tokens = sequences[i:i + micro_batch_size]
        if targets is not None:
            target = targets[i:i + micro_batch_size]
            yield {"source": tokens, "source_padding": torch.zeros(tokens.shape, dtype=torch.bool),
                   "target_input": target, "labels": target, "loss_mask": torch.ones(target.shape)}
            continue
        yield {"tokens": tokens, "labels": tokens, "position_ids": positions.expand_as(tokens).clone(),
               "loss_mask": torch.ones(tokens.shape, dtype=torch.float32)}


class RoutingProbe(Callback):
    """Drives the probes of one training trainer; the history and logging live on the last rank."""

    def __init__(self, sequences: torch.Tensor, layout: Layout, interval: int,
                 history: Optional[ProbeHistory] = None, last_iteration: Optional[int] = None,
                 note: Optional[str] = None, targets: Optional[torch.Tensor] = None):
        self.sequences = sequences        # [n_seq, S]; the first layout.num_tokens tokens are probed
        self.targets = targets            # encoder-decoder: [n_seq, S] decoder inputs of the same pairs
        self.layout = layout
        self.interval = interval
        self.history = history
        self.last_iteration = last_iteration
        self._summary: Optional[str] = None
        self._note = note                 # said once, at the first probe (the reporter exists by then)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def for_trainer(cls, trainer) -> "RoutingProbe":
        """Probe tokens, layout (gathered from all stages), history (last rank); collective."""
        from stablemoe_megatron import data as data_lib

        config = trainer.config
        num_tokens, seq = config.logging.routing_probe_tokens, config.model.seq_length
        targets = None
        if is_encoder_decoder(config):
            from stablemoe_megatron import parallel_text

            sequences, targets = parallel_text.probe_pairs(config, num_tokens, trainer.tokenizer.eod)
        else:
            sequences = data_lib.probe_tokens(config.data, num_tokens, seq, config.training.seed)
        views = _all_gather({layer.layer_number: router_views(layer.router) for layer in trainer.model.moe_layers})
        merged = {k: v for part in views for k, v in part.items()}
        layout = Layout(sorted(merged), merged, num_tokens, config.moe.num_experts)
        history, note = None, None
        if _is_last_rank():
            history, note = _open_history(trainer, layout, sequences.reshape(-1)[:num_tokens].numpy())
        last = history.records[-1]["iteration"] if history is not None and history.records else None
        return cls(sequences, layout, config.logging.routing_probe_interval, history,
                   _broadcast_from_last(last), note, targets)

    # -- the trainer's hooks ----------------------------------------------------------------------
    def on_step_end(self, trainer, reporter) -> None:
        """Probe when the iteration is a multiple of ``--routing-probe-interval`` (collective)."""
        if trainer.state.iteration % self.interval == 0:
            self.run(trainer, reporter)

    def summary(self) -> Optional[str]:
        """Short text of the last probe for the iteration line (last rank; None elsewhere)."""
        return self._summary

    def run(self, trainer, reporter) -> Optional[dict]:
        """One probe at ``trainer.state.iteration``; returns the logged record on the last rank."""
        if self._note:
            reporter.message(self._note)
            self._note = None
        local = self._forward(trainer)
        choices = self._gather(local)
        self.last_iteration = trainer.state.iteration
        if choices is None or self.history is None:
            return None
        record = self._record(trainer.state.iteration, trainer.state.stage, choices)
        self.history.append(record, choices)
        reporter.record({"routing_probe": record})
        for layer in record["layers"]:
            values = {k: v for k, v in layer.items() if isinstance(v, float)}
            reporter.scalars(f"routing_probe/layer{layer['layer']}", values, record["iteration"])
        self._summary = _short(record)
        return record

    @torch.no_grad()
    def _forward(self, trainer) -> Dict[int, tuple]:
        """Forward-only pass of megatron's schedule over the probe sequences on this rank."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from stablemoe_megatron.training.step import forward_step

        micro = trainer.config.training.micro_batch_size
        count = math.ceil(self.sequences.shape[0] / micro)
        rows = torch.arange(count * micro).clamp(max=self.sequences.shape[0] - 1)
        padded = self.sequences[rows]
        targets = self.targets[rows] if self.targets is not None else None
        recorder = _Recorder(trainer.model, self.layout)
        was_training = trainer.ddp_model.training
        trainer.ddp_model.eval()
        try:
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=_micro_batches(padded, micro, targets),
                model=[trainer.ddp_model], num_microbatches=count, seq_length=self.sequences.shape[1],
                micro_batch_size=micro, forward_only=True)
        finally:
            trainer.ddp_model.train(was_training)
            local = recorder.close()
        return local

    def _gather(self, local: Dict[int, tuple]) -> Optional[Dict[int, Dict[str, np.ndarray]]]:
        """{layer: {view: [n]}} on the last rank (None elsewhere) from data-parallel rank 0's shards."""
        from megatron.core import parallel_state as ps

        mine = local if ps.get_data_parallel_rank() == 0 else {}
        parts = _all_gather(mine)
        if not _is_last_rank():
            return None
        n_seq, seq = self.sequences.shape
        full = {layer: {view: np.full((n_seq, seq), -1, dtype=np.int64) for view in self.layout.views[layer]}
                for layer in self.layout.layers}
        for part in parts:
            for layer, (start, stop, views) in part.items():
                for view, array in views.items():
                    full[layer][view][:, start:stop] = array[:n_seq]
        out = {}
        for layer, views in full.items():
            out[layer] = {}
            for view, array in views.items():
                if (array < 0).any():
                    raise RuntimeError(f"routing probe: layer {layer} view {view}: some tokens were not recorded")
                out[layer][view] = array.reshape(-1)[:self.layout.num_tokens].astype(self.layout.dtype)
        return out

    def _record(self, iteration: int, stage: int, choices) -> dict:
        """The JSONL ``routing_probe`` record: per layer changed fractions against the previous probe."""
        layers = []
        for layer in self.layout.layers:
            views = choices[layer]
            entry = {"layer": layer}
            for view in self.layout.views[layer]:
                before = self.history.previous(layer, view)
                key = "changed_fraction" if view == "routed" else f"{view}_changed_fraction"
                entry[key] = None if before is None else changed_fraction(before, views[view])
            if "distilled" in views:
                entry["distill_agreement"] = float(np.mean(views["backbone"] == views["distilled"]))
            routed = views["routed"].astype(np.int64)
            entry["no_expert_fraction"] = float(np.mean(routed == self.layout.none_value))
            entry["tokens_per_expert"] = np.bincount(routed[routed != self.layout.none_value],
                                                     minlength=self.layout.num_experts).tolist()
            layers.append(entry)
        return {"iteration": iteration, "stage": stage, "num_tokens": self.layout.num_tokens, "layers": layers}

    # -- end of training --------------------------------------------------------------------------
    def on_train_end(self, trainer, reporter) -> Optional[dict]:
        """Probe the final weights if not yet done, then report and write the fluctuation curves (collective)."""
        if self.last_iteration != trainer.state.iteration:
            self.run(trainer, reporter)
        if self.history is None:
            return None
        result = self.curves(trainer.config.training.train_iters)
        if self.history.directory is not None:
            (self.history.directory / CURVE).write_text(json.dumps(result, indent=1))
        reporter.record({"routing_fluctuation": result})
        for entry in result["layers"]:
            values = {f"after_{x}pct": entry[f"after_{x}"] for x in QUOTED}
            reporter.scalars(f"routing_fluctuation/layer{entry['layer']}/{entry['view']}", values,
                             result["final_iteration"])
        reporter.message(describe_curves(result))
        return result

    def curves(self, train_iters: Optional[int] = None) -> dict:
        """Last-fluctuation curves (:mod:`.fluctuation`) of every (layer, view) over the whole history (last rank)."""
        return history_curves(self.history, train_iters)


def _short(record: dict) -> str:
    """'L3 1.17% (distilled 0.39%)' per layer; mean and max over layers when there are more than 3."""
    layers = record["layers"]
    if any(entry["changed_fraction"] is None for entry in layers):
        return "first probe"
    if len(layers) > 3:
        values = [entry["changed_fraction"] for entry in layers]
        return f"mean {100 * np.mean(values):.2f}% max {100 * max(values):.2f}% over {len(values)} layers"
    parts = []
    for entry in layers:
        text = f"L{entry['layer']} {100 * entry['changed_fraction']:.2f}%"
        if record["stage"] == 1 and entry.get("distilled_changed_fraction") is not None:
            text += f" (distilled {100 * entry['distilled_changed_fraction']:.2f}%)"
        parts.append(text)
    return " ".join(parts)


# -- run directory and collectives -----------------------------------------------------------------
def run_directory(config) -> Optional[Path]:
    """``--save``, else the directory of ``--metrics-file``, else ``--tensorboard-dir``, else None."""
    if config.checkpoint.save:
        return Path(config.checkpoint.save)
    if config.logging.metrics_file:
        return Path(config.logging.metrics_file).resolve().parent
    if config.logging.tensorboard_dir:
        return Path(config.logging.tensorboard_dir)
    return None


def _open_history(trainer, layout: Layout, tokens: np.ndarray):
    import shutil

    from stablemoe_megatron.cli_args import dump_config

    config = trainer.config
    root = run_directory(config)
    directory = root / PROBE_DIR if root is not None else None
    if directory is not None and not directory.exists() and trainer.state.iteration > 0 and config.checkpoint.load:
        for candidate in (Path(config.checkpoint.load), Path(config.checkpoint.load).parent):
            if (candidate / PROBE_DIR).is_dir():  # resuming into a new --save: continue the loaded run's history
                shutil.copytree(candidate / PROBE_DIR, directory)
                break
    metrics = config.logging.metrics_file
    meta = {"router": config.moe.router, "interval": config.logging.routing_probe_interval,
            "train_iters": config.training.train_iters, "stage2_start_iter": config.moe.stage2_start_iter,
            "seq_length": config.model.seq_length, "seed": config.training.seed,
            "metrics_file": str(Path(metrics).resolve()) if metrics else None,
            "tensorboard_dir": config.logging.tensorboard_dir}
    history, note = ProbeHistory.open(directory, layout, tokens, trainer.state.iteration, meta)
    if directory is not None:
        (directory / CONFIG).write_text(dump_config(config))
    return history, note


def _all_gather(obj) -> list:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _broadcast_from_last(obj):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=torch.distributed.get_world_size() - 1)
    return box[0]
