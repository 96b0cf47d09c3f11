"""Top-k token-choice routing (``--moe-router-topk``, Megatron-LM's TopKRouter with softmax scores)
and distil-and-freeze with top-k (docs/ALGORITHMS.md §8).

Checked against independent references: plain-torch loops over the tokens (pairs, gates, the
aux loss and its gradient, capacity drops) and megatron-core's own routing functions; k = 1 is the
existing Switch bit for bit; an MoE layer with k = 2 under expert parallelism equals one process
with the same weights; the dispatcher sums a token's k expert outputs; stage 2 of a distilled
top-k router routes every token id to its table row (context-free) with no device-to-host copy;
bad flags fail with their exact message. Functions run by ``run_distributed`` are module-level.
"""
import math

import pytest
import torch

from moe_cases import EXPERTS, SEQ, VOCAB, batch, build, forward_backward
from moe_cases import positions, reduce_grads_like_megatron
from distributed import load_global_tensors, max_abs_diff_to_global, run_distributed
from test_moe_layer import count_every_host_copy, seq_major
from test_moe_parallel import _reference  # every rank's batch as one micro-batch in one process

from stablemoe_megatron import routing
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.moe.config import MoEConfig
from stablemoe_megatron.routing.capacity import capacity_keep_mask, expert_capacity_per_expert
from stablemoe_megatron.routing.common import choice_pairs
from stablemoe_megatron.routing.switch import switch_eval_routing, switch_routing, topk_choice

N, T = 6, 40
CASES = [(1, True), (2, True), (2, False), (3, True), (3, False)]  # (k, pre_softmax); k=1 needs pre


class Context:
    """A single-rank RoutingContext with --moe-router-topk k (local counts)."""

    def __init__(self, topk=None, pre_softmax=True, coeffs=None):
        self.training = True
        if topk is not None:
            self.topk, self.pre_softmax = topk, pre_softmax
        self.coeffs = coeffs or {}

    def count(self, expert_ids):
        return routing.tokens_per_expert(expert_ids, N), expert_ids.shape[0]

    def over_micro_batch(self, fn, local):
        return fn(local)

    def loss_coeff(self, loss):
        return self.coeffs.get(loss, 0.0)


