"""The defaults are the authors' run (docs/RECIPE.md "Defaults: the authors' run"; README "Defaults
are the authors' run"): MoEConfig's values, the capacity factor and the token shuffle each router
resolves to, the check that the shuffle can split a rank's tokens evenly over the data-parallel
ranks, and --no-moe-token-shuffle in --help. (A resumed run with the shuffle on repeats the
uninterrupted one: test_trainer_resume.py.)"""
import pytest

from stablemoe_megatron.cli_args import build_parser, parse_config
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.moe.config import MoEConfig
from stablemoe_megatron.routing import get_routing


def test_moe_defaults_are_the_authors_run():
    moe = MoEConfig()
    assert (moe.distill_loss_coeff, moe.distill_teacher, moe.eval_routing) == (0.3, "greedy", "distilled")
    assert (moe.distill_embedding_init, moe.expert_output_init, moe.centroid_init, moe.centroid_init_gain) == (
        "unit", "zero", "orthogonal", 0.1)
    assert (moe.token_shuffle, moe.balance_count_scope, moe.expert_capacity_factor) == (None, "data-parallel", None)
    assert (moe.balance_loss_coeff, moe.router) == (0.3, "stablemoe")
    assert parse_config([]).moe == moe  # the command line's defaults are the same
    # the Megatron-LM flags keep Megatron's defaults; configs/*.yaml set the authors' ReLU and no decay
    config = RunConfig()
    assert (config.model.activation, config.optimizer.weight_decay) == ("gelu", 0.01)


# Megatron-LM requires the size flags and the run length: the tiny ones these checks use
SIZES = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
         "--train-iters", "10"]

@pytest.mark.parametrize("router,capacity", [("stablemoe", 2.0), ("expert-choice", 2.0), ("switch", None),
                                             ("base", None), ("hash", None)])
def test_capacity_factor_is_the_routers_default_unless_given(router, capacity):
    assert get_routing(router).default_capacity_factor == capacity
    assert MoEConfig(num_experts=4, router=router).effective_capacity_factor == capacity
    assert parse_config(["--num-experts", "4", "--moe-router", router]).moe.effective_capacity_factor == capacity
    given = parse_config(["--num-experts", "4", "--moe-router", router, "--moe-expert-capacity-factor", "1.5"]).moe
    assert given.effective_capacity_factor == 1.5


@pytest.mark.parametrize("flags,shuffles", [
    ([], True),
    (["--moe-distill-router", "wordemb"], True),
    (["--moe-router", "switch"], True),
    (["--moe-router", "base"], True),
    (["--moe-router", "hash"], True),
    (["--moe-router", "expert-choice"], True),
    (["--moe-distill-router", "cnn"], False),  # reads whole sequences, which the shuffle splits
    (["--moe-distill-router", "transformer"], False),
    (["--no-moe-token-shuffle"], False),
    (["--moe-token-shuffle", "--moe-router", "hash"], True),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_token_shuffle_is_on_unless_a_context_dependent_distilled_router(flags, shuffles):
    config = parse_config([*SIZES, "--num-experts", "4", "--data-path", "x", *flags])
    config.validate(1)
    assert config.moe.shuffles_tokens is shuffles


@pytest.mark.parametrize("distill", ["cnn", "transformer"])
def test_token_shuffle_with_a_context_dependent_distilled_router_is_a_config_error(distill):
    config = parse_config([*SIZES, "--num-experts", "4", "--data-path", "x", "--moe-token-shuffle",
                           "--moe-distill-router", distill])
    with pytest.raises(ConfigError) as err:
        config.validate(1)
    assert str(err.value) == (
        f"--moe-token-shuffle cannot be used with --moe-distill-router {distill}: it routes by whole sequences, "
        f"which the shuffle splits; use wordemb, or drop one")


SHUFFLE_BATCH_CASES = {
    # world size, flags, the message's numbers: tokens sent to each rank, tokens per rank, DP size
    "dp3": (3, ["--micro-batch-size", "1", "--seq-length", "32"], (10, 32, 3)),
    "tp2-sp-dp2": (4, ["--micro-batch-size", "1", "--seq-length", "34", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel"], (8, 17, 2)),  # 34 / 2 = 17 tokens per sequence-parallel shard
}


@pytest.mark.parametrize("name", sorted(SHUFFLE_BATCH_CASES))
def test_token_shuffle_needs_a_rank_s_tokens_divisible_by_the_data_parallel_size(name):
    world, batch_flags, (each, tokens, dp) = SHUFFLE_BATCH_CASES[name]
    model = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--max-position-embeddings",
             "64", "--data-path", "x", "--train-iters", "10", *batch_flags]
    flags = ["--num-experts", "4", *model]
    with pytest.raises(ConfigError) as err:
        parse_config(flags).validate(world)
    assert str(err.value) == (
        f"--moe-token-shuffle (on by default) sends {each} of each rank's {tokens} tokens per micro-batch to each "
        f"of the {dp} data-parallel ranks, which needs --micro-batch-size x --seq-length (per sequence-parallel "
        f"shard) divisible by {dp}: change them, or add --no-moe-token-shuffle")
    parse_config([*flags, "--no-moe-token-shuffle"]).validate(world)  # the same batch without the shuffle
    parse_config([*flags, "--moe-distill-router", "cnn"]).validate(world)  # no shuffle by default
    parse_config(model).validate(world)  # dense: nothing to shuffle


def test_help_shows_how_to_turn_the_token_shuffle_off():
    text = build_parser().format_help()
    entry = text.split("\n  --no-moe-token-shuffle", 1)[1].split("\n  --", 1)[0]
    assert "turn --moe-token-shuffle off" in " ".join(entry.split()), entry
    assert "\n  --moe-token-shuffle" in text
    assert parse_config(["--no-moe-token-shuffle"]).moe.token_shuffle is False
    assert parse_config(["--moe-token-shuffle"]).moe.token_shuffle is True
