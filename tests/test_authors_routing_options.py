"""The two data-parallel options of the authors' code (docs/RECIPE.md rows 5a, 7 and 3):
--moe-token-shuffle and --moe-balance-count-scope data-parallel.

Token shuffle: every token's output (and gradient) comes back to its own position; the rows a
rank routes come from every data-parallel rank; greedy routing is unchanged per token while BASE's
balanced assignment is solved on the shuffled rows; evaluation does not shuffle.
Data-parallel counting: each rank's balance loss (Switch aux loss, capacity) against plain-torch
references of eq. 8 computed on the union of both ranks' tokens.

Functions run by ``run_distributed`` are module-level so the worker processes can import them.
"""
import math

import pytest
import torch

from moe_cases import BATCH, EXPERTS, SEQ, reduce_grads_like_megatron
from distributed import run_distributed

HIDDEN = 32
T_LOCAL = SEQ * BATCH  # tokens per rank at the MoE layer (no SP)


# ----------------------------------------------------------------------------------------------
# helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------
def build(router="stablemoe", capacity=None, **moe_options):
    """A 4-layer GPT whose layers 2 and 4 have MoE MLPs (Megatron layout); capacity: the router's default."""
    import moe_cases

    return moe_cases.build(router, "megatron", capacity=capacity, moe_options=moe_options)


def reset_aux_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # 1.0


def rank_tokens(rank):
    """Token ids [B, S] of DP rank ``rank``: a permutation of rank*T .. rank*T+T-1 (unique over ranks)."""
    gen = torch.Generator().manual_seed(50 + rank)
    return (rank * T_LOCAL + torch.randperm(T_LOCAL, generator=gen)).reshape(BATCH, SEQ)


def rank_inputs(rank, seq_local=SEQ):
    """(hidden [S_local, B, h], output cotangent [S_local, B, h]) of a rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(seq_local, BATCH, HIDDEN, generator=gen), torch.randn(seq_local, BATCH, HIDDEN, generator=gen)


def run_layer(model, tokens, hidden, cotangent, backward=True):
    """Forward (+ backward in training) of the model's first MoE layer: (output, input grad,
    router inputs, decision)."""
    layer = model.moe_layers[0]
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    x = hidden.clone().requires_grad_()
    layer.set_token_ids(tokens)
    out, _ = layer(x)
    if layer.training and backward:
        (out * cotangent).sum().backward()
    handle.remove()
    (inputs, decision), = seen
    return out.detach(), (x.grad if x.grad is not None else None), inputs, decision


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def all_gather(tensor, group=None):
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# --moe-token-shuffle
# ----------------------------------------------------------------------------------------------
def _shuffle_vs_plain(router, options):
    """One MoE layer call with and without the shuffle, same weights and inputs, on this rank."""
    from megatron.core import parallel_state as ps

    reset_aux_scale()
    rank = ps.get_data_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    torch.manual_seed(3)
    plain = build(router, token_shuffle=False, **options)  # the shuffle is on by default
    shuffled = build(router, token_shuffle=True, **options)
    shuffled.load_state_dict(plain.state_dict())
    tokens = rank_tokens(rank)
    hidden, cotangent = rank_inputs(rank, SEQ // tp_size)
    out = {}
    for name, model in (("plain", plain), ("shuffled", shuffled)):
        output, x_grad, inputs, decision = run_layer(model, tokens, hidden, cotangent)
        reduce_grads_like_megatron(model)
        # the rows in the order they were routed (one DP rank: the shuffle's order, handed to the router)
        routed = slice(None) if inputs.row_order is None else inputs.row_order
        out[name] = dict(output=output, x_grad=x_grad, grads=grads_of(model), routed_ids=inputs.token_ids[routed],
                         experts=decision.expert_index[routed].clone())
    shuffled.eval()
    plain.eval()
    eval_out, _, eval_inputs, _ = run_layer(shuffled, tokens, hidden, cotangent)
    plain_eval_out, _, _, _ = run_layer(plain, tokens, hidden, cotangent)
    a, b = out["plain"], out["shuffled"]
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    local_ids = tokens.t()[ps.get_tensor_model_parallel_rank() * hidden.shape[0]:][:hidden.shape[0]].reshape(-1)
    return dict(
        output_diff=(a["output"] - b["output"]).abs().max().item(),
        x_grad_diff=(a["x_grad"] - b["x_grad"]).abs().max().item(),
        grad_diff=max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"]),
        router_grad_norm=sum(g.norm().item() for k, g in b["grads"].items() if ".router." in k),
        plain_ids=a["routed_ids"], shuffled_ids=b["routed_ids"], local_ids=local_ids,
        plain_experts=a["experts"], shuffled_experts=b["experts"],
        eval_ids_local=torch.equal(eval_inputs.token_ids, local_ids),
        eval_diff=(eval_out - plain_eval_out).abs().max().item(),
    )


def expert_of_id(results, which):
    """{token id: expert} over every rank's routed rows (ids are unique over the ranks)."""
    mapping = {}
    for res in results:
        for token, expert in zip(res[f"{which}_ids"].tolist(), res[f"{which}_experts"].tolist()):
            assert token not in mapping
            mapping[token] = expert
    return mapping


