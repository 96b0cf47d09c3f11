"""Token shuffle before routing (``--moe-token-shuffle``), as the authors' ``BaseLayer`` does it.

In training, each data-parallel rank permutes its T tokens at random and sends T/W of them to each
of the W data-parallel ranks of the MoE layer (an even all-to-all); routing and the experts then
run on the rows a rank received, and :meth:`TokenShuffle.unshuffle` sends every output row back to
its rank and position (the inverse all-to-all and the inverse permutation). The all-to-alls are
megatron-core's differentiable ones, so gradients take the same way back. The token ids travel
with their rows (the hash router and the ``wordemb`` distilled router route by id); their host
copy travels only with one data-parallel rank (a local permutation, drawn on the host): with
several, the hash router and stage-2 routing count experts on the device (one device-to-host copy
per layer call, as learned routing does).

Which ranks: those that hold different tokens at the MoE layer, megatron's data-parallel group
with context parallelism (``pg_collection.dp_cp``). Expert-parallel ranks are in it (EP is carved
out of DP); tensor-parallel ranks are not: under sequence parallelism TP rank j of every DP rank
exchanges its sequence shard with TP rank j of the others, so every TP rank still holds T_local
rows and the counting over the TP group is unchanged. With one data-parallel rank the shuffle is a
local permutation (which still decides the order in which tokens overflow an expert's capacity).

Randomness: the permutation of a call is drawn from a generator seeded with ``(run seed, layer
number, training iteration, call within the iteration, data-parallel rank, tensor-parallel rank)``,
so it differs per rank and per call and is reproducible from the run seed. The trainer names the
iteration before each step (:meth:`TokenShuffle.start_step`, through ``MoEHost.start_moe_step``),
so a resumed run draws the same permutations as the uninterrupted one.

Activation recomputation re-runs a layer's forward during backward: the layer passes the key of
the original call back (:attr:`ShuffleState.key`, ``shuffle(..., key=...)``), so the recomputed
call draws the same permutation and the call counter advances once per micro-batch, not twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from stablemoe_megatron.moe.dispatcher import _inverse_permutation, _PermuteRows


@dataclass
class ShuffleState:
    """What :meth:`TokenShuffle.unshuffle` needs: the local permutation [T] and its inverse [T];
    ``key``: the generator seed it was drawn with (a recomputation of the call replays it)."""

    order: torch.Tensor
    inverse: torch.Tensor
    key: int = 0
    host_order: Optional[torch.Tensor] = None  # [T] CPU copy of ``order`` (drawn on the host)


class TokenShuffle:
    """Send every local token to a random data-parallel rank, and back.

    Args:
        group: the data-parallel process group of the MoE layer (``None`` or size 1: a local
            permutation only).
        seed: the run seed (``torch.initial_seed()`` of the run, identical on every rank).
        layer_number: the MoE layer's number (each layer draws its own permutations).
        tp_rank: this rank's tensor-parallel rank (its sequence shard under SP).
    """

    def __init__(self, group, seed: int, layer_number: int, tp_rank: int = 0):
        self.group = group
        self.world = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0
        self.seed = seed
        self.layer_number = layer_number
        self.tp_rank = tp_rank
        self.step = 0  # the training iteration (set by the trainer before each step)
        self.calls = 0  # training calls within the step (one per micro-batch)
        self._generator = torch.Generator()

    def start_step(self, iteration: int) -> None:
        """The next permutations belong to training iteration ``iteration`` (0-based step count)."""
        self.step, self.calls = iteration, 0

    def next_key(self) -> int:
        """The generator seed of the next call (advances the call counter)."""
        key = hash((self.seed, self.layer_number, self.step, self.calls, self.rank, self.tp_rank)) % (2 ** 62)
        self.calls += 1
        return key

    def shuffle(self, hidden: torch.Tensor, token_ids: torch.Tensor,
                key: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, ShuffleState]:
        """hidden [T, h] and token_ids [T] of this rank -> the received rows [T, h], their ids [T]
        (T/W from each data-parallel rank, in rank order) and the state that undoes it. ``key``:
        replay the call that returned ``ShuffleState.key`` (activation recomputation).

        ValueError when T is not divisible by W (the all-to-all sends T/W rows to each rank; equal
        micro-batches of a multiple of W tokens guarantee it).
        """
        num_tokens = hidden.shape[0]
        if num_tokens % self.world:
            raise ValueError(
                f"--moe-token-shuffle: the {num_tokens} tokens this rank holds at MoE layer {self.layer_number} "
                f"cannot be split evenly over the {self.world} data-parallel ranks; use micro-batches whose "
                f"token count (per sequence-parallel shard) is a multiple of {self.world}")
        state = self.draw(num_tokens, hidden.device, key)
        order, inverse = state.order, state.inverse
        rows = _PermuteRows.apply(hidden, order, inverse)
        ids = token_ids.index_select(0, order)
        if self.world > 1:
            from megatron.core.tensor_parallel import all_to_all

            rows = all_to_all(self.group, rows)
            ids = all_to_all(self.group, ids)
        return rows, ids, state

    def draw(self, num_tokens: int, device: torch.device, key: Optional[int] = None) -> ShuffleState:
        """The next call's permutation of ``num_tokens`` rows (``key``: an earlier call's again),
        without moving any row: :meth:`shuffle` applies it; with one data-parallel rank the layer
        hands it to the router and dispatcher instead
        (:attr:`~stablemoe_megatron.moe.router_base.RouterInputs.row_order`): the router decides on
        its scores or ids in this order, which gives the same decision and expert inputs without
        permuting the rows twice.

        Drawn on the host (a CPU generator: the same permutation on every device) and copied to the
        device; the host copy lets token-id routing keep counting experts on the host
        (:meth:`shuffle_host_ids`). Advances the call counter unless ``key`` is given.
        """
        key = self.next_key() if key is None else key
        self._generator.manual_seed(key)
        host_order = torch.randperm(num_tokens, generator=self._generator)
        order = host_order.to(device, non_blocking=True)
        return ShuffleState(order, _inverse_permutation(order), key, host_order)

    def shuffle_host_ids(self, host_token_ids: Optional[torch.Tensor], state: ShuffleState) -> Optional[torch.Tensor]:
        """The CPU copy [T] of the ids :meth:`shuffle` returned, without a device sync: with one
        data-parallel rank the host ids permuted like the rows; None with several (the ids of
        the rows received from other ranks are on the device only) or without host ids."""
        if host_token_ids is None or self.world > 1 or state.host_order is None:
            return None
        return host_token_ids.index_select(0, state.host_order)

    def unshuffle(self, output: torch.Tensor, state: ShuffleState) -> torch.Tensor:
        """Output rows [T, h] in the received order -> [T, h] in this rank's original token order."""
        if self.world > 1:
            from megatron.core.tensor_parallel import all_to_all

            output = all_to_all(self.group, output)
        return _PermuteRows.apply(output, state.inverse, state.order)
