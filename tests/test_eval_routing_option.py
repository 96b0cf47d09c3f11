"""--moe-eval-routing distilled (docs/RECIPE.md row 2, the authors' code): outside training, a stage-1
model routes with its distilled token-id router; in training it still routes with the backbone; the
export of such a checkpoint routes the same way."""
import pytest
import torch

from distributed import run_distributed
from moe_cases import BATCH, SEQ, VOCAB
from test_recipe_options import HIDDEN, built_with_seed


def _routes(eval_routing, router):
    """Experts chosen in training and in evaluation mode for the same random inputs (stage 1)."""
    from stablemoe_megatron.moe.router_base import RouterInputs

    model = built_with_seed(3, router=router, distill="wordemb", eval_routing=eval_routing)
    layer_router = model.moe_layers[0].router
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    hidden = torch.randn(SEQ * BATCH, HIDDEN, generator=gen)
    token_ids = tokens.t().reshape(-1)  # sequence-major, as the layer flattens [S, B]
    out = {"stage": layer_router.stage}
    for mode in ("train", "eval"):
        layer_router.train(mode == "train")
        out[mode] = layer_router(RouterInputs(hidden, token_ids, tokens, slice(0, SEQ))).expert_index
    out["backbone"] = (hidden @ layer_router.weight.detach().t()).argmax(-1)
    out["distilled"] = layer_router.distilled.scores(token_ids.unsqueeze(0)).squeeze(0).argmax(-1)
    return out


@pytest.mark.parametrize("router", ["stablemoe", "switch"])
@pytest.mark.parametrize("eval_routing", ["backbone", "distilled"])
def test_evaluation_routes_with_the_chosen_router_in_stage_1(eval_routing, router):
    r = run_distributed(_routes, 1, args=(eval_routing, router))[0]
    assert r["stage"] == 1
    assert not torch.equal(r["backbone"], r["distilled"])  # the case tells the two apart
    assert torch.equal(r["train"], r["backbone"])  # training always routes with the backbone
    assert torch.equal(r["eval"], r[eval_routing])


def test_export_of_a_stage_1_checkpoint_routes_like_its_evaluation():
    from stablemoe_megatron.config import RunConfig
    from stablemoe_megatron.export.exporter import routing_stage

    config = RunConfig()
    config.moe.num_experts, config.moe.router = 4, "stablemoe"
    assert config.moe.eval_routing == "distilled"  # the default
    assert routing_stage(config, saved_stage=1, requested=None) == 2
    config.moe.eval_routing = "backbone"
    assert routing_stage(config, saved_stage=1, requested=None) == 1
    config.moe.eval_routing = "distilled"
    assert routing_stage(config, saved_stage=2, requested=None) == 2


def test_without_a_distilled_router_either_value_is_accepted_and_has_no_effect():
    from stablemoe_megatron.cli_args import parse_config

    sizes = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
             "--train-iters", "10"]
    for value in ("backbone", "distilled"):
        config = parse_config([*sizes, "--num-experts", "4", "--moe-router", "hash", "--moe-eval-routing", value,
                               "--data-path", "x"])
        config.validate(1)
        assert not config.moe.routes_distilled_in_evaluation
    assert parse_config(["--num-experts", "4"]).moe.eval_routing == "distilled"
    parse_config([*sizes, "--num-experts", "4", "--moe-router", "hash", "--data-path", "x"]).validate(1)