SHUFFLE_CASES = {
    "stablemoe": ("stablemoe", dict(balance_count_scope="data-parallel")),  # + wordemb distilled router
    "switch": ("switch", dict(balance_count_scope="data-parallel", z_loss_coeff=0.01)),
    "hash": ("hash", {}),
}


@pytest.mark.parametrize("name", sorted(SHUFFLE_CASES))
def test_token_shuffle_returns_every_output_to_its_token(name):
    router, options = SHUFFLE_CASES[name]
    results = run_distributed(_shuffle_vs_plain, world_size=2, args=(router, options))
    half = T_LOCAL // 2
    for rank, res in enumerate(results):
        assert res["output_diff"] <= 1e-6 and res["x_grad_diff"] <= 1e-5 and res["grad_diff"] <= 1e-5, res
        assert res["router_grad_norm"] > 0 or router == "hash"
        assert torch.equal(res["plain_ids"], res["local_ids"])  # without the shuffle: own tokens, in order
        from_rank0 = int((res["shuffled_ids"] < T_LOCAL).sum())
        assert from_rank0 == half and res["shuffled_ids"].numel() == T_LOCAL  # T/W rows from each rank
        assert res["eval_ids_local"] and res["eval_diff"] == 0.0  # evaluation: no shuffle
    every_id = torch.cat([r["shuffled_ids"] for r in results]).sort().values
    assert torch.equal(every_id, torch.arange(2 * T_LOCAL))
    assert not torch.equal(results[0]["shuffled_ids"].sort().values, results[0]["local_ids"].sort().values)
    assert expert_of_id(results, "plain") == expert_of_id(results, "shuffled")  # greedy: per token


