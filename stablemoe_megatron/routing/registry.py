"""The routing-algorithm registry: the one place that says which routers exist and what each one is.

Every algorithm module of :mod:`stablemoe_megatron.routing` (:data:`ALGORITHM_MODULES`:
``stablemoe.py``, ``switch.py``, ``base.py``, ``hash.py``, ``expert_choice.py``) builds one
:class:`RoutingAlgorithm` and registers it with :func:`register_routing` under its canonical name,
the ``--moe-router`` value. Everything else asks the registry instead of comparing router names:

* the command line: :func:`routing_names` (the ``--moe-router`` choices, in a fixed order),
  :func:`distillable_names` and :func:`topk_names` (the routers ``--moe-router-topk`` > 1 accepts);
* the Megatron model: ``algorithm.adapter`` picks the router module of
  :mod:`stablemoe_megatron.moe.routers`, which calls the algorithm's pure functions;
* the exported model: ``algorithm.eval_routing`` and ``algorithm.state_buffers``;
* the trainer: ``algorithm.table_from_training_data`` (build the frequency-balanced table).

The canonical names are the algorithm modules' names with ``-`` for ``_`` (``expert_choice.py``
registers ``expert-choice``; checked when it loads), so listing and checking names needs no import
of the algorithms: this module, like the package's ``__init__``, imports neither torch nor megatron,
and the command line stays torch-free. :func:`get_routing` imports the algorithm's module (pure
torch) on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

GATES = ("sigmoid", "softmax", "none")
# Kinds of Megatron router module (stablemoe_megatron.moe.routers): "top1" is the generic learned
# top-1 router; the other two hold state of their own (the hash table, Expert Choice thresholds).
ADAPTERS = ("top1", "hash-table", "expert-choice")
BUFFER_SIZES = ("vocab", "experts", "scalar")
BUFFER_DTYPES = ("long", "float", "bool")
# The modules that define the algorithms, in the order of the --moe-router choices.
ALGORITHM_MODULES = ("stablemoe", "switch", "base", "hash", "expert_choice")


@dataclass(frozen=True)
class StateBuffer:
    """A tensor that evaluation routing reads and that is not trained (exported with the weights).

    name: its name in the exported model (``layers.i.moe.<name>``);
    size: ``vocab`` ([V]), ``experts`` ([N]) or ``scalar`` ([]); dtype: ``long``, ``float``, ``bool``.
    """

    name: str
    size: str
    dtype: str

    def __post_init__(self):
        if self.size not in BUFFER_SIZES or self.dtype not in BUFFER_DTYPES:
            raise ValueError(f"state buffer {self.name!r}: size must be one of {BUFFER_SIZES} and dtype "
                             f"one of {BUFFER_DTYPES}, got {self.size!r}, {self.dtype!r}")


@dataclass(frozen=True)
class RoutingAlgorithm:
    """One routing algorithm: the facts the rest of the code asks, and its pure torch functions.

    Facts:
        name: canonical name, the ``--moe-router`` value (``stablemoe``, ``expert-choice`` ...).
        description: one line for logs and documentation.
        adapter: kind of Megatron router module that runs it (one of :data:`ADAPTERS`).
        gate: what multiplies the expert output: ``sigmoid`` of the chosen score, the ``softmax``
            router probability, or ``none`` (gate 1).
        learned: has a trainable router weight ``[N, d]`` (centroids E or a projection W).
        one_pair_per_token: at k = 1 every token gets exactly one expert (before any capacity
            dropping); False for Expert Choice (a token gets 0..N experts). Top-k routing (k > 1)
            gives k pairs per token whatever this says.
        uses_token_ids: the assignment is a function of the token ids (the layer must get them).
        distillable: its top-1 choice can be distilled into a token-id router and frozen (its
            top-k choice too, when it ``supports_topk``).
        supports_topk: ``--moe-router-topk`` k > 1 is accepted: ``train_routing`` reads
            ``context.topk`` and ``context.pre_softmax`` and returns ``[T, k]`` experts and gates,
            ``chosen_gate`` takes ``[T, k]`` experts and the keyword ``pre_softmax``, and
            ``eval_routing`` the keywords ``topk`` and ``pre_softmax`` (the softmax router: Megatron's
            TopKRouter). Routers without it route every token to one expert (or, Expert Choice,
            let experts choose) and refuse k > 1.
        default_distill_router: the distilled router it gets when ``--moe-distill-router`` is not
            given (``wordemb`` for StableMoE), or None.
        losses: names of the loss terms it adds; each is weighted by ``MoEConfig.<name>_coeff``
            and logged under its name.
        table_from_training_data: its token-id table can be built from the training data's token
            counts (``--moe-hash-table frequency``).
        state_buffers: the untrained tensors its evaluation routing reads (:class:`StateBuffer`).
        default_capacity_factor: the expert capacity factor used when ``--moe-expert-capacity-factor``
            is not given (StableMoE: 2, the authors' command; Expert Choice: 2), or None (no capacity).

    Functions (shapes for T tokens, N experts, hidden size d):
        scores: ``(hidden [T, d], weight [N, d]) -> [T, N]`` backbone scores (learned routers).
        train_routing: the training-time routing, by adapter kind. ``top1``:
            ``(scores [T, N], context) -> (expert_ids [T], gates [T], {loss name: unweighted 0-d})``
            where ``context`` is the router module (:class:`RoutingContext`); it also runs in the
            Megatron model's evaluation mode (``context.training`` False). With ``context.topk``
            k > 1 (``supports_topk`` routers only): ``expert_ids [T, k]``, ``gates [T, k]``.
            ``hash-table``: ``(token_ids [T], table [V]) -> expert_ids [T]``. ``expert-choice``:
            ``(probs [T, N], k) -> (token_index, expert_index, gates)`` over the whole micro-batch.
        eval_routing: the evaluation routing, causal (a token's experts depend on that token only):
            ``(hidden [T, d], weight [N, d] | None, token_ids [T], state {buffer name: tensor},
            expert_ids [T] | None) -> (token_index [A], expert_index [A], gates [A])``;
            ``expert_ids`` (the distilled router's choice in stage 2) replaces the backbone's.
        chosen_gate: ``(hidden [T, d], weight [N, d], expert_ids [T]) -> gates [T]`` for given
            experts (stage 2 of a distilled router), for ``top1`` routers; ``supports_topk``
            routers also ``(..., expert_ids [T, k], pre_softmax=...) -> gates [T, k]``.
    """

    name: str
    description: str
    adapter: str
    gate: str
    learned: bool
    one_pair_per_token: bool
    uses_token_ids: bool
    distillable: bool = False
    supports_topk: bool = False
    default_distill_router: Optional[str] = None
    losses: Tuple[str, ...] = ()
    table_from_training_data: bool = False
    state_buffers: Tuple[StateBuffer, ...] = ()
    default_capacity_factor: Optional[float] = None
    scores: Optional[Callable] = field(default=None, compare=False, repr=False)
    train_routing: Optional[Callable] = field(default=None, compare=False, repr=False)
    eval_routing: Optional[Callable] = field(default=None, compare=False, repr=False)
    chosen_gate: Optional[Callable] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"routing {self.name!r}: gate must be one of {GATES}, got {self.gate!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"routing {self.name!r}: adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.default_distill_router is not None and not self.distillable:
            raise ValueError(f"routing {self.name!r}: a default distilled router needs distillable=True")
        if self.supports_topk and self.adapter != "top1":
            raise ValueError(f"routing {self.name!r}: supports_topk needs the token-choice adapter 'top1'")
        if self.learned and self.scores is None:
            raise ValueError(f"routing {self.name!r}: a learned router needs its scores function")


class RoutingContext(Protocol):
    """What a ``top1`` ``train_routing`` function may ask of the router module that calls it.

    The Megatron router (:class:`stablemoe_megatron.moe.routers.TokenChoiceRouter`) provides it:
    the communication lives there, so the algorithm functions stay pure.
    """

    training: bool  # the module's training mode
    # --moe-router-topk (k experts per token) and whether the gates are the softmax over all N
    # experts (pre_softmax) or over the k chosen logits; read only by supports_topk routers, and
    # an object without them means k = 1.
    topk: int
    pre_softmax: bool

    def count(self, expert_ids) -> Tuple[Any, Any]:
        """(tokens per expert [N], token count) over the counting set (the data-parallel rank's
        micro-batch, summed over its sequence-parallel shards; with ``--moe-balance-count-scope
        data-parallel`` the mean over the data-parallel ranks of their micro-batches' counts, so a
        loss divided by this count is the rank's share, scaled by the number of ranks)."""

    def over_micro_batch(self, fn: Callable, local):
        """``fn`` applied to the whole micro-batch's rows of ``local`` [T_local, ...] (gathered over
        the sequence-parallel shards), and this rank's rows of the result returned."""

    def loss_coeff(self, loss: str) -> float:
        """The weight of loss term ``loss`` (``MoEConfig.<loss>_coeff``)."""


_REGISTRY: Dict[str, RoutingAlgorithm] = {}


def _module_of(name: str) -> str:
    return name.replace("-", "_")


def routing_names() -> Tuple[str, ...]:
    """Canonical names of all algorithms, in the order of :data:`ALGORITHM_MODULES`: the
    ``--moe-router`` choices. Imports nothing."""
    return tuple(module.replace("_", "-") for module in ALGORITHM_MODULES)


def register_routing(algorithm: RoutingAlgorithm) -> RoutingAlgorithm:
    """Register ``algorithm`` (called by its module at import) and return it.

    Its name must be its module's (:func:`routing_names`). Registering the same facts again (a
    module re-import) replaces the entry; other facts under a registered name are a ``ValueError``.
    """
    if algorithm.name not in routing_names():
        raise ValueError(f"routing {algorithm.name!r} is not the name of an algorithm module of "
                         f"{__package__} ({', '.join(ALGORITHM_MODULES)})")
    known = _REGISTRY.get(algorithm.name)
    if known is not None and known != algorithm:
        raise ValueError(f"routing {algorithm.name!r} is already registered with different properties: {known}")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_routing(name: str) -> RoutingAlgorithm:
    """The algorithm ``name`` (importing its module on first use); ``KeyError`` listing the choices
    for an unknown name."""
    if name not in routing_names():
        raise KeyError(f"unknown routing algorithm {name!r}; choices: {', '.join(routing_names())}")
    importlib.import_module(f"{__package__}.{_module_of(name)}")
    if name not in _REGISTRY:
        raise RuntimeError(f"{__package__}.{_module_of(name)} did not register the routing algorithm {name!r}")
    return _REGISTRY[name]


def distillable_names() -> Tuple[str, ...]:
    """Names of the algorithms whose top-1 choice can be distilled and frozen, in CLI order
    (imports the algorithms)."""
    return tuple(name for name in routing_names() if get_routing(name).distillable)


def topk_names() -> Tuple[str, ...]:
    """Names of the algorithms that accept ``--moe-router-topk`` k > 1, in CLI order (imports the
    algorithms)."""
    return tuple(name for name in routing_names() if get_routing(name).supports_topk)
