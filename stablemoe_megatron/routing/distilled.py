"""Distilled routers (StableMoE, paper section 3.1 and Table 6): token-id models that learn to
predict the backbone's routing in stage 1 and, frozen, route in stage 2 and at inference.

Every router maps token ids ``[B, S]`` to features ``[B, S, dim]`` and scores them against its
own distilled centroids E^ (``[N, dim]``): ``scores = features @ E^^T``, ``[B, S, N]``. Trained
with :func:`stablemoe_megatron.routing.distill.distillation_loss`; routed with its argmax (its k
largest scores for top-k routing).

* :class:`WordEmbeddingRouter` (the paper's choice and default, dim 50): features = embedding of
  the id alone, so routing is context-free and a whole vocabulary -> expert table can be
  precomputed (:meth:`DistilledRouter.expert_table`).
* :class:`CNNRouter`: embedding then causal 1-D convolutions (position s sees ids <= s).
* :class:`TransformerRouter`: embedding + learned positions + a 1-3 layer causal Transformer.

The CNN and Transformer variants are causal so they never look at future tokens of a causal LM.
Initialisation: embeddings, positions and centroids ~ normal(0, 0.02) (GPT-style small init, so
initial scores are near zero and the first distillation steps are not dominated by noise);
convolution and Transformer weights use PyTorch's defaults. All deterministic given the torch seed.
The authors' code initialises differently; ``embedding_init="unit"`` (N(0, 1) embeddings) and
``centroid_init="orthogonal"`` (orthogonal centroids of row norm ``centroid_gain``) reproduce it.
Each option draws the same number of values from the torch RNG as the default, so it changes
only its own tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02
EMBEDDING_INITS = {"normal": INIT_STD, "unit": 1.0}  # --moe-distill-embedding-init -> std
CENTROID_INITS = ("normal", "orthogonal")  # --moe-centroid-init
DISTILLED_ROUTER_KINDS = ("wordemb", "cnn", "transformer")


class DistilledRouter(nn.Module):
    """Base class: token embedding + distilled centroids; subclasses define :meth:`features`.

    Attributes:
        embedding: ``nn.Embedding(vocab_size, dim)``.
        centroids: ``nn.Parameter [num_experts, dim]``, the distilled centroids E^.
        context_free: True when an id's scores do not depend on the other ids of the sequence.

    Init options (``--moe-distill-embedding-init``, ``--moe-centroid-init``): ``embedding_init``
    ``normal`` (N(0, 0.02)) or ``unit`` (N(0, 1), the authors' ``nn.Embedding``, without their
    zeroed padding row: there is no pad id); ``centroid_init`` ``normal`` (N(0, 0.02)) or
    ``orthogonal`` (``orthogonal_(gain=centroid_gain)``: rows orthonormal times the gain when
    num_experts <= dim).
    """

    context_free: bool = False

    def __init__(self, vocab_size: int, num_experts: int, dim: int = 50, *, embedding_init: str = "normal",
                 centroid_init: str = "normal", centroid_gain: float = 0.1):
        super().__init__()
        if vocab_size <= 0 or num_experts <= 0 or dim <= 0:
            raise ValueError(
                f"need positive vocab_size, num_experts, dim; got {vocab_size}, {num_experts}, {dim}"
            )
        if embedding_init not in EMBEDDING_INITS or centroid_init not in CENTROID_INITS:
            raise ValueError(f"embedding_init must be one of {tuple(EMBEDDING_INITS)} and centroid_init one of "
                             f"{CENTROID_INITS}; got {embedding_init!r}, {centroid_init!r}")
        self.vocab_size = vocab_size
        self.num_experts = num_experts
        self.dim = dim
        self.embedding = nn.Embedding(vocab_size, dim)
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.embedding.weight, mean=0.0, std=EMBEDDING_INITS[embedding_init])
        if centroid_init == "orthogonal":  # draws num_experts * dim normals, as the normal init
            nn.init.orthogonal_(self.centroids, gain=centroid_gain)
        else:
            nn.init.normal_(self.centroids, mean=0.0, std=INIT_STD)

    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Routing features: LongTensor ``[B, S]`` -> ``[B, S, dim]``."""
        raise NotImplementedError

    def scores(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Distilled scores ``features @ centroids^T``: LongTensor ``[B, S]`` -> ``[B, S, N]``."""
        return self.features(token_ids) @ self.centroids.t()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`scores`."""
        return self.scores(token_ids)

    @torch.no_grad()
    def expert_table(self, chunk_size: int = 65536, topk: int = 1) -> torch.Tensor:
        """LongTensor ``[V]``: the expert (argmax of the scores) of every vocabulary id; for
        ``topk`` k > 1 ``[V, k]``: its k highest-scoring experts, by descending score (top-k
        stage-2 routing, ``--moe-router-topk``).

        Only for context-free routers (``NotImplementedError`` otherwise). Computed with
        :meth:`scores` in chunks of ids, on the parameters' device.
        """
        if not self.context_free:
            raise NotImplementedError(
                f"{type(self).__name__} is context-dependent: an id has no fixed expert"
            )
        if not 1 <= topk <= self.num_experts:
            raise ValueError(f"expert_table: topk must be in 1..{self.num_experts}, got {topk}")
        device = self.centroids.device
        ids = torch.arange(self.vocab_size, device=device)
        if topk == 1:
            parts = [self.scores(chunk.unsqueeze(0))[0].argmax(-1) for chunk in ids.split(chunk_size)]
        else:
            parts = [torch.topk(self.scores(chunk.unsqueeze(0))[0], topk, dim=-1).indices
                     for chunk in ids.split(chunk_size)]
        return torch.cat(parts)


class WordEmbeddingRouter(DistilledRouter):
    """The paper's distilled router: features = word embedding of the id (dim 50 by default).

    At 50,257 ids and dim 50 it has 2.51M embedding parameters (+ N*50 centroids).
    """

    context_free = True

    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(token_ids)


class CNNRouter(DistilledRouter):
    """Embedding followed by ``num_layers`` causal 1-D convolutions, each with a GELU and a residual.

    Each convolution pads ``kernel_size - 1`` positions on the LEFT only, so the feature at
    position s depends on ids ``<= s`` (receptive field ``num_layers * (kernel_size - 1) + 1``).
    The residual keeps the id's own embedding in the feature.
    """

    context_free = False

    def __init__(self, vocab_size: int, num_experts: int, dim: int = 50, kernel_size: int = 3,
                 num_layers: int = 1, **init_options):
        super().__init__(vocab_size, num_experts, dim, **init_options)
        if kernel_size < 1 or num_layers < 1:
            raise ValueError(f"need kernel_size >= 1 and num_layers >= 1, got {kernel_size}, {num_layers}")
        self.kernel_size = kernel_size
        self.convolutions = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel_size) for _ in range(num_layers)
        )

    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(token_ids).transpose(1, 2)  # [B, dim, S]
        for convolution in self.convolutions:
            causal_input = F.pad(hidden, (self.kernel_size - 1, 0))
            hidden = hidden + F.gelu(convolution(causal_input))
        return hidden.transpose(1, 2)