def random_logits(seed=0, dtype=torch.float64, tokens=T, experts=N):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(tokens, experts, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_(True)


def reference_routing(logits, k, pre_softmax):
    """Plain torch, token by token: (experts [T, k] by descending logit, gates [T, k], aux loss)."""
    num_tokens, num_experts = logits.shape
    probs = [torch.exp(row - row.max()) / torch.exp(row - row.max()).sum() for row in logits]
    experts, gates = [], []
    for row, prob in zip(logits, probs):
        order = sorted(range(num_experts), key=lambda i: -row[i].item())[:k]
        experts.append(order)
        if pre_softmax:
            gates.append(torch.stack([prob[i] for i in order]))
        else:
            chosen = torch.stack([torch.exp(row[i] - row[order[0]]) for i in order])
            gates.append(chosen / chosen.sum())
    counts = [sum(i in chosen for chosen in experts) for i in range(num_experts)]
    prob_sums = [sum(prob[i] for prob in probs) for i in range(num_experts)]
    # Megatron's switch_load_balancing_loss_func: N / (k T^2) * sum_i n_i * sum_t p_ti
    aux = num_experts / (k * num_tokens * num_tokens) * sum(n * p for n, p in zip(counts, prob_sums))
    return torch.tensor(experts), torch.stack(gates), aux


# ----------------------------------------------------------------------------------------------
# 1. the pure routing functions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,pre_softmax", CASES)
def test_topk_routing_matches_a_plain_reference(k, pre_softmax):
    logits = random_logits(k)
    experts, gates, losses = switch_routing(logits, Context(k, pre_softmax))
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_experts, ref_gates, ref_aux = reference_routing(ref_logits, k, pre_softmax)
    assert torch.equal(experts.reshape(T, k), ref_experts)
    torch.testing.assert_close(gates.reshape(T, k), ref_gates, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses["aux_loss"], ref_aux, rtol=1e-12, atol=1e-12)
    # the gradients of the loss and of the gates reach the logits the same way
    weights = torch.linspace(0.5, 1.5, T * k, dtype=torch.float64).view(T, k)
    (losses["aux_loss"] + (gates.reshape(T, k) * weights).sum()).backward()
    (ref_aux + (ref_gates * weights).sum()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-10, atol=1e-12)
    if not pre_softmax:  # renormalised over the k chosen experts
        torch.testing.assert_close(gates.sum(-1), torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("k,pre_softmax", CASES)
def test_topk_routing_matches_megatron_core(k, pre_softmax):
    from megatron.core.transformer.moe.moe_utils import (
        switch_load_balancing_loss_func,
        topk_routing_with_score_function,
    )

    logits = random_logits(10 + k, dtype=torch.float32)
    experts, gates, losses = switch_routing(logits, Context(k, pre_softmax))
    tokens, pair_experts, pair_gates = choice_pairs(experts, gates)
    dense = torch.zeros(T, N).index_put_((tokens, pair_experts), pair_gates.detach())
    probs, routing_map = topk_routing_with_score_function(logits.detach(), k, use_pre_softmax=pre_softmax)
    assert torch.equal(dense > 0, routing_map)
    torch.testing.assert_close(dense, probs, rtol=1e-6, atol=1e-7)
    aux = switch_load_balancing_loss_func(torch.softmax(logits.detach(), -1), routing_map.sum(0), T, k, N, 1.0)
    torch.testing.assert_close(losses["aux_loss"].detach(), aux, rtol=1e-6, atol=1e-7)


def test_top1_is_the_existing_switch_bit_for_bit():
    logits = random_logits(3, dtype=torch.float32)
    plain = switch_routing(logits, Context(coeffs={"z_loss": 0.1}))  # a context without topk: k = 1
    with_k = switch_routing(logits, Context(1, True, coeffs={"z_loss": 0.1}))
    expert_ids, gates = routing.top1(routing.router_probs(logits))
    for got in (plain, with_k):
        assert torch.equal(got[0], expert_ids) and torch.equal(got[1], gates)
        assert torch.equal(got[2]["aux_loss"], routing.switch_aux_loss(routing.router_probs(logits), expert_ids))
        assert torch.equal(got[2]["z_loss"], plain[2]["z_loss"])
    token_index, pair_experts, pair_gates = choice_pairs(expert_ids, gates)
    assert torch.equal(token_index, torch.arange(T)) and pair_experts is expert_ids and pair_gates is gates


def reference_keep(pairs, capacity):
    """Per expert keep the ``capacity`` highest-gate pairs (ties: earlier pair): plain Python."""
    keep = [False] * len(pairs)
    for expert in range(N):
        mine = sorted((-gate, index) for index, (e, gate) in enumerate(pairs) if e == expert)
        for _, index in mine[:capacity]:
            keep[index] = True
    return torch.tensor(keep)


@pytest.mark.parametrize("k,pre_softmax", CASES)
@pytest.mark.parametrize("factor", [0.5, 1.0, 3.0])
def test_capacity_drops_the_lowest_gates_like_megatron(k, pre_softmax, factor):
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity

    logits = random_logits(20 + k, dtype=torch.float32).detach()
    tokens, experts, gates = choice_pairs(*topk_choice(logits, k, pre_softmax))
    capacity = expert_capacity_per_expert(experts.numel(), N, factor)
    assert capacity == get_capacity(T * k, N, factor)  # Megatron's ceil(T*k/N*c)
    keep = capacity_keep_mask(experts, gates, N, capacity)
    assert torch.equal(keep, reference_keep(list(zip(experts.tolist(), gates.tolist())), capacity))
    dense = torch.zeros(T, N).index_put_((tokens, experts), gates)
    _, kept_map = apply_router_token_dropping(dense, dense > 0, k, factor, drop_policy="probs")
    assert torch.equal(torch.zeros(T, N, dtype=torch.bool).index_put_((tokens[keep], experts[keep]),
                                                                      torch.tensor(True)), kept_map)
    counts = torch.bincount(experts, minlength=N)
    assert torch.equal(torch.bincount(experts[keep], minlength=N), counts.clamp(max=capacity))
    if factor == 0.5:  # room for half the pairs: some are dropped
        assert (~keep).any()


def test_eval_routing_and_chosen_gate_agree_with_training_routing():
    algorithm = routing.get_routing("switch")
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(T, 8, generator=gen), torch.randn(N, 8, generator=gen)
    logits = algorithm.scores(hidden, weight)
    for k, pre in CASES[1:]:
        experts, gates, _ = switch_routing(logits, Context(k, pre))
        pairs = switch_eval_routing(hidden, weight, topk=k, pre_softmax=pre)
        for got, want in zip(pairs, choice_pairs(experts, gates)):
            assert torch.equal(got, want)
        torch.testing.assert_close(algorithm.chosen_gate(hidden, weight, experts, pre_softmax=pre), gates)


# ----------------------------------------------------------------------------------------------
# 2. distillation of a top-k choice
# ----------------------------------------------------------------------------------------------
def test_topk_distillation_loss_agreement_and_assignment():
    student = random_logits(30)
    teacher = torch.topk(random_logits(31).detach(), 2, dim=-1).indices  # [T, 2]
    loss = routing.distillation_loss(student, teacher, num_tokens=3 * T)
    log_probs = torch.log_softmax(student.detach(), -1)
    expected = -sum(log_probs[t, teacher[t, j]] for t in range(T) for j in range(2)) / (2 * 3 * T)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
    loss.backward()  # gradient: softmax - the uniform target over the teacher's two experts, / (3T)
    target = torch.zeros(T, N, dtype=torch.float64).scatter_(1, teacher, 0.5)
    torch.testing.assert_close(student.grad, (torch.softmax(student.detach(), -1) - target) / (3 * T))
    # k = 1 is the paper's loss exactly; a [T, 1] teacher is the same loss
    top = teacher[:, 0]
    paper = -log_probs.gather(1, top[:, None]).sum() / T
    torch.testing.assert_close(routing.distillation_loss(student, top).detach(), paper, rtol=1e-12, atol=1e-12)
    as_column = routing.distillation_loss(student, top[:, None])
    torch.testing.assert_close(as_column, routing.distillation_loss(student, top))
    # agreement: the share of teacher pairs among the student's k best
    best = torch.topk(student.detach(), 2, dim=-1).indices
    assert torch.equal(routing.distilled_assignment(student, topk=2), best)
    found = sum(int(teacher[t, j] in best[t].tolist()) for t in range(T) for j in range(2))
    assert routing.distillation_agreement(student, teacher).item() == pytest.approx(found / (2 * T))
    assert routing.distillation_agreement(student, best).item() == 1.0


def test_word_embedding_topk_table():
    from stablemoe_megatron.routing.distilled import WordEmbeddingRouter, build_distilled_router

    torch.manual_seed(0)
    router = WordEmbeddingRouter(VOCAB, N)
    table = router.expert_table(chunk_size=10, topk=3)
    scores = router.embedding.weight @ router.centroids.t()
    assert table.shape == (VOCAB, 3)
    for token in range(VOCAB):
        assert table[token].tolist() == sorted(range(N), key=lambda i: -scores[token, i].item())[:3]
    assert torch.equal(table[:, 0], router.expert_table())
    with pytest.raises(ValueError, match=r"topk must be in 1..6, got 7"):
        router.expert_table(topk=7)
    with pytest.raises(NotImplementedError, match="context-dependent"):
        build_distilled_router("cnn", VOCAB, N).expert_table(topk=2)


# ----------------------------------------------------------------------------------------------
# 3. the dispatcher: several pairs per token
# ----------------------------------------------------------------------------------------------
def test_dispatch_and_combine_sum_a_tokens_k_experts():
    from stablemoe_megatron.moe.dispatcher import AllToAllDispatcher

    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(T, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mats = torch.randn(N, 5, 5, generator=gen, dtype=torch.float64)
    experts, raw_gates = topk_choice(random_logits(8), 3, False)
    token_index, expert_index, gates = choice_pairs(experts, raw_gates.detach().requires_grad_(True))
    drop = torch.rand(token_index.numel(), generator=gen) < 0.2  # some pairs dropped by capacity
    token_index, expert_index, gates = token_index[~drop], expert_index[~drop], gates[~drop]
    dispatcher = AllToAllDispatcher(N)
    expert_input, state = dispatcher.dispatch(hidden, token_index, expert_index)
    assert state.tokens_per_local_expert.tolist() == torch.bincount(expert_index, minlength=N).tolist()
    chunks = expert_input.split(state.tokens_per_local_expert.tolist())
    output = dispatcher.combine(torch.cat([c @ mats[e] for e, c in enumerate(chunks)]), state, gates)
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    gates_ref = gates.detach().clone().requires_grad_(True)
    expected = torch.zeros(T, 5, dtype=torch.float64)
    for pair in range(token_index.numel()):
        t, e = token_index[pair], expert_index[pair]
        expected = expected.index_add(0, t[None], (gates_ref[pair] * hidden_ref[t] @ mats[e])[None])
    torch.testing.assert_close(output, expected)
    grad = torch.randn(T, 5, generator=gen, dtype=torch.float64)
    hidden_grad, gate_grad = torch.autograd.grad(output, (hidden, gates), grad)
    want_hidden, want_gates = torch.autograd.grad(expected, (hidden_ref, gates_ref), grad)
    torch.testing.assert_close(hidden_grad, want_hidden)
    torch.testing.assert_close(gate_grad, want_gates)


# ----------------------------------------------------------------------------------------------
# 4. the MoE layer: pairs, capacity and metrics; expert parallelism equals one process
# ----------------------------------------------------------------------------------------------
def _layer_routing_run(k, pre_softmax, factor):
    model = build(router="switch", layout="megatron", capacity=factor,
                  moe_options=dict(router_topk=k, router_pre_softmax=pre_softmax, token_shuffle=False))
    calls = {layer.layer_number: [] for layer in model.moe_layers}
    for layer in model.moe_layers:
        layer.router.register_forward_hook(lambda m, args, out, n=layer.layer_number: calls[n].append((args[0], out)))
    forward_backward(model, 0)
    metrics = model.moe_metrics()
    out = []
    for layer in model.moe_layers:
        (inputs, decision), = calls[layer.layer_number]
        logits = inputs.hidden.detach().float() @ layer.router.weight.detach().t()
        experts, gates, _ = reference_routing(logits.double(), k, pre_softmax)
        pairs = [(t, experts[t, j].item(), gates[t, j].item()) for t in range(logits.shape[0]) for j in range(k)]
        keep = reference_keep([(e, g) for _, e, g in pairs], math.ceil(logits.shape[0] * k * factor / EXPERTS))
        kept = [p for p, flag in zip(pairs, keep.tolist()) if flag]
        got = [pair for pair in zip(decision.token_index.tolist(), decision.expert_index.tolist(),
                                    decision.gates.tolist()) if pair[1] < EXPERTS]  # expert id N: dropped
        out.append(dict(
            same_pairs=[(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in kept],
            gate_diff=max(abs(a[2] - b[2]) for a, b in zip(got, kept)),
            one_pair=decision.one_pair_per_token, dropped=len(pairs) - len(kept),
            metric_counts=metrics[layer.layer_number]["tokens_per_expert"].tolist(),
            counts=torch.bincount(decision.expert_index, minlength=EXPERTS + 1)[:EXPERTS].tolist(),
            dropped_marked=int((decision.expert_index == EXPERTS).sum()),
            dropped_fraction=metrics[layer.layer_number]["dropped_fraction"].item(), pairs=len(pairs)))
    return out


@pytest.mark.parametrize("k,pre_softmax", [(2, None), (3, True)])
def test_layer_routes_pairs_with_megatron_capacity(k, pre_softmax):
    for res in run_distributed(_layer_routing_run, world_size=1, args=(k, pre_softmax, 0.5))[0]:
        assert res["same_pairs"] and res["gate_diff"] < 1e-6 and not res["one_pair"], res
        assert res["dropped"] >= res["pairs"] // 2, res  # capacity 0.5: at most half the pairs fit
        assert res["dropped_marked"] == res["dropped"], res  # dropped pairs stay, marked with expert id N
        assert res["metric_counts"] == res["counts"] and sum(res["counts"]) == res["pairs"] - res["dropped"]
        assert res["dropped_fraction"] == pytest.approx(res["dropped"] / res["pairs"])


def _parallel(case, weights, ref_losses, ref_grads):
    from megatron.core import parallel_state as ps

    model = build(**case)
    assert load_global_tensors(model, weights) > 0
    assert all(layer.router.topk == case["moe_options"]["router_topk"] for layer in model.moe_layers)
    dp_rank = ps.get_data_parallel_rank()
    losses = forward_backward(model, dp_rank)
    reduce_grads_like_megatron(model)
    grad_diff, compared = max_abs_diff_to_global(model, ref_grads, grads=True)
    return (losses - ref_losses[dp_rank]).abs().max().item(), grad_diff, compared


EP_CASES = {
    "top2-megatron": dict(router="switch", layout="megatron", moe_options=dict(router_topk=2)),
    "top3-presoftmax-capacity-paper": dict(router="switch", capacity=0.5,
                                           moe_options=dict(router_topk=3, router_pre_softmax=True, z_loss_coeff=0.01)),
    "top2-wordemb-stage1": dict(router="switch", distill="wordemb", moe_options=dict(router_topk=2)),
}


@pytest.mark.parametrize("name", sorted(EP_CASES))
def test_topk_expert_parallel_equals_single_process(name):
    case = EP_CASES[name]
    weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, 2))[0]
    for loss_diff, grad_diff, compared in run_distributed(
            _parallel, world_size=2, ep=2, args=(case, weights, ref_losses, ref_grads)):
        assert loss_diff <= 1e-5 and grad_diff <= 1e-5, (loss_diff, grad_diff)
        assert any("router" in key for key in compared) and any("experts" in key for key in compared)


# ----------------------------------------------------------------------------------------------
# 5. distil-and-freeze with top-k: the distilled set in stage 1, the [V, k] table in stage 2
# ----------------------------------------------------------------------------------------------
def _distilled_topk_run():
    from megatron.core import parallel_state as ps

    k = 2
    model = build(router="switch", distill="wordemb", layout="megatron",
                  moe_options=dict(router_topk=k, token_shuffle=False, distill_loss_coeff=0.5,
                                   expert_output_init="normal"))  # non-zero experts: gates get gradients
    calls = {layer.layer_number: [] for layer in model.moe_layers}
    for layer in model.moe_layers:
        layer.keep_last_decision = True
        layer.router.register_forward_hook(lambda m, args, out, n=layer.layer_number: calls[n].append((args[0], out)))
    tokens, labels = batch(ps.get_data_parallel_rank())
    model(tokens, positions(), None, labels=labels)
    out = {"stage1": []}
    for layer in model.moe_layers:  # stage 1: the teacher is the top-k set, the loss its mean CE
        (inputs, decision), = calls[layer.layer_number]
        router = layer.router
        logits = inputs.hidden.detach().float() @ router.weight.detach().t()
        teacher = torch.topk(logits, k, dim=-1).indices
        student = router.distilled.embedding.weight[inputs.token_ids] @ router.distilled.centroids.t()
        ce = -torch.log_softmax(student.detach(), -1).gather(1, teacher).sum() / (k * teacher.shape[0])
        out["stage1"].append(dict(teacher=torch.equal(decision.top1_expert_ids, teacher),
                                  distill_diff=abs(decision.metrics["distill_loss"].item() - 0.5 * ce.item())))
    model.eval()  # evaluation in stage 1 routes with the distilled router's k best (--moe-eval-routing)
    for layer in model.moe_layers:
        calls[layer.layer_number].clear()
    with torch.no_grad():
        model(tokens, positions(), None, labels=labels)
    out["eval"] = []
    for layer in model.moe_layers:
        (inputs, decision), = calls[layer.layer_number]
        student = layer.router.distilled.scores(inputs.token_ids[None])[0]
        out["eval"].append(torch.equal(decision.expert_index, torch.topk(student, k, dim=-1).indices.reshape(-1)))
    model.train()
    model.enter_stage_two()
    out["tables"] = []
    for layer in model.moe_layers:
        router = layer.router
        scores = router.distilled.embedding.weight @ router.distilled.centroids.t()
        out["tables"].append(router.expert_table.shape == (VOCAB, k)
                             and torch.equal(router.expert_table, torch.topk(scores, k, dim=-1).indices))
    tables = [layer.router.expert_table for layer in model.moe_layers]
    for name, seed in (("host", 0), ("device", 0), ("other_context", 7)):
        for layer in model.moe_layers:
            calls[layer.layer_number].clear()
        batch_tokens, batch_labels = batch(seed + ps.get_data_parallel_rank())
        if name == "other_context":  # the same ids in other sequences and positions
            batch_tokens = tokens.roll(shifts=(1, 5), dims=(0, 1))
        model.zero_grad(set_to_none=True)
        with count_every_host_copy():
            from stablemoe_megatron.moe.dispatcher import device_to_host_copies

            before = device_to_host_copies()
            losses = model(batch_tokens, positions(), None, labels=batch_labels,
                           host_token_ids=None if name == "device" else batch_tokens)
            copies = device_to_host_copies() - before
            losses.mean().backward()
        result = {"copies": copies, "losses": losses.detach(), "layers": []}
        for layer, table in zip(model.moe_layers, tables):
            (inputs, decision), = calls[layer.layer_number]
            ids = seq_major(batch_tokens)
            logits = inputs.hidden.detach().float() @ layer.router.weight.detach().t()
            chosen = table[ids]
            gates = torch.softmax(logits.gather(1, chosen), dim=-1)  # renormalised over the k
            pair_counts = torch.bincount(chosen.reshape(-1), minlength=EXPERTS)
            result["layers"].append(dict(
                experts=torch.equal(decision.expert_index, chosen.reshape(-1)),
                tokens=torch.equal(decision.token_index, torch.arange(ids.numel() * k) // k),
                gate_diff=(decision.gates.detach() - gates.reshape(-1)).abs().max().item(),
                host_counts=None if decision.host_tokens_per_expert is None
                else torch.equal(decision.host_tokens_per_expert, pair_counts),
                backbone_grad=layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum().item() > 0,
                distilled_grad=any(p.grad is not None for p in layer.router.distilled.parameters()),
                experts_by_id={int(t): sorted(e) for t, e in zip(ids, chosen.tolist())}))
        result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = result
    out["grad_diff"] = max((out["host"]["grads"][n] - g).abs().max().item() for n, g in out["device"]["grads"].items())
    for name in ("host", "device", "other_context"):
        del out[name]["grads"]
    return out


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2)], ids=["ep1", "ep2"])
def test_distilled_topk_routes_by_table_without_device_to_host_copies(world, ep):
    for res in run_distributed(_distilled_topk_run, world_size=world, ep=ep):
        assert all(s["teacher"] and s["distill_diff"] < 1e-6 for s in res["stage1"]), res["stage1"]
        assert all(res["tables"]) and all(res["eval"]), (res["tables"], res["eval"])
        host, device, other = res["host"], res["device"], res["other_context"]
        assert host["copies"] == 0 and other["copies"] == 0, (host["copies"], other["copies"])
        if ep == 1:
            assert device["copies"] == len(device["layers"]), device["copies"]
        assert torch.equal(host["losses"], device["losses"]) and res["grad_diff"] == 0.0
        for run in (host, device, other):
            for layer in run["layers"]:
                assert layer["experts"] and layer["tokens"] and layer["gate_diff"] < 1e-6, layer
                assert layer["backbone_grad"] and not layer["distilled_grad"], layer
        assert all(layer["host_counts"] for layer in host["layers"] + other["layers"])
        assert all(layer["host_counts"] is None for layer in device["layers"])
        for mine, moved in zip(host["layers"], other["layers"]):  # context-free: the id decides
            assert mine["experts_by_id"] == moved["experts_by_id"]


