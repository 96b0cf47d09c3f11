"""The options that reproduce the authors' released code (docs/RECIPE.md rows 4a, 4b, 4c, 5b):
--moe-expert-output-init zero, --moe-centroid-init orthogonal (+ gain), --moe-distill-embedding-init
unit, --moe-distill-teacher greedy. Each is checked against an independent expectation, and each
must leave every other weight (and the default path) as it was.

Functions run by ``run_distributed`` are module-level so the worker processes can import them.
"""
import pytest
import torch

from moe_cases import BATCH, EXPERTS, SEQ, VOCAB, batch, positions
from distributed import global_tensors, run_distributed

HIDDEN = 32


# ----------------------------------------------------------------------------------------------
# helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------
def build(router="stablemoe", layout="paper", distill=None, sublayers=2, **moe_options):
    """A 4-layer GPT with one paper-layout MoE block (or Megatron-layout MoE MLPs every 2 layers)."""
    import moe_cases

    return moe_cases.build(router, layout, sublayers=sublayers, distill=distill, moe_options=moe_options)


def built_with_seed(seed, **kwargs):
    """``build(**kwargs)`` from a fresh main RNG stream (the model's initial weights)."""
    torch.manual_seed(seed)
    return build(**kwargs)


def fc2_params(model):
    """{name: parameter} of every expert output projection (linear_fc2) of every MoE layer."""
    return {name: p for name, p in model.named_parameters() if ".experts.sublayers." in name and "linear_fc2" in name}


def changed_keys(a, b):
    """Global tensor keys whose values differ between two {key: tensor} dicts (same keys)."""
    assert a.keys() == b.keys()
    return sorted(key for key in a if not torch.equal(a[key], b[key]))


# ----------------------------------------------------------------------------------------------
# 4a: --moe-expert-output-init zero
# ----------------------------------------------------------------------------------------------
def _zero_output_case(router, layout):
    """Per MoE layer: its output on random inputs, the paper block's output, fc2 grads, changed keys."""
    from stablemoe_megatron.moe.block import TransformerLayerWithMoEBlock

    model = built_with_seed(11, router=router, layout=layout, expert_output_init="zero")
    reference = built_with_seed(11, router=router, layout=layout, expert_output_init="normal")  # the other init
    changed = changed_keys(global_tensors(reference), global_tensors(model))
    gen = torch.Generator().manual_seed(5)
    block_identity = []
    layer_outputs_zero = []
    for layer in model.moe_layers:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
        layer.set_token_ids(tokens)
        out, _ = layer(hidden)
        layer_outputs_zero.append(torch.equal(out, torch.zeros_like(out)))
    for module in model.modules():
        if isinstance(module, TransformerLayerWithMoEBlock):
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
            hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
            module.moe_block.set_token_ids(tokens)
            block_identity.append(torch.equal(module._moe(hidden), hidden))
    tokens, labels = batch(0)
    model.zero_grad()
    model(tokens, positions(), None, labels=labels).mean().backward()
    fc2 = fc2_params(model)
    fc2_grads = {name: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for name, p in fc2.items()}
    fc2_zero = all(torch.equal(p.detach(), torch.zeros_like(p)) for p in fc2.values())
    ref_fc2_nonzero = all(float(p.detach().abs().sum()) > 0 for p in fc2_params(reference).values())
    return dict(layer_outputs_zero=layer_outputs_zero, block_identity=block_identity, fc2_grads=fc2_grads,
                fc2_zero=fc2_zero, ref_fc2_nonzero=ref_fc2_nonzero, changed=changed)


@pytest.mark.parametrize("layout", ["paper", "megatron"])
@pytest.mark.parametrize("router", ["stablemoe", "switch", "hash"])
def test_zero_expert_output_makes_every_moe_block_the_identity(router, layout):
    r = run_distributed(_zero_output_case, 1, args=(router, layout))[0]
    assert r["layer_outputs_zero"] and all(r["layer_outputs_zero"]), r
    if layout == "paper":  # the block h + g * (z_K - h) returns its input exactly
        assert r["block_identity"] and all(r["block_identity"]), r
    else:
        assert not r["block_identity"]
    assert r["fc2_zero"] and r["ref_fc2_nonzero"]
    # one backward: every expert's output projection gets a gradient
    assert r["fc2_grads"] and all(g > 0 for g in r["fc2_grads"].values()), r["fc2_grads"]
    # only the fc2 weights differ from the default initialisation
    assert r["changed"] and all("linear_fc2" in key for key in r["changed"]), r["changed"]