class TransformerRouter(DistilledRouter):
    """Embedding + learned positions + a causal ``nn.TransformerEncoder`` (1-3 layers, pre-norm).

    Dropout 0, feed-forward size 4 * dim, a final LayerNorm. ``dim`` must be divisible by
    ``num_heads``; sequences may be at most ``max_positions`` long.
    """

    context_free = False

    def __init__(self, vocab_size: int, num_experts: int, dim: int = 50, num_layers: int = 1,
                 num_heads: int = 2, max_positions: int = 4096, **init_options):
        super().__init__(vocab_size, num_experts, dim, **init_options)
        if not 1 <= num_layers <= 3:
            raise ValueError(f"TransformerRouter: num_layers must be 1..3 (paper Table 6), got {num_layers}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"TransformerRouter: dim {dim} must be divisible by num_heads {num_heads}")
        self.max_positions = max_positions
        self.positions = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.positions, mean=0.0, std=INIT_STD)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )

    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        seq_len = token_ids.shape[1]
        if seq_len > self.max_positions:
            raise ValueError(
                f"TransformerRouter: sequence length {seq_len} exceeds max_positions {self.max_positions}"
            )
        hidden = self.embedding(token_ids) + self.positions[:seq_len]
        mask = nn.Transformer.generate_square_subsequent_mask(
            seq_len, device=hidden.device, dtype=hidden.dtype
        )
        return self.encoder(hidden, mask=mask, is_causal=True)


_ROUTER_CLASSES = {"wordemb": WordEmbeddingRouter, "cnn": CNNRouter, "transformer": TransformerRouter}


def build_distilled_router(kind: str, vocab_size: int, num_experts: int, dim: int = 50,
                           **options) -> DistilledRouter:
    """The distilled router of ``kind`` (``--moe-distill-router``): wordemb, cnn or transformer.

    ``options`` go to the class (``kernel_size``/``num_layers`` for cnn; ``num_layers``,
    ``num_heads``, ``max_positions`` for transformer; ``embedding_init``, ``centroid_init``,
    ``centroid_gain`` for all, see :class:`DistilledRouter`). Unknown kind -> ``ValueError``.
    """
    try:
        router_class = _ROUTER_CLASSES[kind]
    except KeyError:
        raise ValueError(
            f"unknown --moe-distill-router {kind!r}; choices: {', '.join(DISTILLED_ROUTER_KINDS)}"
        ) from None
    return router_class(vocab_size, num_experts, dim, **options)


def context_free(kind: str) -> bool:
    """Whether the distilled router ``kind`` scores a token from its id alone (``wordemb``), so
    that it can route tokens separated from their sequence (``--moe-token-shuffle``).
    Unknown kind -> ``ValueError``."""
    if kind not in _ROUTER_CLASSES:
        raise ValueError(f"unknown --moe-distill-router {kind!r}; choices: {', '.join(DISTILLED_ROUTER_KINDS)}")
    return _ROUTER_CLASSES[kind].context_free