# ----------------------------------------------------------------------------------------------
# 6. flags: the CLI, Megatron's TransformerConfig, and refusals with their exact messages
# ----------------------------------------------------------------------------------------------
def test_flags_reach_the_config_and_megatron():
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import transformer_config

    config = parse_config(["--num-experts", "4", "--moe-router", "switch", "--moe-router-topk", "2"])
    assert config.moe.router_topk == 2 and config.moe.router_pre_softmax is None
    assert config.moe.effective_router_pre_softmax is False
    assert parse_config(["--moe-router-pre-softmax"]).moe.router_pre_softmax is True
    assert parse_config(["--no-moe-router-pre-softmax"]).moe.router_pre_softmax is False
    assert MoEConfig(num_experts=4).effective_router_topk == 1
    assert MoEConfig(num_experts=4).effective_router_pre_softmax is True
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ)
    for moe, k, pre in ((config.moe, 2, False), (MoEConfig(num_experts=4), 1, True),
                        (MoEConfig(num_experts=4, router="switch", router_topk=3, router_pre_softmax=True), 3, True)):
        moe.validate(2)
        megatron = transformer_config(model, moe)
        assert (megatron.moe_router_topk, megatron.moe_router_pre_softmax) == (k, pre)
    assert routing.get_routing("switch").supports_topk
    from stablemoe_megatron.routing.registry import topk_names

    assert topk_names() == ("switch",)


