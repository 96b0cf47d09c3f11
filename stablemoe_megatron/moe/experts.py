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

Expert tensor parallelism (``--expert-tensor-parallel-size`` t > 1): megatron builds each expert's
fc1 / fc2 as column / row shards over the expert-TP group; :mod:`.expert_tp` gathers the group's
rows around the stack and gives back this rank's. The norms are replicated over the group.
"""
from __future__ import annotations

import copy

import re

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import build_module

from stablemoe_megatron.moe.expert_tp import ExpertTensorParallel, whole_ffn


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
        first_of_group = self.tp_group is None or self.tp_group.rank() == 0
        for param in self.parameters():
            param.allreduce = False  # an expert parameter: reduced over the expert-DP group
            # megatron's grad norm sums expert grads over the expert-TP x EP x PP group and counts
            # a parameter that is not tensor-parallel only on attention-TP rank 0: count these
            # replicas exactly once per expert-TP group instead, whatever the attention-TP rank.
            if first_of_group:
                param.tensor_model_parallel = True
            else:
                param.shared = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """SequentialMLP's expert mapping, with the expert-TP rank as the TP part of each replica id.

        The norms are built as plain (non-TP) modules, so megatron labels them with the attention
        TP rank; but the attention-TP ranks of an EP group hold DIFFERENT experts (or replicas
        counted in the expert-DP part), while the expert-TP ranks hold copies of the same norms.
        """
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        etp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        for tensor in sharded.values():
            pp, _, dp = tensor.replica_id
            tensor.replica_id = (pp, etp_rank, dp)
        return sharded

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """hidden [R, h] grouped by local expert; tokens_per_expert [L] CPU long.

        Each expert's rows are normalised with its own weights by one fused norm call (as megatron's
        SequentialMLP runs each expert on its rows): no [R, h] gather of the weights, whose backward
        would be a serial scatter-add of every row into L rows.
        """
        norms = [expert.norm for expert in self.local_experts]
        chunks = torch.split(hidden, tokens_per_expert.tolist())
        if isinstance(norms[0], torch.nn.RMSNorm):
            outs = [torch.nn.functional.rms_norm(rows, (hidden.shape[-1],), norm.weight, eps=norm.eps)
                    for rows, norm in zip(chunks, norms)]
        else:
            outs = [torch.nn.functional.layer_norm(rows, (hidden.shape[-1],), norm.weight, norm.bias, eps=norm.eps)
                    for rows, norm in zip(chunks, norms)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


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


def expert_spec_with_bias_fix(experts_spec):
    """The local backend's expert spec whose fc2 hands back a fresh tensor when it has a bias.

    With linear biases, megatron's expert MLP adds the fc2 bias in place
    (``output += bias * probs``, megatron/core/transformer/mlp.py); without expert parallelism the
    local RowParallelLinear returns its input of the (size-1) reduce as-is, a view autograd forbids
    modifying in place. :class:`ExpertRowParallelLinear` returns a copy in that case only.
    """
    submodules = getattr(experts_spec, "submodules", None)
    fc2 = getattr(submodules, "linear_fc2", None)
    if fc2 is None or not isinstance(fc2, type) or fc2.__name__ != "RowParallelLinear":
        return experts_spec  # transformer-engine's modules (grouped GEMM refuses biases itself)
    spec = copy.deepcopy(experts_spec)
    spec.submodules.linear_fc2 = type("ExpertRowParallelLinear", (fc2,), {"forward": _fc2_forward})
    return spec


def _fc2_forward(self, input_, *args, **kwargs):
    output, bias = super(type(self), self).forward(input_, *args, **kwargs)
    return (output.clone() if bias is not None else output), bias


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
        # megatron marks expert weights allreduce=False only when EP > 1; with expert TP 1 the TP
        # ranks route different tokens through replicas of the experts, so the grads must always be
        # reduced over the expert-data-parallel group (which then includes the TP ranks). With
        # expert TP > 1 each shard already holds the gradient of every row the group gathered.
        for param in self.parameters():
            param.allreduce = False
        etp_group = getattr(pg_collection, "expt_tp", None)
        self.etp_size = etp_group.size() if etp_group is not None else 1
        self.etp_rank = etp_group.rank() if etp_group is not None else 0
        self.expert_tp = ExpertTensorParallel(etp_group, replicated=pre_norm) if self.etp_size > 1 else None

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
        Under expert TP the whole weight is drawn and this rank keeps its shard, so the initial
        model is also independent of the expert-TP size.
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
                shape = list(param.shape)
                shape[0 if fc == 1 else 1] *= self.etp_size  # fc1 [F, h] column-, fc2 [h, F] row-parallel
                value = torch.empty(shape, dtype=torch.float32)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((seed, layer_number, sublayer_index, expert, fc)) % (2 ** 62))
                    init(value)
                param.copy_(self._shard(value, fc))

    def _shard(self, value: torch.Tensor, fc: int) -> torch.Tensor:
        """This expert-TP rank's part of a whole expert weight, as megatron's layers split it: fc2
        [h, F] by columns; fc1 [F, h] by rows, and a gated unit's [2F, h] as the same rows of both
        halves (megatron's GLU layer takes the first half of its local output as the gate)."""
        if self.etp_size == 1:
            return value
        if fc == 2:
            return value.chunk(self.etp_size, dim=1)[self.etp_rank]
        halves = value.chunk(2, dim=0) if self.config.gated_linear_unit else (value,)
        return torch.cat([half.chunk(self.etp_size, dim=0)[self.etp_rank] for half in halves])

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """hidden [R, h] grouped by local expert; tokens_per_expert [L] CPU long -> [R, h]."""
        if self.expert_tp is not None:
            return self.expert_tp.run(self._stack, hidden, tokens_per_expert)
        return self._stack(hidden, tokens_per_expert, whole_ffn)

    def _stack(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, ffn) -> torch.Tensor:
        """The stack's change of rows [R, h]; ``ffn(expert module, rows, counts, probs)`` runs one
        sublayer's expert FFNs (:mod:`.expert_tp`: whole, or a shard summed over the expert-TP group)."""
        ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        if not self.pre_norm:
            return ffn(self.sublayers[0], hidden, tokens_per_expert, ones)
        state = hidden
        for norm, sublayer in zip(self.norms, self.sublayers):
            state = state + ffn(sublayer, norm(state, tokens_per_expert), tokens_per_expert, ones)
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
