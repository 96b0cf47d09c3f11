"""MoE layer behaviour inside the GPT model: aux losses of every layer, metrics, host-side routing
without device syncs, capacity dropping, Expert Choice causality at evaluation, and the stage switch.

Every check recomputes the expected value independently (plain torch formulas from
docs/ALGORITHMS.md §2-4 on the hidden states captured at the router's input), never from the
layer's own outputs.
Functions run by ``run_distributed`` are module-level so the worker processes can import them.
"""
import math

import pytest
import torch

from moe_cases import BATCH, EXPERTS, SEQ, VOCAB, batch, positions
from distributed import global_tensors, load_global_tensors, run_distributed

HIDDEN = 32


# ----------------------------------------------------------------------------------------------
# helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------
def build(router="stablemoe", layout="paper", positions="middle", distill=None, capacity=None,
          num_layers=4, sublayers=2, **moe_overrides):
    """moe_cases.build with extra MoEConfig fields (loss coefficients ...)."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    model_cfg = ModelConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4,
                            seq_length=SEQ, untie_embeddings_and_output_weights=True,
                            hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False)
    moe = MoEConfig(num_experts=EXPERTS, router=router, layer_positions=positions,
                    layer_freq=2 if layout == "megatron" else None, sublayers_per_expert=sublayers,
                    distill_router=distill, expert_capacity_factor=capacity, **moe_overrides)
    tp = ps.get_tensor_model_parallel_world_size()
    config = transformer_config(
        model_cfg, moe, tensor_parallel=tp, pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        expert_parallel=ps.get_expert_model_parallel_world_size(), sequence_parallel=tp > 1)
    return build_model(model_cfg, moe, VOCAB, config)


def capture_router_calls(model):
    """Record (RouterInputs, RoutingDecision) of every router call, per MoE layer."""
    calls = {layer.layer_number: [] for layer in model.moe_layers}
    for layer in model.moe_layers:
        layer.router.register_forward_hook(
            lambda module, args, out, n=layer.layer_number: calls[n].append((args[0], out)))
    return calls


def reset_aux_scale(value=None):
    """megatron's aux-loss backward scale is process-global state (the pipeline schedule sets it
    to 1/num_microbatches); the worker processes are reused, so reset it (None = default 1.0)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    if value is None:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
    else:
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(float(value))


def seq_major(ids):
    """[B, S] -> [S*B]: the row order of the MoE layer's flattened [S, B, h] hidden states."""
    return ids.t().reshape(-1)


# Independent formulas (docs/ALGORITHMS.md §2 and §4), written out with plain torch ops.
def manual_switch_losses(hidden, weight, aux_coeff, z_coeff):
    logits = hidden.float() @ weight.t()
    probs = torch.softmax(logits, dim=-1)
    experts = probs.detach().argmax(-1)
    num_tokens = hidden.shape[0]
    fraction = torch.stack([(experts == i).float().sum() for i in range(EXPERTS)]) / num_tokens
    mean_prob = probs.sum(0) / num_tokens
    aux = aux_coeff * EXPERTS * (fraction * mean_prob).sum()
    z = z_coeff * (torch.logsumexp(logits, dim=-1) ** 2).sum() / num_tokens
    gates = probs.gather(1, experts[:, None]).squeeze(1)
    return {"aux_loss": aux, "z_loss": z}, experts, gates


def manual_stablemoe_losses(hidden, weight, distilled, token_ids, alpha, distill_coeff):
    scores = hidden.float() @ weight.t()
    experts = scores.detach().argmax(-1)
    num_tokens = hidden.shape[0]
    counts = torch.bincount(experts, minlength=EXPERTS).float()
    mean_load = num_tokens / EXPERTS
    gates = torch.sigmoid(scores.gather(1, experts[:, None]).squeeze(1))
    balance = alpha * (((counts[experts] - mean_load) / mean_load) * gates).sum() / num_tokens
    student = distilled.embedding.weight[token_ids] @ distilled.centroids.t()
    log_probs = torch.log_softmax(student, dim=-1)
    distill = -distill_coeff * log_probs.gather(1, experts[:, None]).sum() / num_tokens
    return {"balance_loss": balance, "distill_loss": distill}, experts, gates


