"""Expert computation: megatron-core's expert MLPs, stacked K deep for the paper's layout.

Paper layout (docs/ALGORITHMS.md §1): each expert is a stack of K pre-LayerNorm FFN sublayers,
each with its own residual, ``z_k = z_{k-1} + FFN_k(LN_k(z_{k-1}))``, and the MoE layer adds
``g_t * (z_K - h_t)`` to the residual stream: the stack's own change of the hidden state, scaled by
one gate over the whole stack. ``h + g * (z_K - h)`` equals fairseq's BASE/StableMoE layer
``g * expert(h) + (1 - g) * h``. Megatron layout: K = 1, no inner norm or residual (the transformer
layer's ``pre_mlp_layernorm`` and residual are used), so the layer adds ``g * FFN(LN(h))``.

Each sublayer is one megatron-core expert module (``SequentialMLP`` with the local backend,
``TEGroupedMLP`` with transformer-engine) holding that sublayer of every local expert; megatron's
own ``sharded_state_dict`` maps local experts to global expert ids for checkpoints, and marks
expert parameters (``allreduce=False``) so DDP reduces them over the expert-data-parallel group.
The gate is applied by the dispatcher's ``combine``, so the experts get probabilities of one.
"""
from __future__ import annotations

import re

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import build_module


class ExpertLayerNorms(SequentialMLP):
    """One LayerNorm/RMSNorm per local expert, checkpointed per global expert.

    Subclasses ``SequentialMLP`` only to reuse its ``sharded_state_dict``, which maps local expert
    j of EP rank r to global expert ``r * L + j`` and sets expert-data-parallel replica ids.
    """

    def __init__(self, config, num_local_experts: int, pg_collection):
        MegatronModule.__init__(self, config=config)
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        self.local_experts = torch.nn.ModuleList(
            [_NormModule(norm_cls(config.hidden_size, eps=config.layernorm_epsilon), config)
             for _ in range(num_local_experts)]
        )
        for param in self.parameters():
            param.allreduce = False  # an expert parameter: reduced over the expert-DP group

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """SequentialMLP's expert mapping, with the TP part of each replica id set to 0.

        The norms are built as plain (non-TP) modules, so megatron labels them with the attention
        TP rank; with expert TP = 1 the TP ranks of an EP group hold DIFFERENT experts (as
        megatron's expert weights, whose replica ids use the expert-TP rank, 0), not copies.
        """
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for tensor in sharded.values():
            pp, _, dp = tensor.replica_id
            tensor.replica_id = (pp, 0, dp)
        return sharded

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """hidden [R, h] grouped by local expert; tokens_per_expert [L] CPU long."""
        norms = [expert.norm for expert in self.local_experts]
        rows = int(tokens_per_expert.sum())
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=hidden.device),
            tokens_per_expert.to(hidden.device), output_size=rows)
        eps = norms[0].eps
        if isinstance(norms[0], torch.nn.RMSNorm):
            normed = torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), eps=eps)
            return normed * torch.stack([n.weight for n in norms])[expert_of_row]
        normed = torch.nn.functional.layer_norm(hidden, (hidden.shape[-1],), eps=eps)
        weight = torch.stack([n.weight for n in norms])[expert_of_row]
        bias = torch.stack([n.bias for n in norms])[expert_of_row]
        return normed * weight + bias


class _NormModule(MegatronModule):
    """A torch norm as a MegatronModule, so it has megatron's default sharded_state_dict."""

    def __init__(self, norm: torch.nn.Module, config):
        super().__init__(config=config)
        self.norm = norm


def _expert_weight_id(name: str):
    """(local expert index, 1 or 2 for fc1/fc2) of an expert weight name, else (None, None).

    SequentialMLP: ``local_experts.{j}.linear_fc{1,2}.weight``; TEGroupedMLP: ``linear_fc{1,2}.weight{j}``.
    """
    match = re.fullmatch(r"local_experts\.(\d+)\.linear_fc([12])\.weight", name) \
        or re.fullmatch(r"linear_fc([12])\.weight(\d+)", name)
    if match is None:
        return None, None
    if name.startswith("local_experts"):
        return int(match.group(1)), int(match.group(2))
    return int(match.group(2)), int(match.group(1))


