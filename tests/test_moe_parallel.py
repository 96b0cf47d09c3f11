"""MoE layers under expert, tensor (+sequence) and pipeline parallelism equal one process.

A single-process model defines the weights; parallel models load their shards through megatron's
sharded_state_dict. Each data-parallel rank d runs batch d; the reference runs every batch in one
process and sums the gradients, which is what the parallel grads sum to after the reductions
megatron's DDP performs (expert grads over expert-DP, SP-replicated grads over TP, all over DP).
The reference runs all batches as one micro-batch (moe_cases.forward_backward_together): the
balance loss and capacity count over every data-parallel rank's tokens by default. BASE and Expert
Choice solve their assignment over the tokens one rank holds: their reference runs batch by batch,
and their parallel runs go without the token shuffle (which mixes the ranks' tokens).
"""
import pytest
import torch

from moe_cases import batch, build, forward_backward, forward_backward_together, positions, reduce_grads_like_megatron
from distributed import (
    global_tensors,
    load_global_tensors,
    max_abs_diff_to_global,
    run_distributed,
)

TOL = 1e-5
PER_RANK_ROUTING = ("base", "expert-choice")  # assignments over the tokens a rank holds (module doc)


def _reference(case, num_batches):
    model = build(**case)
    weights = global_tensors(model)
    if case["router"] in PER_RANK_ROUTING:
        losses = [forward_backward(model, seed) for seed in range(num_batches)]
    else:
        losses = forward_backward_together(model, num_batches)
    return weights, losses, global_tensors(model, grads=True)


def _parallel(case, weights, ref_losses, ref_grads):
    from megatron.core import parallel_state as ps

    model = build(**case)
    assert load_global_tensors(model, weights) > 0
    dp_rank = ps.get_data_parallel_rank()
    losses = forward_backward(model, dp_rank)
    reduce_grads_like_megatron(model)
    grad_diff, compared = max_abs_diff_to_global(model, ref_grads, grads=True)
    return (losses - ref_losses[dp_rank]).abs().max().item(), grad_diff, compared


CASES = {
    "stablemoe-paper": dict(router="stablemoe"),
    "stablemoe-megatron": dict(router="stablemoe", layout="megatron"),
    "switch-paper": dict(router="switch"),
    "base-paper": dict(router="base", distill="wordemb", moe_options=dict(token_shuffle=False)),
    "hash-megatron": dict(router="hash", layout="megatron"),
    "expert-choice-paper": dict(router="expert-choice", moe_options=dict(token_shuffle=False)),
    "stablemoe-cnn": dict(router="stablemoe", distill="cnn"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("world,tp,ep", [(2, 1, 2), (2, 2, 1)], ids=["ep2", "tp2sp"])
def test_parallel_equals_single_process(name, world, tp, ep):
    case = CASES[name]
    dp = world // tp
    weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, dp))[0]
    for loss_diff, grad_diff, compared in run_distributed(
            _parallel, world_size=world, tp=tp, ep=ep, args=(case, weights, ref_losses, ref_grads)):
        assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)
        assert any("router" in key for key in compared) or case["router"] == "hash"
        assert any("experts" in key for key in compared)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stablemoe-paper", "switch-paper", "expert-choice-paper"])
def test_expert_parallel_4_and_tp2_x_ep2(name):
    case = CASES[name]
    weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, 4))[0]
    for tp, ep in ((1, 4), (1, 2)):
        for loss_diff, grad_diff, _ in run_distributed(
                _parallel, world_size=4, tp=tp, ep=ep, args=(case, weights, ref_losses, ref_grads)):
            assert loss_diff <= TOL and grad_diff <= TOL, (tp, ep, loss_diff, grad_diff)
    weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, 2))[0]
    for loss_diff, grad_diff, _ in run_distributed(
            _parallel, world_size=4, tp=2, ep=2, args=(case, weights, ref_losses, ref_grads)):
        assert loss_diff <= TOL and grad_diff <= TOL, ("tp2xep2", loss_diff, grad_diff)