# ----------------------------------------------------------------------------------------------
# 2. every MoE layer's auxiliary loss reaches the total loss; per-layer metrics
# ----------------------------------------------------------------------------------------------
AUX_CASES = {
    "switch": dict(router="switch", layout="megatron", aux_loss_coeff=0.3, z_loss_coeff=0.01),
    "stablemoe": dict(router="stablemoe", layout="megatron", balance_loss_coeff=0.3, distill_loss_coeff=0.5),
}


def _aux_losses_reach_total_loss(case):
    reset_aux_scale()
    model = build(**case)
    assert len(model.moe_layers) == 2
    calls = capture_router_calls(model)
    tokens, labels = batch(0)
    task = model(tokens, positions(), None, labels=labels).mean()
    metrics = model.moe_metrics()

    # Independent per-layer losses from the hidden states each router saw (still in the graph).
    manual, results = {}, {}
    for layer in model.moe_layers:
        (inputs, decision), = calls[layer.layer_number]
        router = layer.router
        if case["router"] == "switch":
            losses, experts, gates = manual_switch_losses(
                inputs.hidden, router.weight, case["aux_loss_coeff"], case["z_loss_coeff"])
        else:
            losses, experts, gates = manual_stablemoe_losses(
                inputs.hidden, router.weight, router.distilled, inputs.token_ids,  # the rows' ids (token shuffle)
                case["balance_loss_coeff"], case["distill_loss_coeff"])
        manual[layer.layer_number] = sum(losses.values())
        got = metrics[layer.layer_number]
        results[layer.layer_number] = dict(
            metric_diff=max(abs(got[name].item() - value.item()) for name, value in losses.items()),
            metric_names=sorted(got),
            loss_values={name: value.item() for name, value in losses.items()},
            experts_equal=torch.equal(decision.expert_index, experts),
            gate_diff=(decision.gates - gates).abs().max().item(),
            counts_equal=torch.equal(got["tokens_per_expert"], torch.bincount(experts, minlength=EXPERTS)),
            mean_gate_diff=abs(got["mean_gate"].item() - gates.mean().item()),
            ids_are_the_batch=torch.equal(inputs.token_ids.sort().values, seq_major(tokens).sort().values),
        )
        if router.distilled is not None:
            student = router.distilled.embedding.weight[inputs.token_ids] @ router.distilled.centroids.t()
            agreement = (student.argmax(-1) == experts).float().mean().item()
            results[layer.layer_number]["agreement_diff"] = abs(got["distill_agreement"].item() - agreement)

    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def grads(loss, scale):
        reset_aux_scale(scale)  # 0: the model's own aux losses contribute nothing
        out = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]

    # megatron's cross-entropy backward works in place (one backward per forward): the task loss
    # goes last on this graph, and a second (identical) forward gives the full gradient.
    last = max(manual)
    g_aux = grads(sum(manual.values()), 0.0)
    g_aux_last_only = grads(manual[last], 0.0)
    g_task = grads(task, 0.0)
    g_full = grads(model(tokens, positions(), None, labels=labels).mean(), None)
    reset_aux_scale()

    worst = max((f - t - a).abs().max().item() for f, t, a in zip(g_full, g_task, g_aux))
    for layer in model.moe_layers:
        n = layer.layer_number
        idx = [i for i, name in enumerate(names) if name.endswith("router.weight")
               and f"layers.{n - 1}." in name]
        assert len(idx) == 1
        i = idx[0]
        results[n].update(
            router_aux_norm=g_aux[i].norm().item(),
            router_full_minus_task=(g_full[i] - g_task[i]).norm().item(),
            router_missing_if_last_only=(g_aux[i] - g_aux_last_only[i]).norm().item(),
        )
        if layer.router.distilled is not None:
            # distillation trains D and E^ only: their gradient is the distillation loss's alone
            for name, param in layer.router.distilled.named_parameters():
                j = next(k for k, p in enumerate(params) if p is param)
                results[n].setdefault("distilled_task_grad", 0.0)
                results[n]["distilled_task_grad"] = max(results[n]["distilled_task_grad"],
                                                        g_task[j].abs().max().item())
                results[n].setdefault("distilled_grad_norm", 0.0)
                results[n]["distilled_grad_norm"] += g_full[j].norm().item()
    return worst, results