# ----------------------------------------------------------------------------------------------
# 4b: --moe-centroid-init orthogonal, --moe-centroid-init-gain
# ----------------------------------------------------------------------------------------------
def _router_weights(router, distill, **options):
    """(router weights [N, d] per MoE layer, distilled centroids, all global weights) from seed 3."""
    model = built_with_seed(3, router=router, distill=distill, **options)
    weights = [layer.router.weight.detach().clone() for layer in model.moe_layers]
    distilled = [r.distilled.centroids.detach().clone() for r in model.distilled_routers()]
    return weights, distilled, global_tensors(model)


def _assert_orthogonal_rows(weight, gain):
    rows = weight.shape[0]
    assert rows <= weight.shape[1]
    torch.testing.assert_close(weight @ weight.t(), gain ** 2 * torch.eye(rows), atol=1e-6, rtol=0)


@pytest.mark.parametrize("router,distill", [("stablemoe", "wordemb"), ("base", "cnn"), ("switch", None),
                                            ("expert-choice", None)])
def test_orthogonal_centroids_have_orthogonal_rows_of_norm_gain(router, distill):
    gain = 0.1 if router != "switch" else 0.5
    weights, distilled, full = run_distributed(
        _router_weights, 1, args=(router, distill), kwargs=dict(centroid_init="orthogonal", centroid_init_gain=gain))[0]
    _, _, reference = run_distributed(_router_weights, 1, args=(router, distill),
                                      kwargs=dict(centroid_init="normal"))[0]  # the other init
    assert weights and len(distilled) == (1 if distill else 0)
    for weight in weights + distilled:
        _assert_orthogonal_rows(weight, gain)
    # the orthogonal init draws as many numbers as the normal one: every other weight is unchanged
    changed = changed_keys(reference, full)
    assert changed and all("router" in key for key in changed), changed


def test_orthogonal_centroids_do_not_depend_on_the_expert_parallel_size():
    options = dict(centroid_init="orthogonal", centroid_init_gain=0.1)
    ref_weights, ref_distilled, _ = run_distributed(_router_weights, 1, args=("stablemoe", "wordemb"),
                                                    kwargs=options)[0]
    for weights, distilled, _ in run_distributed(_router_weights, 2, ep=2, args=("stablemoe", "wordemb"),
                                                 kwargs=options):
        assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))
        assert all(torch.equal(a, b) for a, b in zip(distilled, ref_distilled))


def test_distilled_router_orthogonal_centroids_standalone():
    from stablemoe_megatron.routing.distilled import build_distilled_router

    for kind in ("wordemb", "cnn", "transformer"):
        torch.manual_seed(0)
        router = build_distilled_router(kind, 100, 8, 50, centroid_init="orthogonal", centroid_gain=0.1)
        _assert_orthogonal_rows(router.centroids.detach(), 0.1)
    with pytest.raises(ValueError):
        build_distilled_router("wordemb", 100, 8, 50, centroid_init="uniform")


# ----------------------------------------------------------------------------------------------
# 4c: --moe-distill-embedding-init unit
# ----------------------------------------------------------------------------------------------
def test_unit_distilled_embedding_and_unchanged_default():
    from stablemoe_megatron.routing.distilled import INIT_STD, build_distilled_router

    vocab, experts, dim = 50000, 8, 50
    torch.manual_seed(1)
    unit = build_distilled_router("wordemb", vocab, experts, dim, embedding_init="unit")
    assert abs(float(unit.embedding.weight.detach().std()) - 1.0) < 0.01
    assert abs(float(unit.embedding.weight.detach().mean())) < 0.01
    # the default: exactly the draws it always made (nn.Embedding's own init, then N(0, 0.02) twice)
    torch.manual_seed(1)
    default = build_distilled_router("wordemb", vocab, experts, dim)
    torch.manual_seed(1)
    embedding = torch.nn.Embedding(vocab, dim)
    centroids = torch.empty(experts, dim)
    torch.nn.init.normal_(embedding.weight, mean=0.0, std=INIT_STD)
    torch.nn.init.normal_(centroids, mean=0.0, std=INIT_STD)
    assert torch.equal(default.embedding.weight, embedding.weight)
    assert torch.equal(default.centroids, centroids)
    # the unit init changes only the embedding's scale: same draws, same centroids
    assert torch.equal(unit.centroids, default.centroids)
    torch.testing.assert_close(unit.embedding.weight * INIT_STD, default.embedding.weight)