def _shuffle_order(case, mode):
    """One MoE layer call, ``mode``: rows (the shuffle permutes the rows), order (the default with
    one data-parallel rank: the router decides on its scores or ids in the shuffle's order and the
    dispatcher takes that order, the rows stay), none (no shuffle). StableMoE stage 1 or 2 and
    Switch (capacity 0.5) and hash route tokens whose ids repeat with equal hidden rows, so equal
    gates tie for capacity and the shuffle order decides which overflow; BASE and Expert Choice
    (whole-batch decisions) route random rows."""
    import contextlib
    from unittest import mock

    reset_aux_scale()
    torch.manual_seed(3)
    router = case.split("-stage")[0]
    capacity = 0.5 if router in ("stablemoe", "switch") else None
    model = build(router, capacity=capacity, token_shuffle=mode != "none", expert_output_init="normal")
    if case == "stablemoe-stage2":
        model.enter_stage_two()
    layer = model.moe_layers[0]
    base, cotangent = rank_inputs(0)
    if router in ("base", "expert-choice"):
        tokens, hidden = rank_tokens(0), base
    else:
        tokens = (torch.arange(T_LOCAL) % 6).reshape(BATCH, SEQ)
        hidden = base[0, 0][None, None, :] * (1 + tokens.t().unsqueeze(-1).float())  # [S, B, h], a row per id
    moved = mock.patch.object(type(layer.router), "takes_shuffle_order", property(lambda self: False)) \
        if mode == "rows" else contextlib.nullcontext()
    with moved:
        assert layer.router.takes_shuffle_order == (mode != "rows")
        output, x_grad, _, decision = run_layer(model, tokens, hidden, cotangent)
    zero_rows = (output.reshape(T_LOCAL, -1) == 0).all(-1)
    token_rows = decision.token_index
    if mode == "rows":  # the decision's rows are the shuffled ones: back to token rows
        key = layer._context.shuffle_keys[id(layer)]
        token_rows = layer.shuffle.draw(T_LOCAL, "cpu", key).order.index_select(0, token_rows)
    routed = torch.zeros(T_LOCAL, EXPERTS + 1, dtype=torch.bool)
    routed[token_rows, decision.expert_index] = True
    return dict(output=output, x_grad=x_grad, grads=grads_of(model), dropped=zero_rows, routed=routed[:, :EXPERTS],
                shuffle_calls=layer.shuffle.calls if layer.shuffle is not None else 0)


@pytest.mark.parametrize("case", ["stablemoe-stage2", "hash", "stablemoe-stage1", "switch", "base", "expert-choice"])
def test_the_local_shuffle_passes_its_order_instead_of_moving_rows(case):
    """The shuffle's order given to the router and dispatcher equals permuting the rows: the same
    (token, expert) pairs and dropped tokens, outputs and input gradients (bit for bit for token-id
    routing; learned routers multiply the rows by their weight in one GEMM instead of another),
    parameter grads to rounding."""
    rows, order, none = (run_distributed(_shuffle_order, world_size=1, args=(case, mode))[0]
                         for mode in ("rows", "order", "none"))
    assert torch.equal(rows["routed"], order["routed"]) and torch.equal(rows["dropped"], order["dropped"])
    if case in ("stablemoe-stage2", "hash"):
        assert torch.equal(rows["output"], order["output"]) and torch.equal(rows["x_grad"], order["x_grad"])
    assert (rows["output"] - order["output"]).abs().max().item() <= 1e-6
    assert (rows["x_grad"] - order["x_grad"]).abs().max().item() <= 1e-6
    assert rows["grads"].keys() == order["grads"].keys()
    assert max((rows["grads"][k] - order["grads"][k]).abs().max().item() for k in rows["grads"]) <= 1e-6
    assert rows["shuffle_calls"] == order["shuffle_calls"] == 1
    if case in ("stablemoe-stage2", "stablemoe-stage1", "switch"):  # ties broken by the shuffle order:
        assert 0 < int(order["dropped"].sum()) < T_LOCAL  # a different set overflows without it
        assert not torch.equal(order["dropped"], none["dropped"])


def _whole_model(options):
    """Paper layout, whole GPT: LM losses and DP-summed grads with and without the shuffle."""
    import moe_cases
    from megatron.core import parallel_state as ps

    reset_aux_scale()
    rank = ps.get_data_parallel_rank()
    out = []
    for shuffle in (False, True):
        torch.manual_seed(3)
        model = moe_cases.build("stablemoe", "paper", moe_options=dict(options, token_shuffle=shuffle))
        losses = moe_cases.forward_backward(model, rank)
        reduce_grads_like_megatron(model)
        out.append((losses, grads_of(model), model.moe_layers[0].shuffle))
    (plain_loss, plain_grads, none), (loss, grads, shuffle) = out
    return dict(loss_diff=(plain_loss - loss).abs().max().item(), no_shuffle=none is None,
                grad_diff=max((plain_grads[k] - grads[k]).abs().max().item() for k in plain_grads),
                calls=shuffle.calls, group_size=shuffle.world, same_keys=plain_grads.keys() == grads.keys())