@pytest.mark.parametrize("name", sorted(AUX_CASES))
def test_every_layer_aux_loss_reaches_total_loss_and_metrics(name):
    case = AUX_CASES[name]
    worst, results = run_distributed(_aux_losses_reach_total_loss, world_size=1, args=(case,))[0]
    assert worst <= 1e-6, worst  # full grad == task grad + coefficient-weighted aux grad, every param
    assert sorted(results) == [1, 3]  # --moe-layer-freq 2: layers 1, 3 (Megatron-LM: 0-based i % k == 0)
    for number, res in results.items():
        assert res["experts_equal"] and res["counts_equal"] and res["ids_are_the_batch"], number
        assert res["gate_diff"] <= 1e-6 and res["mean_gate_diff"] <= 1e-6, res
        assert res["metric_diff"] <= 1e-6, res
        assert all(value > 0 for value in res["loss_values"].values()), res
        # the aux loss of THIS layer moves THIS layer's router: its contribution is really there,
        # and a model that only added the last layer's aux loss would miss a visible part of it
        assert res["router_aux_norm"] > 1e-4, res
        assert abs(res["router_full_minus_task"] - res["router_aux_norm"]) <= 1e-6 + 1e-4 * res["router_aux_norm"]
        if number != 3:  # the last MoE layer (layers 1 and 3)
            assert res["router_missing_if_last_only"] > 1e-4, res
        if name == "stablemoe":
            assert set(res["metric_names"]) >= {"balance_loss", "distill_loss", "distill_agreement"}
            assert res["distilled_task_grad"] == 0.0 and res["distilled_grad_norm"] > 0, res
            assert res["agreement_diff"] <= 1e-6, res
        else:
            assert set(res["metric_names"]) >= {"aux_loss", "z_loss", "mean_gate", "tokens_per_expert"}


# ----------------------------------------------------------------------------------------------
# 3. token-id routing with host token ids makes no device-to-host copy in the dispatcher
# ----------------------------------------------------------------------------------------------
class count_every_host_copy:
    """The dispatcher counts only copies from a non-CPU device, so on a CPU-only machine its
    counter never moves. Inside this context every ``_to_host`` call counts (every place where a
    GPU run would copy device -> host), through the same counter the benchmarks read."""

    def __enter__(self):
        from stablemoe_megatron.moe import dispatcher

        self._module, self._original = dispatcher, dispatcher._to_host

        def counting_to_host(tensor):
            dispatcher._D2H_COPIES[0] += 1
            return tensor.cpu()

        dispatcher._to_host = counting_to_host
        return self

    def __exit__(self, *exc):
        self._module._to_host = self._original


# The token shuffle (on by default) keeps the host ids with one data-parallel rank (a local
# permutation drawn on the host) and moves the rows away from them with several.
HOST_ID_CASES = {
    "hash-paper-shuffle": dict(router="hash"),
    "stablemoe-frozen-paper-shuffle": dict(router="stablemoe"),
    "hash-paper": dict(router="hash", token_shuffle=False),
    "hash-megatron": dict(router="hash", layout="megatron", token_shuffle=False),
    "stablemoe-frozen-paper": dict(router="stablemoe", token_shuffle=False),
    "stablemoe-frozen-megatron": dict(router="stablemoe", layout="megatron", token_shuffle=False),
    "switch-wordemb-frozen-megatron": dict(router="switch", distill="wordemb", layout="megatron", token_shuffle=False),
}


def capacity_in_training(case) -> bool:
    """The router's default capacity applies (StableMoE: 2, the authors'). Counted over one rank's
    tokens, the kept tokens per expert follow from the host counts (min(n_i, capacity)); counted
    over several data-parallel ranks they are known on the device only (one copy per call)."""
    from stablemoe_megatron.moe.config import MoEConfig

    return MoEConfig(num_experts=EXPERTS, router=case["router"]).effective_capacity_factor is not None