class ExpertStack(MegatronModule):
    """K sublayers of every local expert; returns each row's change ``z_K - input`` (see module doc).

    Args:
        experts_spec: a ModuleSpec of a megatron expert module (SequentialMLP / TEGroupedMLP).
        num_sublayers: K.
        pre_norm: paper layout (per-expert pre-LayerNorm and residual in every sublayer).
    """

    def __init__(self, config, experts_spec, num_local_experts: int, num_sublayers: int,
                 pre_norm: bool, pg_collection):
        super().__init__(config=config)
        if not pre_norm and num_sublayers != 1:
            raise ValueError("expert stacks without pre-norm residual sublayers have one sublayer")
        self.pre_norm = pre_norm
        self.num_local_experts = num_local_experts
        self.first_expert = pg_collection.ep.rank() * num_local_experts if pg_collection.ep is not None else 0
        # Building the experts must not consume the main RNG stream: with expert parallelism each
        # rank builds only its share, which would shift every later parameter's initialisation.
        with torch.random.fork_rng(devices=[]):
            self.sublayers = torch.nn.ModuleList([
                build_module(experts_spec, num_local_experts, config, pg_collection=pg_collection)
                for _ in range(num_sublayers)
            ])
            self.norms = torch.nn.ModuleList([
                ExpertLayerNorms(config, num_local_experts, pg_collection) for _ in range(num_sublayers)
            ]) if pre_norm else None
        # megatron marks expert weights allreduce=False only when EP > 1; with our expert TP of 1
        # the TP ranks route different tokens through replicas of the experts, so the grads must
        # always be reduced over the expert-data-parallel group (which includes the TP ranks).
        for param in self.parameters():
            param.allreduce = False

    @torch.no_grad()
    def initialize(self, seed: int, layer_number: int, output_init: str = "normal") -> None:
        """(Re)initialise every expert weight from (seed, layer, sublayer, GLOBAL expert id, fc).

        megatron's CPU initialisation draws the same numbers on every EP rank, so expert r*L+j
        would equal expert j; seeding per global expert makes experts distinct and makes the
        initial model independent of the expert-parallel size.

        ``output_init`` (``--moe-expert-output-init``): ``normal`` draws fc2 [h, ffn] from
        megatron's output-layer init; ``zero`` zeroes it (the authors' code), so every sublayer
        adds 0 and each expert stack starts as the identity (``z_K - h = 0``): the MoE layer's
        output is 0 at step 0, while fc2 still gets gradients (fc1's are 0 until fc2 moves).
        Every draw uses its own seeded generator, so the choice changes no other weight.
        """
        if output_init not in ("normal", "zero"):
            raise ValueError(f"expert output init must be normal or zero, got {output_init!r}")
        for sublayer_index, sublayer in enumerate(self.sublayers):
            for name, param in sublayer.named_parameters():
                local, fc = _expert_weight_id(name)
                if local is None:
                    continue
                if fc == 2 and output_init == "zero":
                    param.zero_()
                    continue
                expert = self.first_expert + local
                init = self.config.init_method if fc == 1 else self.config.output_layer_init_method
                value = torch.empty(param.shape, dtype=torch.float32)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((seed, layer_number, sublayer_index, expert, fc)) % (2 ** 62))
                    init(value)
                param.copy_(value)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """hidden [R, h] grouped by local expert; tokens_per_expert [L] CPU long -> [R, h]."""
        ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        if not self.pre_norm:
            out, _ = self.sublayers[0](hidden, tokens_per_expert, ones)
            return out
        state = hidden
        for norm, sublayer in zip(self.norms, self.sublayers):
            out, _ = sublayer(norm(state, tokens_per_expert), tokens_per_expert, ones)
            state = state + out
        return state - hidden

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Delegate to each sublayer's megatron expert module (global expert ids under EP).

        megatron's default would flatten the ModuleLists and lose the local->global expert map.
        """
        sharded = {}
        for name in ("sublayers", "norms"):
            modules = getattr(self, name)
            for index, module in enumerate(modules or ()):
                sharded.update(module.sharded_state_dict(f"{prefix}{name}.{index}.", sharded_offsets, metadata))
        return sharded