def _distilled_embedding_std(**options):
    model = built_with_seed(4, router="stablemoe", **options)
    return [float(r.distilled.embedding.weight.std()) for r in model.distilled_routers()]


def test_unit_distilled_embedding_reaches_the_model():
    unit = run_distributed(_distilled_embedding_std, 1)[0]  # the default
    normal = run_distributed(_distilled_embedding_std, 1, kwargs=dict(distill_embedding_init="normal"))[0]
    assert unit and all(abs(s - 1.0) < 0.05 for s in unit), unit
    assert normal and all(abs(s - 0.02) < 0.002 for s in normal), normal


# ----------------------------------------------------------------------------------------------
# 5b: --moe-distill-teacher greedy
# ----------------------------------------------------------------------------------------------
def _teacher_case(teacher):
    """Call a BASE router (training mode) on random inputs; return what the expectations need."""
    from stablemoe_megatron.moe.router_base import RouterInputs

    model = built_with_seed(6, router="base", distill="wordemb", distill_teacher=teacher)
    model.train()
    router = model.moe_layers[0].router
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    hidden = torch.randn(SEQ * BATCH, HIDDEN, generator=gen)
    token_ids = tokens.t().reshape(-1)  # sequence-major, as the layer flattens [S, B]
    decision = router(RouterInputs(hidden, token_ids, tokens, slice(0, SEQ)))
    return dict(hidden=hidden, weight=router.weight.detach().clone(),
                student=router.distilled.scores(token_ids.unsqueeze(0)).squeeze(0).detach(),
                assigned=decision.expert_index, teacher=decision.top1_expert_ids,
                distill_loss=decision.metrics["distill_loss"], coeff=router.moe.distill_loss_coeff)


@pytest.mark.parametrize("teacher", ["assignment", "greedy"])
def test_greedy_teacher_distils_the_argmax_under_base(teacher):
    r = run_distributed(_teacher_case, 1, args=(teacher,))[0]
    greedy = (r["hidden"] @ r["weight"].t()).argmax(-1)
    # a case where BASE's balanced assignment is not the greedy choice
    assert not torch.equal(r["assigned"], greedy)
    assert torch.bincount(r["assigned"], minlength=EXPERTS).tolist() == [SEQ * BATCH // EXPERTS] * EXPERTS
    target = greedy if teacher == "greedy" else r["assigned"]
    assert torch.equal(r["teacher"], target)
    expected = r["coeff"] * torch.nn.functional.cross_entropy(r["student"], target)
    torch.testing.assert_close(r["distill_loss"], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# configuration and command line
# ----------------------------------------------------------------------------------------------
def test_flags_defaults_and_validation():
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.moe.config import MoEConfig

    defaults = parse_config(["--num-experts", "4"]).moe  # the authors' (docs/RECIPE.md)
    assert (defaults.expert_output_init, defaults.centroid_init, defaults.centroid_init_gain,
            defaults.distill_embedding_init, defaults.distill_teacher) == ("zero", "orthogonal", 0.1, "unit", "greedy")
    other = parse_config(["--num-experts", "4", "--moe-router", "base", "--moe-distill-router", "wordemb",
                          "--moe-expert-output-init", "normal", "--moe-centroid-init", "normal",
                          "--moe-centroid-init-gain", "0.2", "--moe-distill-embedding-init", "normal",
                          "--moe-distill-teacher", "assignment"]).moe
    assert (other.expert_output_init, other.centroid_init, other.centroid_init_gain,
            other.distill_embedding_init, other.distill_teacher) == ("normal", "normal", 0.2, "normal", "assignment")
    # without a distilled router (switch has none by default) the distillation options have no effect: any value
    for field, value in (("distill_teacher", "assignment"), ("distill_embedding_init", "normal"),
                         ("distill_teacher", "greedy"), ("eval_routing", "backbone")):
        MoEConfig(num_experts=4, router="switch", **{field: value}).validate(num_layers=2)
    MoEConfig(num_experts=4, router="hash", centroid_init="normal", expert_output_init="normal").validate(2)
    with pytest.raises(ConfigError, match="gain"):
        MoEConfig(num_experts=4, centroid_init_gain=0.0).validate(num_layers=2)
    with pytest.raises(ConfigError, match="expert-output-init"):
        MoEConfig(num_experts=4, expert_output_init="ones").validate(num_layers=2)