def _host_token_ids_run(case, stage_two):
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.moe.dispatcher import device_to_host_copies

    reset_aux_scale()
    model = build(**case)
    if stage_two:
        model.enter_stage_two()
        assert model.stage == 2
    for layer in model.moe_layers:
        layer.keep_last_decision = True
    tokens, labels = batch(ps.get_data_parallel_rank())
    out = {"layers": len(model.moe_layers)}
    with count_every_host_copy():
        for mode, host in (("host", tokens), ("device", None)):
            model.start_moe_step(0)  # the same token-shuffle permutations in both forwards (compared bitwise)
            model.zero_grad(set_to_none=True)
            before = device_to_host_copies()
            losses = model(tokens, positions(), None, labels=labels, host_token_ids=host)
            out[mode + "_copies"] = device_to_host_copies() - before
            decisions = [layer.last_decision for layer in model.moe_layers]
            out[mode + "_host_counts"] = [
                None if d.host_tokens_per_expert is None
                else torch.equal(d.host_tokens_per_expert,  # the kept pairs (id N: dropped by the capacity)
                                 torch.bincount(d.expert_index, minlength=EXPERTS + 1)[:EXPERTS])
                for d in decisions]
            losses.mean().backward()
            out[mode + "_losses"] = losses.detach()
            out[mode + "_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["loss_diff"] = (out["host_losses"] - out["device_losses"]).abs().max().item()
    out["grad_diff"] = max((out["host_grads"][n] - g).abs().max().item() for n, g in out["device_grads"].items())
    out["same_grad_keys"] = sorted(out["host_grads"]) == sorted(out["device_grads"])
    del out["host_grads"], out["device_grads"]
    return out


@pytest.mark.parametrize("name", sorted(HOST_ID_CASES))
@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2)], ids=["ep1", "ep2"])
def test_token_id_routing_with_host_ids_makes_no_device_to_host_copy(name, world, ep):
    case = HOST_ID_CASES[name]
    stage_two = case["router"] != "hash"
    # with several data-parallel ranks, the kept tokens of StableMoE's default capacity (counted over
    # all of them) and the rows the token shuffle brings from other ranks are known on the device only
    device_counts = world > 1 and (capacity_in_training(case) or case.get("token_shuffle", True))
    for res in run_distributed(_host_token_ids_run, world_size=world, ep=ep, args=(case, stage_two)):
        if device_counts:
            assert res["host_copies"] == res["layers"] and res["host_host_counts"] == [None] * res["layers"], res
        else:
            assert res["host_copies"] == 0, res
            assert all(res["host_host_counts"]), res  # the counts came from the host, and are right
        assert res["loss_diff"] == 0.0 and res["grad_diff"] == 0.0 and res["same_grad_keys"], res
        # without the host ids the same routing needs the counts from the device
        assert res["device_host_counts"] == [None] * res["layers"], res
        if ep == 1:
            assert res["device_copies"] == res["layers"], res
        else:
            assert res["device_copies"] >= res["layers"], res


@pytest.mark.parametrize("case", [dict(router="stablemoe"), dict(router="switch", layout="megatron"),
                                  dict(router="expert-choice", layout="megatron")],
                         ids=["stablemoe-stage1-paper", "switch-megatron", "expert-choice-megatron"])
def test_learned_routing_copies_counts_once_per_layer_call(case):
    res = run_distributed(_host_token_ids_run, world_size=1, args=(case, False))[0]
    # host ids do not help a router whose choice depends on the hidden states: one copy per call
    assert res["layers"] >= 1
    assert res["host_copies"] == res["layers"] and res["device_copies"] == res["layers"], res
    assert res["loss_diff"] == 0.0 and res["grad_diff"] == 0.0, res


# ----------------------------------------------------------------------------------------------
# 4. capacity dropping: tokens over capacity get zero MoE output (their residual only)
# ----------------------------------------------------------------------------------------------
def expected_kept(hidden, weight, router, capacity_factor):
    """Independent capacity rule: per expert keep the ceil(T*c/N) highest-gate tokens (ties: earlier)."""
    scores = hidden.float() @ weight.t()
    if router == "switch":
        scores = torch.softmax(scores, -1)
    experts = scores.argmax(-1)
    gates = scores.gather(1, experts[:, None]).squeeze(1)
    if router == "stablemoe":
        gates = torch.sigmoid(gates)
    capacity = math.ceil(hidden.shape[0] * capacity_factor / EXPERTS)
    kept = torch.zeros(hidden.shape[0], dtype=torch.bool)
    for expert in range(EXPERTS):
        rows = sorted((t for t in range(hidden.shape[0]) if experts[t] == expert),
                      key=lambda t: (-gates[t].item(), t))
        kept[rows[:capacity]] = True
    return kept