def test_token_shuffle_in_the_paper_layout_model():
    """The whole model (paper-layout MoE block, token ids handed down by the model) on 2 DP ranks."""
    for res in run_distributed(_whole_model, world_size=2, args=(dict(balance_count_scope="data-parallel"),)):
        assert res["no_shuffle"] and res["calls"] == 1 and res["group_size"] == 2 and res["same_keys"]
        assert res["loss_diff"] <= 1e-5 and res["grad_diff"] <= 1e-5, res


def test_token_shuffle_with_tensor_and_sequence_parallelism():
    """TP 2 + SP (one DP rank): each TP shard is permuted locally; outputs and grads unchanged."""
    for res in run_distributed(_shuffle_vs_plain, world_size=2, tp=2, args=("stablemoe", {})):
        assert res["output_diff"] <= 1e-6 and res["x_grad_diff"] <= 1e-5 and res["grad_diff"] <= 1e-5, res
        assert torch.equal(res["shuffled_ids"].sort().values, res["local_ids"].sort().values)
        assert not torch.equal(res["shuffled_ids"], res["local_ids"])
        assert res["eval_ids_local"] and res["eval_diff"] == 0.0


def test_token_shuffle_balances_base_over_the_shuffled_rows():
    results = run_distributed(_shuffle_vs_plain, world_size=2, args=("base", {}))
    for res in results:
        counts = torch.bincount(res["shuffled_experts"], minlength=EXPERTS)
        assert counts.tolist() == [T_LOCAL // EXPERTS] * EXPERTS
        assert int((res["shuffled_ids"] < T_LOCAL).sum()) == T_LOCAL // 2
        assert res["eval_ids_local"] and res["eval_diff"] == 0.0
    plain, shuffled = expert_of_id(results, "plain"), expert_of_id(results, "shuffled")
    assert plain.keys() == shuffled.keys()
    assert sum(plain[t] != shuffled[t] for t in plain) > 0


def test_token_shuffle_permutations_are_seeded_per_rank_and_call():
    from stablemoe_megatron.moe.shuffle import TokenShuffle

    first, again = TokenShuffle(None, 7, 2), TokenShuffle(None, 7, 2)
    p0, p1 = first.draw(64, "cpu").order, first.draw(64, "cpu").order
    assert torch.equal(p0, again.draw(64, "cpu").order)  # reproducible from the seed
    assert not torch.equal(p0, p1)  # a new permutation per call
    other_rank = TokenShuffle(None, 7, 2)
    other_rank.rank = 1
    assert not torch.equal(p0, other_rank.draw(64, "cpu").order)
    assert not torch.equal(p0, TokenShuffle(None, 8, 2).draw(64, "cpu").order)
    # one rank: a local permutation, undone exactly, gradients through both ways
    hidden = torch.randn(64, 8, requires_grad=True)
    ids = torch.arange(64)
    rows, routed, state = TokenShuffle(None, 7, 2).shuffle(hidden, ids)
    assert torch.equal(rows, hidden[routed]) and not torch.equal(routed, ids)
    back = TokenShuffle(None, 7, 2).unshuffle(rows * 2, state)
    back.sum().backward()
    assert torch.equal(back, hidden * 2) and torch.equal(hidden.grad, torch.full_like(hidden, 2.0))


def test_token_shuffle_needs_tokens_divisible_by_the_data_parallel_size():
    from stablemoe_megatron.moe.shuffle import TokenShuffle

    shuffle = TokenShuffle(None, 7, 3)
    shuffle.world = 4  # as with 4 data-parallel ranks (checked before any communication)
    with pytest.raises(ValueError) as err:
        shuffle.shuffle(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long))
    assert str(err.value) == (
        "--moe-token-shuffle: the 6 tokens this rank holds at MoE layer 3 cannot be split evenly over "
        "the 4 data-parallel ranks; use micro-batches whose token count (per sequence-parallel shard) "
        "is a multiple of 4")


