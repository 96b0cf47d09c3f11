"""MoE settings: one typed dataclass, part of the run's config tree (``RunConfig.moe``).

Flag names (generated from the field names by :mod:`stablemoe_megatron.config`) follow
Megatron-LM's ``--moe-*`` convention where Megatron has the same knob.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import List, Optional, Union

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.routing.registry import distillable_names, get_routing, routing_names, topk_names

# The --moe-router choices, from the routing registry (stablemoe_megatron.routing.registry; listing
# them imports nothing). Facts about a router (distillable, its default distilled router) come from
# get_routing, which imports the router's torch functions: asked only when validating or building.
ROUTERS = routing_names()
LAYER_POSITIONS = ("middle", "bottom", "top", "scattered")
DISTILL_ROUTERS = ("wordemb", "cnn", "transformer")
DISTILL_TEACHERS = ("assignment", "greedy")
DISTILL_EMBEDDING_INITS = ("normal", "unit")
EVAL_ROUTINGS = ("backbone", "distilled")
# Fields checked by _validate_init_options; the distillation ones need a distilled router.
RECIPE_OPTIONS = ("expert_output_init", "centroid_init", "balance_count_scope")
DISTILLATION_OPTIONS = ("distill_teacher", "distill_embedding_init", "eval_routing")
EXPERT_OUTPUT_INITS = ("normal", "zero")
CENTROID_INITS = ("normal", "orthogonal")
BALANCE_COUNT_SCOPES = ("micro-batch", "data-parallel")
TOKEN_DISPATCHERS = ("alltoall", "allgather", "flex")
_PATTERN_CHARS = re.compile(r"[\[\]()0-9+*, ]+")


def parse_layer_freq(text):
    """``--moe-layer-freq`` as Megatron-LM reads it: an int k (every k-th layer, from the first), or a
    Python list expression of 0/1 per layer such as ``"([0]+[1]*3)"`` -> ``[0, 1, 1, 1]``."""
    if isinstance(text, (int, list)):
        return text
    text = str(text).strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--moe-layer-freq {text!r}: an integer k, or a list pattern such as "
                              f"\"([0]+[1]*3)\"") from None
    if not _PATTERN_CHARS.fullmatch(text) or "**" in text:
        raise ConfigError(f"--moe-layer-freq {text!r}: a list pattern may hold only [ ] ( ) digits + * and commas (no **)")
    try:
        value = eval(text, {"__builtins__": {}}, {})  # noqa: S307 - characters checked above
    except Exception as exc:  # noqa: BLE001 - any syntax error is the same bad input
        raise ConfigError(f"--moe-layer-freq {text!r} is not a list expression ({exc})") from None
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise ConfigError(f"--moe-layer-freq {text!r} must give a list of 0 (dense) and 1 (MoE), got {value}")
    return value


def layer_freq_argument(text: str):
    """The command-line value of --moe-layer-freq: an int when it is one, else the pattern text
    (checked by :meth:`MoEConfig.validate`, so a bad pattern gets our message, not argparse's)."""
    return int(text) if text.strip().isdigit() else text


def layer_pattern(freq, num_layers: int) -> List[int]:
    """[0/1 per layer] of ``--moe-layer-freq`` (Megatron-LM: layer i (0-based) is MoE when i % k == 0)."""
    freq = parse_layer_freq(freq)
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return list(freq)


@dataclass
class MoEConfig:
    """Mixture-of-Experts layer settings. ``num_experts=None`` means a dense model."""

    num_experts: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "number of experts; absent = dense model"})
    router: str = field(default="stablemoe", metadata={"choices": ROUTERS, "help": "routing algorithm "
        "(default stablemoe; switch when --moe-router-topk > 1 is given without it: Megatron-LM's top-k router)"})
    router_topk: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "experts per token k (Megatron-LM's TopKRouter); k > 1 only with a router that can send "
                "a token to several experts (switch: the k largest of softmax(W h), Megatron's aux-loss "
                "normalisation, capacity ceil(T*k*c/N)); absent: 1 for every "
                "router here (the paper's routers are top-1; Megatron-LM uses 2)"})
    router_pre_softmax: Optional[bool] = field(default=None, metadata={
        "help": "top-k gates: the chosen experts' probabilities of the softmax over all experts "
                "(--moe-router-pre-softmax, as Megatron-LM's flag) or the softmax over the k chosen "
                "logits, which sum to 1 (--no-moe-router-pre-softmax); absent: Megatron-LM's "
                "default, the softmax over the k chosen for k > 1 and over all experts for k = 1 "
                "(required there: one chosen logit's softmax is always 1)"})
    # --- where the MoE layers go -------------------------------------------------------------
    layer_positions: str = field(default="middle", metadata={
        "help": "paper layout: one MoE block of stacked sublayers after block L/2 (middle), before "
                "block 1 (bottom), after block L (top), or its sublayers scattered after blocks "
                "L/(K+1)*j (scattered)", "choices": LAYER_POSITIONS})
    layer_freq: Optional[Union[int, List[int]]] = field(default=None, metadata={"parse": layer_freq_argument,
        "help": "Megatron layout (Megatron-LM's meaning): the MLPs of layers 1, k+1, 2k+1, ... are MoE "
                "layers of single-FFN experts, or a list pattern of 0/1 per layer such as "
                "\"([0]+[1]*3)\"; when set, the paper layout is not used (absent: the paper's MoE block; "
                "Megatron-LM's default is MoE in every layer)"})
    sublayers_per_expert: int = field(default=3, metadata={"range": "[1, inf)",
        "help": "paper layout: each expert is a stack of K pre-LayerNorm FFN sublayers"})
    expert_ffn_hidden_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "FFN inner size of each expert sublayer (default: --ffn-hidden-size)"})
    # --- losses ------------------------------------------------------------------------------
    balance_loss_coeff: float = field(default=0.3, metadata={"range": "[0, inf)", "help": "StableMoE balance loss alpha"})
    distill_loss_coeff: float = field(default=0.3, metadata={"range": "[0, inf)", "help": "distillation loss weight (stage 1; the authors' --distill-factor 0.3; the paper's eq. 11 has none, i.e. 1)"})
    aux_loss_coeff: float = field(default=0.01, metadata={"range": "[0, inf)", "megatron_list": True,
        "help": "Switch load-balancing loss weight (one value; Megatron-LM takes one per balancing type)"})
    z_loss_coeff: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "router z-loss weight (switch, expert-choice)"})
    # --- distil-and-freeze -------------------------------------------------------------------
    distill_router: Optional[str] = field(default=None, metadata={
        "help": "token-id router distilled in stage 1 and frozen in stage 2 (default: wordemb for "
                "stablemoe, none for the others)", "choices": DISTILL_ROUTERS})
    distill_dim: int = field(default=50, metadata={"range": "[1, inf)", "help": "distilled router feature size"})
    distill_layers: int = field(default=1, metadata={"range": "[1, 3]",
        "help": "layers of the cnn / transformer distilled router (paper Table 6: 1-3)"})
    stage2_start_iter: Optional[int] = field(default=None, metadata={"range": "[0, inf)",
        "help": "iteration at which the distilled router is frozen and routes (stage 2); absent = "
                "never", "aliases": ("--two-stage-updates",)})
    distill_teacher: str = field(default="greedy", metadata={
        "help": "stage-1 distillation target: the expert the router assigned (assignment) or the "
                "greedy argmax of the backbone scores (greedy, the authors' code); they differ only "
                "for --moe-router base; no effect without a distilled router", "choices": DISTILL_TEACHERS})
    eval_routing: str = field(default="distilled", metadata={
        "help": "routing outside training (validation, test, the routing probe) while in stage 1: "
                "the backbone router's greedy choice (backbone) or the distilled token-id router "
                "(distilled, the authors' code: whenever a distilled router exists and the model is "
                "not training); stage 2 always routes with the distilled router; no effect "
                "without a distilled router", "choices": EVAL_ROUTINGS})
    distill_embedding_init: str = field(default="unit", metadata={
        "help": "distilled router token embedding init: N(0, 0.02) (normal) or N(0, 1) (unit, the "
                "authors' nn.Embedding; their zeroed padding row has no counterpart here: no pad "
                "id); no effect without a distilled router", "choices": DISTILL_EMBEDDING_INITS})
    # --- initialisation ----------------------------------------------------------------------
    expert_output_init: str = field(default="zero", metadata={
        "help": "expert FFN output projection (fc2) init: N(0, --init-method-std/sqrt(2L)) (normal) "
                "or zero (the authors': every MoE layer starts as the identity)",
        "choices": EXPERT_OUTPUT_INITS})
    use_upcycling: bool = field(default=False, metadata={
        "help": "with --pretrained-checkpoint (or --load --finetune) of a dense model: every expert starts "
                "as a copy of the dense MLP it grows from (Megatron layout: the MLP it replaces; paper "
                "layout: the MLP of the layer the MoE block is attached to, fc2 as "
                "--moe-expert-output-init), the router fresh"})
    centroid_init: str = field(default="orthogonal", metadata={
        "help": "router weight [N, d] (centroids, or the switch / expert-choice projection) and "
                "distilled centroids init: N(0, --init-method-std) and N(0, 0.02) (normal), or "
                "orthogonal rows of norm --moe-centroid-init-gain (orthogonal, the authors')",
        "choices": CENTROID_INITS})
    centroid_init_gain: float = field(default=0.1, metadata={"range": "(0, inf)",
        "help": "gain of --moe-centroid-init orthogonal (the authors': 0.1)"})
    # --- capacity ----------------------------------------------------------------------------
    expert_capacity_factor: Optional[float] = field(default=None, metadata={"range": "(0, inf)",
        "help": "token-choice routers in training: drop tokens beyond ceil(T*c/N) per expert "
                "(dropped tokens keep their residual only; c = N keeps every token); expert-choice: "
                "c in k=T*c/N; absent: the router's default (stablemoe 2, the authors' command; "
                "expert-choice 2; switch, base, hash: no capacity)"})
    # --- authors' data-parallel options ---
    token_shuffle: Optional[bool] = field(default=None, metadata={
        "help": "in training, before routing, send every token to a random data-parallel rank (a "
                "seeded random permutation of the rank's tokens and an even all-to-all over the "
                "data-parallel group; undone after the experts), as the authors' code does; it "
                "changes BASE's balanced assignment and which tokens overflow the capacity, not a "
                "greedy router's choices; with one data-parallel rank a local permutation. On by "
                "default, except with the context-dependent distilled routers (cnn, transformer), "
                "which it cannot serve; --no-moe-token-shuffle turns it off"})
    balance_count_scope: str = field(default="data-parallel", metadata={
        "help": "token-choice routers in training: the set over which tokens per expert |A_i| and "
                "the token count T of the balance loss (the Switch aux loss), and the expert "
                "capacity, are counted: one data-parallel rank's micro-batch (micro-batch) or the "
                "micro-batches of all data-parallel ranks in this forward (data-parallel, the "
                "authors' code; each rank's loss keeps its own tokens' gates and the ranks' mean "
                "is the loss over all their tokens)", "choices": BALANCE_COUNT_SCOPES})
    token_dispatcher_type: str = field(default="alltoall", metadata={"choices": TOKEN_DISPATCHERS,
        "help": "token dispatcher: alltoall, and allgather (Megatron-LM's default) accepted as the same "
                "all-to-all exchange (identical results); flex (DeepEP) is not supported"})
    # --- router-specific ---------------------------------------------------------------------
    hash_table: str = field(default="random", metadata={
        "help": "hash router table: random (seeded, balanced over ids) or frequency (balanced "
                "by token frequency of the training data)", "choices": ("random", "frequency")})
    hash_seed: int = field(default=0, metadata={"range": "[0, inf)", "help": "seed of the hash router table"})
    expert_choice_threshold_momentum: float = field(default=0.99, metadata={"range": "[0, 1)",
        "help": "expert-choice: momentum of the per-expert score thresholds used for causal "
                "routing at evaluation"})

    # ------------------------------------------------------------------------------------------
    @property
    def routes_distilled_in_evaluation(self) -> bool:
        """Evaluation routes with the distilled router even in stage 1 (``--moe-eval-routing distilled``)."""
        return self.eval_routing == "distilled" and self.effective_distill_router is not None

    @property
    def shuffles_tokens(self) -> bool:
        """--moe-token-shuffle / --no-moe-token-shuffle, or the default: on unless the distilled
        router reads whole sequences (cnn, transformer)."""
        if self.token_shuffle is not None:
            return self.token_shuffle
        distill = self.effective_distill_router
        return distill is None or self._context_free_distillation(distill)

    @staticmethod
    def _context_free_distillation(distill: str) -> bool:
        from stablemoe_megatron.routing.distilled import context_free

        return context_free(distill)

    @property
    def effective_capacity_factor(self) -> Optional[float]:
        """--moe-expert-capacity-factor, or the router's default (None: no capacity)."""
        if self.expert_capacity_factor is not None:
            return self.expert_capacity_factor
        return get_routing(self.router).default_capacity_factor if self.router in ROUTERS else None

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None

    @property
    def megatron_layout(self) -> bool:
        return self.layer_freq is not None

    @property
    def effective_distill_router(self) -> Optional[str]:
        """--moe-distill-router, or the router's default distilled router (StableMoE's: wordemb)."""
        if self.distill_router is not None:
            return self.distill_router
        return get_routing(self.router).default_distill_router if self.router in ROUTERS else None

    @property
    def effective_router_topk(self) -> int:
        """--moe-router-topk, or the router's default: 1 (every router here is top-1 by default)."""
        return self.router_topk if self.router_topk is not None else 1

    @property
    def effective_router_pre_softmax(self) -> bool:
        """--moe-router-pre-softmax / --no-moe-router-pre-softmax, or Megatron-LM's default: the
        softmax after the top-k (False) for k > 1; before it (True) for k = 1."""
        if self.router_pre_softmax is not None:
            return self.router_pre_softmax
        return self.effective_router_topk == 1

    def validate(self, num_layers: int, train_iters: Optional[int] = None) -> None:
        """Raise ConfigError naming the flag for any inconsistent setting."""
        if not self.enabled:
            return
        if self.num_experts < 1:
            raise ConfigError(f"--num-experts must be >= 1, got {self.num_experts}")
        if self.router not in ROUTERS:
            raise ConfigError(f"--moe-router {self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.layer_positions not in LAYER_POSITIONS:
            raise ConfigError(f"--moe-layer-positions must be one of {', '.join(LAYER_POSITIONS)}")
        self._validate_layer_freq(num_layers)
        if self.token_dispatcher_type == "flex":
            raise ConfigError("--moe-token-dispatcher-type flex is not supported: it needs DeepEP on GPUs; "
                              "use alltoall (allgather is accepted and runs the same exchange)")
        if self.sublayers_per_expert < 1:
            raise ConfigError("--moe-sublayers-per-expert must be >= 1")
        if (not self.megatron_layout and self.layer_positions == "scattered"
                and self.sublayers_per_expert + 1 > num_layers):
            raise ConfigError("--moe-layer-positions scattered needs --num-layers > --moe-sublayers-per-expert "
                              "(one sublayer after each of blocks L/(K+1), 2L/(K+1), ...)")
        distill = self.effective_distill_router
        if distill is not None and distill not in DISTILL_ROUTERS:
            raise ConfigError(f"--moe-distill-router must be one of {', '.join(DISTILL_ROUTERS)}")
        if distill is not None and not get_routing(self.router).distillable:
            raise ConfigError(
                f"--moe-distill-router works with the top-1 learned routers ({', '.join(distillable_names())}); "
                f"--moe-router {self.router} has nothing to distil: drop --moe-distill-router")
        if self.stage2_start_iter is not None:
            if distill is None:
                raise ConfigError("--moe-stage2-start-iter needs a distilled router: add --moe-distill-router wordemb")
            if self.stage2_start_iter < 0:
                raise ConfigError("--moe-stage2-start-iter must be >= 0")
            if train_iters is not None and self.stage2_start_iter > train_iters:
                raise ConfigError(
                    f"--moe-stage2-start-iter {self.stage2_start_iter} is beyond --train-iters {train_iters}: "
                    f"lower it, or omit it to train in stage 1 only")
        if self.expert_capacity_factor is not None and self.expert_capacity_factor <= 0:
            raise ConfigError("--moe-expert-capacity-factor must be > 0")
        self._validate_init_options(distill)
        if self.token_shuffle and distill is not None:
            if not self._context_free_distillation(distill):
                raise ConfigError(f"--moe-token-shuffle cannot be used with --moe-distill-router {distill}: it "
                                  f"routes by whole sequences, which the shuffle splits; use wordemb, or drop one")
        if not 1 <= self.distill_layers <= 3:
            raise ConfigError("--moe-distill-layers must be 1, 2 or 3")
        if self.distill_dim < 1:
            raise ConfigError("--moe-distill-dim must be >= 1")
        self._validate_topk()

    def _validate_layer_freq(self, num_layers: int) -> None:
        if self.layer_freq is None:
            return
        freq = parse_layer_freq(self.layer_freq)
        if isinstance(freq, int) and not 1 <= freq <= num_layers:
            raise ConfigError(f"--moe-layer-freq must be in 1..--num-layers ({num_layers}), got {freq}")
        if isinstance(freq, list) and len(freq) != num_layers:
            raise ConfigError(f"--moe-layer-freq pattern has {len(freq)} entries for --num-layers {num_layers}: "
                              f"give one 0/1 per layer")
        if isinstance(freq, list) and not any(freq):
            raise ConfigError("--moe-layer-freq pattern has no MoE layer (no 1): drop --num-experts for a dense model")

    def _validate_init_options(self, distill: Optional[str]) -> None:
        """Choices of the authors'-recipe options (from the fields' ``choices``).

        The distillation options (DISTILLATION_OPTIONS) and --moe-centroid-init are accepted for
        every router: without a distilled router (or, for the hash router, a router weight) they
        have no effect. Their defaults are the authors' values, so either value is a plain choice,
        not an opt-in that a missing distilled router would contradict.
        """
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name in RECIPE_OPTIONS + DISTILLATION_OPTIONS:
            choices = fields[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(f"--moe-{name.replace('_', '-')} must be one of {', '.join(choices)}")
        if not self.centroid_init_gain > 0:
            raise ConfigError("--moe-centroid-init-gain must be > 0")

    def _validate_topk(self) -> None:
        """--moe-router-topk: 1..--num-experts, k > 1 only for routers whose registry entry
        ``supports_topk``; --no-moe-router-pre-softmax only with k > 1 (as Megatron-LM)."""
        k = self.effective_router_topk
        if k < 1:
            raise ConfigError(f"--moe-router-topk must be >= 1, got {k}")
        if k > self.num_experts:
            raise ConfigError(f"--moe-router-topk {k} is more than --num-experts {self.num_experts}: a token "
                              f"cannot go to more experts than there are; lower --moe-router-topk")
        if k > 1 and not get_routing(self.router).supports_topk:
            names = topk_names()
            raise ConfigError(
                f"--moe-router-topk {k} needs a router that sends a token to several experts "
                f"({', '.join(names)}); --moe-router {self.router} does not: use --moe-router "
                f"{' or '.join(names)}, or drop --moe-router-topk (top-1)")
        if self.router_pre_softmax is False and k == 1:
            raise ConfigError("--no-moe-router-pre-softmax needs --moe-router-topk > 1: the softmax over one "
                              "chosen logit is always 1 (Megatron-LM refuses it too); drop it")

    def moe_placement(self, num_layers: int) -> dict:
        """{1-based transformer layer number: where} for every MoE layer.

        ``where`` is ``"mlp"`` (Megatron layout: the layer's MLP is the MoE layer), ``"after"`` or
        ``"before"`` (paper layout: an MoE block runs after / before that transformer block).
        """
        if not self.enabled:
            return {}
        if self.megatron_layout:
            pattern = layer_pattern(self.layer_freq, num_layers)
            return {n: "mlp" for n in range(1, num_layers + 1) if pattern[n - 1]}
        if self.layer_positions == "middle":
            return {max(1, num_layers // 2): "after"}
        if self.layer_positions == "bottom":
            return {1: "before"}
        if self.layer_positions == "top":
            return {num_layers: "after"}
        k = self.sublayers_per_expert
        return {(num_layers * j) // (k + 1): "after" for j in range(1, k + 1)}

    def layout_summary(self, num_layers: int) -> str:
        """One line: where the MoE layers are and what they hold (printed at start-up, saved with the config).

        e.g. ``MoE layout: paper block after layer 2 of 4 | 4 experts x 2 FFN sublayers | router stablemoe
        top-1, distilled wordemb, stage 2 from iteration 100 | capacity factor 2``.
        """
        if not self.enabled:
            return "MoE layout: none (dense model)"
        placement = self.moe_placement(num_layers)
        layers = ",".join(str(n) for n in sorted(placement))
        if self.megatron_layout:
            where = f"Megatron layout: the MLP of layer(s) {layers} of {num_layers}"
        else:
            kind = sorted(set(placement.values()))[0]
            where = f"paper layout ({self.layer_positions}): MoE block {kind} layer(s) {layers} of {num_layers}"
        topk = self.effective_router_topk
        distill = self.effective_distill_router
        routing = f"router {self.router} top-{topk}"
        if distill is not None:
            stage2 = f"stage 2 from iteration {self.stage2_start_iter}" if self.stage2_start_iter is not None \
                else "no stage 2"
            routing += f", distilled {distill}, {stage2}"
        capacity = self.effective_capacity_factor
        return (f"MoE layout: {where} | {self.num_experts} experts x {self.sublayers_per_moe_layer()} FFN "
                f"sublayer(s) | {routing} | capacity factor {capacity if capacity is not None else 'none'}")

    def sublayers_per_moe_layer(self) -> int:
        """Expert stack depth of each MoE layer: K in the paper layout (1 if scattered), else 1."""
        if self.megatron_layout or self.layer_positions == "scattered":
            return 1
        return self.sublayers_per_expert