def _capacity_dropping(case, capacity_factor):
    reset_aux_scale()
    # a dropped token is recognised by its zero MoE output: experts with non-zero (normal) fc2;
    # the reference keeps every token (c = N; StableMoE's default capacity is 2)
    dropping = build(capacity=capacity_factor, expert_output_init="normal", **case)
    full = build(capacity=float(EXPERTS), expert_output_init="normal", **case)
    assert load_global_tensors(full, global_tensors(dropping)) > 0
    tokens, _ = batch(0)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    layer, reference = dropping.moe_layers[0], full.moe_layers[0]
    out = {}
    for mode in ("train", "eval"):
        for model in (dropping, full):
            model.train(mode == "train")
            for moe_layer in model.moe_layers:
                moe_layer.metrics.reset()
                moe_layer.set_token_ids(tokens)
        got = layer(hidden)[0].reshape(-1, HIDDEN)
        want = reference(hidden)[0].reshape(-1, HIDDEN)
        zero_rows = (got == 0).all(-1)
        kept = expected_kept(hidden.reshape(-1, HIDDEN), layer.router.weight, case["router"], capacity_factor)
        out[mode] = dict(
            num_dropped=int(zero_rows.sum()),
            zero_rows_are_dropped=torch.equal(zero_rows, ~kept) if mode == "train" else None,
            expected_dropped=int((~kept).sum()),
            kept_diff=(got[~zero_rows] - want[~zero_rows]).abs().max().item(),
            dropped_rows_nonzero_without_capacity=bool((want[zero_rows] != 0).any(-1).all()),
            dropped_fraction=layer.metrics.snapshot().get("dropped_fraction"),
        )
        if case.get("layout", "paper") == "paper":
            # the block adds the MoE output to the residual stream: a dropped token passes unchanged
            block = next(m for m in dropping.modules() if hasattr(m, "moe_block"))
            passed = block._moe(hidden).reshape(-1, HIDDEN)
            out[mode]["dropped_rows_are_residual"] = torch.equal(passed[zero_rows], hidden.reshape(-1, HIDDEN)[zero_rows])
    return out


@pytest.mark.parametrize("case", [dict(router="stablemoe"), dict(router="switch", layout="megatron")],
                         ids=["stablemoe-paper", "switch-megatron"])
def test_capacity_dropping_zeroes_overflow_tokens_only(case):
    train, evaluation = run_distributed(_capacity_dropping, world_size=1, args=(case, 0.75))[0].values()
    tokens = SEQ * BATCH
    assert 0 < train["num_dropped"] < tokens, train
    assert train["num_dropped"] == train["expected_dropped"] and train["zero_rows_are_dropped"], train
    assert train["kept_diff"] <= 1e-6, train  # kept tokens: exactly what the no-drop layer gives
    assert train["dropped_rows_nonzero_without_capacity"], train
    assert abs(train["dropped_fraction"].item() - train["num_dropped"] / tokens) <= 1e-6, train
    if "dropped_rows_are_residual" in train:
        assert train["dropped_rows_are_residual"], train
    # no dropping at evaluation: every token gets its expert, as without a capacity
    assert evaluation["num_dropped"] == 0 and evaluation["kept_diff"] <= 1e-6, evaluation
    assert evaluation["dropped_fraction"] is None, evaluation


def _capacity_reference(case, num_batches):
    from moe_cases import forward_backward_together

    reset_aux_scale()
    model = build(**case)
    weights = global_tensors(model)
    losses = forward_backward_together(model, num_batches)  # the DP ranks' batches as one micro-batch
    dropped = [m["dropped_fraction"].item() for m in model.moe_metrics().values()]
    return weights, losses, global_tensors(model, grads=True), dropped


def _capacity_parallel(case, weights, ref_losses, ref_grads):
    from megatron.core import parallel_state as ps

    from moe_cases import reduce_grads_like_megatron
    from distributed import max_abs_diff_to_global

    reset_aux_scale()
    model = build(**case)
    load_global_tensors(model, weights)
    dp_rank = ps.get_data_parallel_rank()
    tokens, labels = batch(dp_rank)
    losses = model(tokens, positions(), None, labels=labels)
    losses.mean().backward()
    reduce_grads_like_megatron(model)
    grad_diff, _ = max_abs_diff_to_global(model, ref_grads, grads=True)
    return (losses.detach() - ref_losses[dp_rank]).abs().max().item(), grad_diff