@pytest.mark.parametrize("router", ["stablemoe", "base", "hash", "expert-choice"])
def test_top1_routers_refuse_k_above_one(router):
    message = (f"--moe-router-topk 2 needs a router that sends a token to several experts (switch); "
               f"--moe-router {router} does not: use --moe-router switch, or drop --moe-router-topk (top-1)")
    with pytest.raises(ConfigError) as error:
        MoEConfig(num_experts=4, router=router, router_topk=2).validate(4)
    assert str(error.value) == message
    MoEConfig(num_experts=4, router=router, router_topk=1).validate(4)  # k = 1 is every router's own


def test_bad_topk_flags():
    cases = [
        (dict(router="switch", router_topk=5),
         "--moe-router-topk 5 is more than --num-experts 4: a token cannot go to more experts than there are; "
         "lower --moe-router-topk"),
        (dict(router="switch", router_topk=0), "--moe-router-topk must be >= 1, got 0"),
        (dict(router="switch", router_pre_softmax=False),
         "--no-moe-router-pre-softmax needs --moe-router-topk > 1: the softmax over one chosen logit is always 1 "
         "(Megatron-LM refuses it too); drop it"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError) as error:
            MoEConfig(num_experts=4, **options).validate(4)
        assert str(error.value) == message
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.config import check_ranges

    with pytest.raises(ConfigError) as error:
        check_ranges(parse_config(["--num-experts", "4", "--moe-router-topk", "0"]))
    assert str(error.value) == "--moe-router-topk must be >= 1, got 0"
