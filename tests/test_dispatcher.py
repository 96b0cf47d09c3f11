"""The dispatcher's one-pair-per-token (permutation) path against its general pair path.

Single process (no expert parallelism): the all-to-all path is covered by the multi-rank layer
tests in test_moe_parallel.py, which run every router through the layer and therefore this path.
"""
import pytest
import torch

from stablemoe_megatron.moe.dispatcher import AllToAllDispatcher


def _round_trip(hidden, expert_index, gates, one_pair_per_token, expert_weight):
    dispatcher = AllToAllDispatcher(num_experts=4)
    hidden = hidden.clone().requires_grad_(True)
    gates = gates.clone().requires_grad_(True)
    token_index = torch.arange(hidden.shape[0])
    expert_input, state = dispatcher.dispatch(hidden, token_index, expert_index,
                                              one_pair_per_token=one_pair_per_token)
    # a per-expert transform, so a row sent to the wrong expert would show
    scale = torch.repeat_interleave(expert_weight, state.tokens_per_local_expert)
    output = dispatcher.combine(expert_input * scale.unsqueeze(-1), state, gates)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
    (output * upstream).sum().backward()
    return output.detach(), hidden.grad, gates.grad, state.tokens_per_local_expert


@pytest.mark.parametrize("num_tokens", [1, 9, 64])
def test_permutation_path_equals_the_general_path_bit_for_bit(num_tokens):
    generator = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, 8, generator=generator)
    expert_index = torch.randint(4, (num_tokens,), generator=generator)
    gates = torch.rand(num_tokens, generator=generator)
    expert_weight = torch.tensor([0.5, -1.0, 2.0, 3.0])
    general = _round_trip(hidden, expert_index, gates, False, expert_weight)
    permuted = _round_trip(hidden, expert_index, gates, True, expert_weight)
    for reference, value in zip(general, permuted):
        assert torch.equal(reference, value)
    # and both are what the formula says: y_t = g_t * w_{e_t} * x_t
    expected = gates.unsqueeze(-1) * expert_weight[expert_index].unsqueeze(-1) * hidden
    torch.testing.assert_close(permuted[0], expected)
    assert permuted[3].tolist() == torch.bincount(expert_index, minlength=4).tolist()