@pytest.mark.parametrize("world,tp,ep", [(2, 1, 2), (2, 2, 1)], ids=["ep2", "tp2sp"])
def test_capacity_dropping_is_independent_of_the_parallel_layout(world, tp, ep):
    """The capacity is counted over every data-parallel rank's micro-batch (the default scope), all
    sequence-parallel shards of it: TP=2 + SP and EP=2 (two DP ranks) drop exactly the tokens a
    single process drops from the same tokens in one micro-batch."""
    case = dict(router="stablemoe", capacity=0.75)
    dp = world // tp
    weights, ref_losses, ref_grads, dropped = run_distributed(_capacity_reference, world_size=1, args=(case, dp))[0]
    assert all(d > 0.05 for d in dropped), dropped  # really dropping
    for loss_diff, grad_diff in run_distributed(_capacity_parallel, world_size=world, tp=tp, ep=ep,
                                                args=(case, weights, ref_losses, ref_grads)):
        assert loss_diff <= 1e-5 and grad_diff <= 1e-5, (loss_diff, grad_diff)


# ----------------------------------------------------------------------------------------------
# 5. Expert Choice: causal threshold routing at evaluation; thresholds identical on every rank
# ----------------------------------------------------------------------------------------------
ROUTER_SCALE = 30.0


def expected_kth(inputs, weight, capacity_factor=2.0):
    """The k-th largest router probability of each expert over the call's tokens (docs/ALGORITHMS.md §4)."""
    probs = torch.softmax(inputs.hidden.detach().float() @ weight.detach().t(), dim=-1)
    k = max(1, min(probs.shape[0], math.floor(probs.shape[0] * capacity_factor / EXPERTS + 0.5)))
    return probs.sort(dim=0, descending=True).values[k - 1]


def _expert_choice_causality(cut_positions):
    reset_aux_scale()
    momentum = 0.9
    # experts with non-zero (normal) fc2: the routing shows in the logits
    model = build(router="expert-choice", expert_choice_threshold_momentum=momentum, expert_output_init="normal")
    calls = capture_router_calls(model)
    router = model.moe_layers[0].router
    with torch.no_grad():
        router.weight.mul_(ROUTER_SCALE)  # a decided router (at init all probabilities are ~1/N)
    expected = None
    for step in range(2):  # two optimizer steps of two micro-batches each
        kth = []
        for micro in range(2):
            tokens, labels = batch(10 * step + micro)
            model(tokens, positions(), None, labels=labels).mean().backward()
            kth.append(expected_kth(calls[model.moe_layers[0].layer_number][-1][0], router.weight))
        mean_kth = torch.stack(kth).mean(0)
        expected = mean_kth if expected is None else momentum * expected + (1 - momentum) * mean_kth
        model.finalize_moe_step()
    out = {"threshold_diff": (router.thresholds - expected).abs().max().item(),
           "initialized": bool(router.thresholds_initialized)}

    tokens, _ = batch(3)
    gen = torch.Generator().manual_seed(5)
    changes = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with torch.no_grad():
            base = model(tokens, positions(), None)
            worst = []
            for cut in cut_positions:  # change every token after position `cut`
                changed = tokens.clone()
                changed[:, cut + 1:] = torch.randint(0, VOCAB, changed[:, cut + 1:].shape, generator=gen)
                logits = model(changed, positions(), None)
                assert logits.shape == (BATCH, SEQ, VOCAB)
                worst.append(((logits - base)[:, :cut + 1].abs().max().item(),
                              (logits - base)[:, cut + 1:].abs().max().item()))
        changes[mode] = worst
    out["changes"] = changes
    model.eval()
    with torch.no_grad():
        model(tokens, positions(), None)
    routed = torch.bincount(calls[model.moe_layers[0].layer_number][-1][1].token_index, minlength=SEQ * BATCH)
    out["experts_per_token"] = sorted(set(routed.tolist()))
    return out


def test_expert_choice_evaluation_routing_is_causal():
    res = run_distributed(_expert_choice_causality, world_size=1, args=([3, 7, 11],))[0]
    assert res["initialized"] and res["threshold_diff"] <= 1e-6, res
    assert len(res["experts_per_token"]) > 1, res  # the thresholds really select (0, 1, 2 ... experts)
    for past, future in res["changes"]["eval"]:
        assert past == 0.0, res  # positions <= cut never see the changed future
        assert future > 1e-3, res  # (the change itself is visible where it happened)
    # training routing (each expert's top-k over the whole batch) looks ahead
    assert max(past for past, _ in res["changes"]["train"]) > 1e-4, res