# ----------------------------------------------------------------------------------------------
# --moe-balance-count-scope
# ----------------------------------------------------------------------------------------------
def reference_balance_loss(hidden, weight, alpha):
    """alpha * eq. 8 over ``hidden`` [T, d] divided by T, in plain torch (docs/ALGORITHMS.md §2)."""
    scores = hidden.double() @ weight.double().t()
    experts = scores.argmax(-1)
    counts = torch.bincount(experts, minlength=weight.shape[0]).double()
    mean_load = hidden.shape[0] / weight.shape[0]
    total = 0.0
    for i in range(weight.shape[0]):
        chosen = experts == i
        total = total + (counts[i] - mean_load) / mean_load * torch.sigmoid(scores[chosen, i]).sum()
    return alpha * total / hidden.shape[0]


def reference_switch_loss(hidden, weight, alpha):
    """alpha * N * sum_i f_i P_i over ``hidden`` [T, d] (Fedus et al. eq. 4), plain torch."""
    probs = torch.softmax(hidden.double() @ weight.double().t(), dim=-1)
    counts = torch.bincount(probs.argmax(-1), minlength=weight.shape[0]).double()
    return alpha * weight.shape[0] * (counts / hidden.shape[0] * probs.mean(0)).sum()


def _counting_scope(router, scope):
    from megatron.core import parallel_state as ps

    reset_aux_scale()
    rank, group = ps.get_data_parallel_rank(), ps.get_data_parallel_group()
    torch.manual_seed(3)
    model = build(router, balance_count_scope=scope, balance_loss_coeff=0.3, aux_loss_coeff=0.2)
    hidden, _ = rank_inputs(rank)
    layer = model.moe_layers[0]
    with torch.no_grad():
        layer.router.weight.mul_(20.0)  # peaked scores: unequal loads, so the counting set matters
    _, _, inputs, decision = run_layer(model, rank_tokens(rank), hidden, None, backward=False)
    weight = layer.router.weight.detach().requires_grad_()
    loss_name, reference, alpha = (("balance_loss", reference_balance_loss, 0.3) if router == "stablemoe"
                                   else ("aux_loss", reference_switch_loss, 0.2))
    counted = all_gather(inputs.hidden.detach(), group) if scope == "data-parallel" else inputs.hidden.detach()
    expected = reference(counted, weight, alpha)
    expected_grad, = torch.autograd.grad(expected, weight)
    got = decision.metrics[loss_name].double()
    got_grad, = torch.autograd.grad(decision.aux_loss, layer.router.weight)  # the distillation loss: no E grad
    if scope == "data-parallel":  # the ranks' mean is compared with the global loss
        got, got_grad = got.clone(), got_grad.double().clone()
        for tensor in (got, got_grad):
            torch.distributed.all_reduce(tensor, group=group)
            tensor /= group.size()
    return dict(loss=got.item(), expected=expected.item(), grad_diff=(got_grad.double() - expected_grad).abs().max().item(),
                local=reference(inputs.hidden.detach(), weight, alpha).item())


@pytest.mark.parametrize("router", ["stablemoe", "switch"])
def test_data_parallel_counting_equals_the_loss_over_all_ranks_tokens(router):
    for res in run_distributed(_counting_scope, world_size=2, args=(router, "data-parallel")):
        assert abs(res["loss"] - res["expected"]) <= 1e-6 and res["grad_diff"] <= 1e-6, res
        assert abs(res["local"] - res["expected"]) > 1e-4  # the scope matters for this batch


@pytest.mark.parametrize("router", ["stablemoe", "switch"])
def test_micro_batch_counting_is_per_rank(router):
    results = run_distributed(_counting_scope, world_size=2, args=(router, "micro-batch"))
    for res in results:
        assert abs(res["loss"] - res["expected"]) <= 1e-6 and res["grad_diff"] <= 1e-6, res
        assert res["local"] == res["expected"]
    assert results[0]["loss"] != results[1]["loss"]


