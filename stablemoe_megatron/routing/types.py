"""The routing-algorithm registry: what each algorithm is, for the layer and the trainer to query.

Every algorithm module of :mod:`stablemoe_megatron.routing` registers one :class:`RoutingAlgorithm`
at import time with :func:`register_routing`; the MoE layer and the command line look it up with
:func:`get_routing` and list the choices with :func:`routing_names`. The registry holds facts
(is there a trainable router, which gate, does routing read the token ids), never code, so that
importing it stays cheap and the layer decides how to call the pure functions.
"""
from __future__ import annotations

from dataclasses import dataclass

GATES = ("sigmoid", "softmax", "none")


@dataclass(frozen=True)
class RoutingAlgorithm:
    """Static description of one routing algorithm.

    Attributes:
        name: registry key, also the command-line value (``stablemoe``, ``switch`` ...).
        learned: the router has trainable parameters (centroids / a gate projection).
        token_choice: every token picks exactly one expert (top-1). False for expert choice
            (experts pick tokens, a token gets 0..N experts) and for ``dense`` (no routing).
        uses_token_ids: the assignment is a function of the input token ids (hash layer), so the
            layer must be given the ids, not only hidden states.
        gate: what multiplies the expert output: ``"sigmoid"`` of the chosen centroid score,
            ``"softmax"`` router probability, or ``"none"`` (gate 1 / no MoE).
        description: one line for ``--help`` and logs.
    """

    name: str
    learned: bool
    token_choice: bool
    uses_token_ids: bool
    gate: str
    description: str

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"routing {self.name!r}: gate must be one of {GATES}, got {self.gate!r}")


_REGISTRY: dict[str, RoutingAlgorithm] = {}


def register_routing(name: str, **fields) -> RoutingAlgorithm:
    """Register the algorithm ``name`` with the :class:`RoutingAlgorithm` ``fields`` and return it.

    Registering the same name again with identical fields is a no-op (module re-imports);
    with different fields it is a ``ValueError`` (two modules claiming one name).
    """
    algorithm = RoutingAlgorithm(name=name, **fields)
    known = _REGISTRY.get(name)
    if known is not None and known != algorithm:
        raise ValueError(f"routing {name!r} is already registered with different properties: {known}")
    _REGISTRY[name] = algorithm
    return algorithm


def get_routing(name: str) -> RoutingAlgorithm:
    """The registered algorithm ``name``; ``KeyError`` naming the known algorithms otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown routing algorithm {name!r}; known: {', '.join(routing_names())}"
        ) from None


def routing_names() -> list[str]:
    """Names of all registered algorithms, sorted."""
    return sorted(_REGISTRY)