def _expert_choice_thresholds_over_dp():
    from megatron.core import parallel_state as ps

    reset_aux_scale()
    model = build(router="expert-choice")
    calls = capture_router_calls(model)
    router = model.moe_layers[0].router
    with torch.no_grad():
        router.weight.mul_(ROUTER_SCALE)
        torch.distributed.broadcast(router.weight, src=0)  # same weights everywhere, as after DDP init
    rank = ps.get_data_parallel_rank()
    tokens, labels = batch(rank)
    model(tokens, positions(), None, labels=labels).mean().backward()
    local = expected_kth(calls[model.moe_layers[0].layer_number][0][0], router.weight)
    everyone = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, local)
    model.finalize_moe_step(ps.get_data_parallel_group())
    return router.thresholds.clone(), local, torch.stack(everyone).mean(0)


def test_expert_choice_thresholds_equal_on_all_ranks():
    (t0, local0, mean0), (t1, local1, mean1) = run_distributed(_expert_choice_thresholds_over_dp, world_size=2)
    assert (local0 - local1).abs().max() > 1e-3  # the ranks saw different batches
    assert torch.equal(t0, t1)
    assert (t0 - mean0).abs().max() <= 1e-6


# ----------------------------------------------------------------------------------------------
# 6. the stage switch: frozen distilled router routes by token id, the gate keeps learning
# ----------------------------------------------------------------------------------------------
REPEATED_IDS = (5, 17, 42)


def repeated_id_batch():
    """A batch in which a few ids occur many times, each time in a different context."""
    tokens, labels = batch(4)
    gen = torch.Generator().manual_seed(11)
    for row in range(BATCH):
        where = torch.randperm(SEQ, generator=gen)[:6]
        for j, pos in enumerate(where.tolist()):
            tokens[row, pos] = REPEATED_IDS[j % len(REPEATED_IDS)]
    return tokens, labels


def _stage_switch_token_id_router(layout):
    reset_aux_scale()
    # c = N keeps every token (the frozen table need not be balanced; StableMoE's default capacity is 2);
    # non-zero (normal) fc2: with the default zero one the expert outputs, hence the gate's gradient, are 0
    model = build(router="stablemoe", layout=layout, distill="wordemb", capacity=float(EXPERTS),
                  expert_output_init="normal")
    calls = capture_router_calls(model)
    tokens, labels = repeated_id_batch()
    out = {"stage_before": model.stage,
           "distilled_trainable_before": all(p.requires_grad for r in model.distilled_routers()
                                             for p in r.distilled.parameters())}
    # stage 1: the same id is routed by its hidden state
    model(tokens, positions(), None, labels=labels)
    # the ids of the rows each router saw (the token shuffle permutes them)
    out["stage1_experts_per_id"] = {
        n: [len(set(c[0][1].expert_index[c[0][0].token_ids == i].tolist())) for i in REPEATED_IDS]
        for n, c in calls.items()}
    model.moe_metrics()

    model.enter_stage_two()
    out["stage_after"] = model.stage
    out["distilled_frozen"] = all(not p.requires_grad for r in model.distilled_routers()
                                  for p in r.distilled.parameters())
    for c in calls.values():
        c.clear()
    model.zero_grad(set_to_none=True)
    model(tokens, positions(), None, labels=labels).mean().backward()
    metrics = model.moe_metrics()
    per_layer = {}
    for layer in model.moe_layers:
        (inputs, decision), = calls[layer.layer_number]
        ids = inputs.token_ids
        router = layer.router
        table = (router.distilled.embedding.weight @ router.distilled.centroids.t()).argmax(-1)
        scores = inputs.hidden.detach().float() @ router.weight.detach().t()
        gates = torch.sigmoid(scores.gather(1, decision.expert_index[:, None]).squeeze(1))
        per_layer[layer.layer_number] = dict(
            ids_are_the_batch=torch.equal(ids.sort().values, seq_major(tokens).sort().values),
            experts_are_table_of_ids=torch.equal(decision.expert_index, table[ids]),
            token_index_is_identity=torch.equal(decision.token_index, torch.arange(ids.numel())),
            experts_per_id=[len(set(decision.expert_index[ids == i].tolist())) for i in REPEATED_IDS],
            gate_diff=(decision.gates.detach() - gates).abs().max().item(),
            gate_spread_per_id=[decision.gates[ids == i].detach().std().item() for i in REPEATED_IDS],
            aux_loss=decision.aux_loss.item(),
            aux_requires_grad=decision.aux_loss.requires_grad,
            metric_names=sorted(metrics[layer.layer_number]),
            centroid_grad=router.weight.grad.norm().item(),
            distilled_grads=[p.grad for p in router.distilled.parameters()],
        )
    out["layers"] = per_layer
    return out