def _capacity_scope(factor):
    """Kept rows of this rank and the plain-torch expectation over both ranks' tokens."""
    from megatron.core import parallel_state as ps

    rank, group = ps.get_data_parallel_rank(), ps.get_data_parallel_group()
    torch.manual_seed(3)
    model = build("stablemoe", capacity=factor, balance_count_scope="data-parallel")
    hidden, cotangent = rank_inputs(rank)
    _, _, inputs, decision = run_layer(model, rank_tokens(rank), hidden, cotangent)
    scores = all_gather(inputs.hidden.detach(), group) @ model.moe_layers[0].router.weight.detach().t()
    experts = scores.argmax(-1)
    gates = torch.sigmoid(scores.gather(1, experts.unsqueeze(1)).squeeze(1))
    capacity = math.ceil(scores.shape[0] * factor / EXPERTS)
    keep = torch.zeros(scores.shape[0], dtype=torch.bool)
    for i in range(EXPERTS):
        rows = (experts == i).nonzero().squeeze(1)
        order = sorted(rows.tolist(), key=lambda t: (-gates[t].item(), t))  # highest gate, then earlier
        keep[order[:capacity]] = True
    mine = keep[rank * T_LOCAL:(rank + 1) * T_LOCAL].nonzero().squeeze(1)
    per_expert = torch.bincount(experts[keep], minlength=EXPERTS)
    kept = decision.token_index[decision.expert_index < EXPERTS]  # expert id N: dropped
    return dict(kept=kept.sort().values, expected=mine, per_expert=per_expert, capacity=capacity,
                local_max=int(torch.bincount(experts[rank * T_LOCAL:(rank + 1) * T_LOCAL][mine], minlength=EXPERTS).max()))


def test_data_parallel_capacity_counts_every_ranks_tokens():
    results = run_distributed(_capacity_scope, world_size=2, args=(0.75,))
    for res in results:
        assert torch.equal(res["kept"], res["expected"])
        assert int(res["per_expert"].max()) == res["capacity"]  # some expert overflows
    # an expert may keep more than ceil(T_local*c/N) rows of one rank: the cap is over both ranks
    assert max(res["local_max"] for res in results) > math.ceil(T_LOCAL * 0.75 / EXPERTS)


# ----------------------------------------------------------------------------------------------
# configuration errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    (dict(token_shuffle=True, distill_router="cnn"),
     "--moe-token-shuffle cannot be used with --moe-distill-router cnn: it routes by whole sequences, which "
     "the shuffle splits; use wordemb, or drop one"),
    (dict(token_shuffle=True, distill_router="transformer"),
     "--moe-token-shuffle cannot be used with --moe-distill-router transformer: it routes by whole sequences, "
     "which the shuffle splits; use wordemb, or drop one"),
    (dict(balance_count_scope="global"), "--moe-balance-count-scope must be one of micro-batch, data-parallel"),
])
def test_bad_combinations_are_config_errors(options, message):
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.moe.config import MoEConfig

    with pytest.raises(ConfigError) as err:
        MoEConfig(num_experts=4, **options).validate(num_layers=4)
    assert str(err.value) == message


def test_defaults_are_the_authors_and_flags_parse():
    from stablemoe_megatron.cli_args import build_parser
    from stablemoe_megatron.moe.config import MoEConfig

    moe = MoEConfig(num_experts=4)
    assert moe.token_shuffle is None and moe.shuffles_tokens and moe.balance_count_scope == "data-parallel"
    MoEConfig(num_experts=4, router="hash", token_shuffle=True, balance_count_scope="data-parallel").validate(4)
    args = vars(build_parser().parse_args(["--moe-token-shuffle", "--moe-balance-count-scope", "data-parallel"]))
    assert args == {"moe.token_shuffle": True, "moe.balance_count_scope": "data-parallel"}
    args = vars(build_parser().parse_args(["--no-moe-token-shuffle", "--moe-balance-count-scope", "micro-batch"]))
    assert args == {"moe.token_shuffle": False, "moe.balance_count_scope": "micro-batch"}