@pytest.mark.parametrize("layout", ["paper", "megatron"])
def test_stage_two_routes_by_token_id_and_keeps_learning_the_gate(layout):
    res = run_distributed(_stage_switch_token_id_router, world_size=1, args=(layout,))[0]
    assert res["stage_before"] == 1 and res["distilled_trainable_before"]
    assert res["stage_after"] == 2 and res["distilled_frozen"]
    # in stage 1 at least one repeated id goes to different experts in different contexts
    assert any(n > 1 for counts in res["stage1_experts_per_id"].values() for n in counts), res
    assert len(res["layers"]) == (2 if layout == "megatron" else 1)
    for number, lay in res["layers"].items():
        assert lay["ids_are_the_batch"] and lay["experts_are_table_of_ids"] and lay["token_index_is_identity"], number
        assert lay["experts_per_id"] == [1] * len(REPEATED_IDS), lay
        assert lay["gate_diff"] <= 1e-6, lay  # gate = sigmoid of the backbone score E_a . h
        assert min(lay["gate_spread_per_id"]) > 1e-4, lay  # ... which depends on the context
        assert lay["centroid_grad"] > 0, lay  # E keeps learning through the gate
        assert lay["distilled_grads"] == [None] * len(lay["distilled_grads"]), lay
        assert lay["aux_loss"] == 0.0 and not lay["aux_requires_grad"], lay
        assert not {"balance_loss", "distill_loss", "distill_agreement"} & set(lay["metric_names"]), lay


def _stage_switch_context_router(distill, cut):
    reset_aux_scale()
    model = build(router="stablemoe", distill=distill)
    model.enter_stage_two()
    calls = capture_router_calls(model)
    layer = model.moe_layers[0]
    distilled = layer.router.distilled
    tokens, labels = repeated_id_batch()
    changed = tokens.clone()
    changed[:, cut + 1:] = (changed[:, cut + 1:] + 1) % VOCAB
    experts = []
    for toks in (tokens, changed):
        model(toks, positions(), None, labels=labels).mean().backward()
        (inputs, decision), = calls[layer.layer_number][-1:]
        expected = seq_major(distilled.scores(toks).detach().argmax(-1))  # argmax of [B, S, N] scores
        experts.append((decision.expert_index, expected))
    got, want = experts[0]
    scores = distilled.scores(tokens).detach()  # [B, S, N]
    ids_scores = [scores[tokens == i] for i in REPEATED_IDS]
    (got_changed, want_changed) = experts[1]
    first = (cut + 1) * BATCH  # seq-major rows of positions <= cut
    return dict(
        stage=model.stage,
        frozen=all(not p.requires_grad for p in distilled.parameters()),
        distilled_grads=[p.grad for p in distilled.parameters()],
        routes_by_distilled_scores=torch.equal(got, want) and torch.equal(got_changed, want_changed),
        context_spread=min((s - s[0]).abs().max().item() for s in ids_scores),
        past_unchanged=torch.equal(got[:first], got_changed[:first]),
        future_changed=not torch.equal(got[first:], got_changed[first:]),
    )


@pytest.mark.parametrize("distill", ["cnn", "transformer"])
def test_stage_two_context_routers_route_by_distilled_assignment_causally(distill):
    res = run_distributed(_stage_switch_context_router, world_size=1, args=(distill, 7))[0]
    assert res["stage"] == 2 and res["frozen"], res
    assert res["distilled_grads"] == [None] * len(res["distilled_grads"]), res
    assert res["routes_by_distilled_scores"], res
    assert res["context_spread"] > 1e-6, res  # the same id scores differently in other contexts
    assert res["past_unchanged"] and res["future_changed"], res
