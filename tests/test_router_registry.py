"""The routing registry (stablemoe_megatron.routing.registry): one entry per --moe-router choice, the
facts the code asks instead of router names, and the functions each algorithm carries, checked
against each other (training routing vs evaluation routing vs the gate of given experts)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablemoe_megatron import routing
from stablemoe_megatron.moe.config import ROUTERS, MoEConfig
from stablemoe_megatron.routing import RoutingAlgorithm, StateBuffer, get_routing, register_routing, routing_names
from stablemoe_megatron.routing.registry import ADAPTERS, ALGORITHM_MODULES

REPO = Path(__file__).resolve().parents[1]
CLI_CHOICES = ("stablemoe", "switch", "base", "hash", "expert-choice")
# name: (adapter, gate, learned, one_pair_per_token, uses_token_ids, distillable, default distilled router,
#        losses, table_from_training_data, state buffers)
FACTS = {
    "stablemoe": ("top1", "sigmoid", True, True, False, True, "wordemb", ("balance_loss",), False, ()),
    "switch": ("top1", "softmax", True, True, False, True, None, ("aux_loss", "z_loss"), False, ()),
    "base": ("top1", "sigmoid", True, True, False, True, None, (), False, ()),
    "hash": ("hash-table", "none", False, True, True, False, None, (), True, ("hash_table",)),
    "expert-choice": ("expert-choice", "softmax", True, False, False, False, None, ("z_loss",), False,
                      ("thresholds", "thresholds_initialized")),
}


def test_cli_choices_are_the_registry_in_order():
    assert routing_names() == CLI_CHOICES == ROUTERS
    assert routing.distillable_names() == ("stablemoe", "switch", "base")
    from stablemoe_megatron.cli_args import build_parser

    assert "{" + ",".join(CLI_CHOICES) + "}" in build_parser().format_help()


def test_every_choice_resolves_to_one_algorithm_with_its_facts():
    algorithms = [get_routing(name) for name in CLI_CHOICES]
    assert [a.name for a in algorithms] == list(CLI_CHOICES)
    assert len({a.name for a in algorithms}) == len(algorithms) == len(ALGORITHM_MODULES)
    for module, algorithm in zip(ALGORITHM_MODULES, algorithms):  # each module registers its own
        assert getattr(routing, module).ALGORITHM is algorithm
    for algorithm in algorithms:
        facts = (algorithm.adapter, algorithm.gate, algorithm.learned, algorithm.one_pair_per_token,
                 algorithm.uses_token_ids, algorithm.distillable, algorithm.default_distill_router,
                 algorithm.losses, algorithm.table_from_training_data,
                 tuple(b.name for b in algorithm.state_buffers))
        assert facts == FACTS[algorithm.name], algorithm.name
        assert algorithm.description and algorithm.adapter in ADAPTERS
        assert algorithm.train_routing is not None and algorithm.eval_routing is not None
        assert (algorithm.scores is not None) == algorithm.learned
        assert (algorithm.chosen_gate is not None) == (algorithm.adapter == "top1")
        for loss in algorithm.losses:  # each loss is weighted by its MoEConfig coefficient
            assert isinstance(getattr(MoEConfig(), f"{loss}_coeff"), float), loss


def test_package_exports_resolve():
    for name in routing.__all__:  # loaded lazily from their modules
        assert callable(getattr(routing, name)), name
    with pytest.raises(AttributeError):
        routing.no_such_function


def test_unknown_names_are_a_key_error_listing_the_choices():
    for name in ("top2", "expert_choice", "dense", "Switch"):
        with pytest.raises(KeyError, match="unknown routing algorithm .*; choices: stablemoe, switch, base, "
                                           "hash, expert-choice"):
            get_routing(name)


def test_config_asks_the_registry():
    assert MoEConfig(num_experts=4).effective_distill_router == "wordemb"
    assert MoEConfig(num_experts=4, router="switch").effective_distill_router is None
    assert MoEConfig(num_experts=4, router="bogus").effective_distill_router is None
    from stablemoe_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="works with the top-1 learned routers .stablemoe, switch, base."):
        MoEConfig(num_experts=4, router="hash", distill_router="wordemb").validate(num_layers=4)
    with pytest.raises(ConfigError, match="is not one of stablemoe, switch, base, hash, expert-choice"):
        MoEConfig(num_experts=4, router="top2").validate(num_layers=4)


def test_megatron_adapter_for_every_choice():
    from stablemoe_megatron.moe.routers import ADAPTER_CLASSES, RouterBase, router_class

    assert set(ADAPTER_CLASSES) == set(ADAPTERS)
    for name in CLI_CHOICES:
        cls = router_class(name)
        assert issubclass(cls, RouterBase) and cls is ADAPTER_CLASSES[get_routing(name).adapter]
    with pytest.raises(KeyError, match="choices: stablemoe, switch"):
        router_class("expert_choice")


def test_registering_again_and_conflicts():
    same = get_routing("hash")
    assert register_routing(same) is same and get_routing("hash") is same
    with pytest.raises(ValueError, match="already registered"):
        register_routing(RoutingAlgorithm(name="hash", description="x", adapter="hash-table", gate="none",
                                          learned=False, one_pair_per_token=False, uses_token_ids=True))
    assert get_routing("hash") is same
    with pytest.raises(ValueError, match="not the name of an algorithm module"):
        register_routing(RoutingAlgorithm(name="top2", description="x", adapter="top1", gate="none",
                                          learned=False, one_pair_per_token=True, uses_token_ids=False))
    with pytest.raises(ValueError, match="gate"):
        RoutingAlgorithm("x", "x", "top1", "relu", False, True, False)
    with pytest.raises(ValueError, match="adapter"):
        RoutingAlgorithm("x", "x", "top2", "none", False, True, False)
    with pytest.raises(ValueError, match="scores"):
        RoutingAlgorithm("x", "x", "top1", "sigmoid", True, True, False)
    with pytest.raises(ValueError, match="distillable"):
        RoutingAlgorithm("x", "x", "hash-table", "none", False, True, True, default_distill_router="wordemb")
    with pytest.raises(ValueError, match="size"):
        StateBuffer("x", "tokens", "long")


class Context:
    """A single-rank RoutingContext: local counts, the whole batch is this rank's."""

    def __init__(self, training, coeffs=None):
        self.training = training
        self.coeffs = coeffs or {}

    def count(self, expert_ids):
        return routing.tokens_per_expert(expert_ids, NUM_EXPERTS), expert_ids.shape[0]

    def over_micro_batch(self, fn, local):
        return fn(local)

    def loss_coeff(self, loss):
        return self.coeffs.get(loss, 0.0)


NUM_EXPERTS, HIDDEN, TOKENS, VOCAB = 4, 8, 12, 20


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(NUM_EXPERTS, HIDDEN, generator=gen)
    token_ids = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    return hidden, weight, token_ids


@pytest.mark.parametrize("name", [n for n in CLI_CHOICES if get_routing(n).adapter == "top1"])
def test_top1_training_evaluation_and_chosen_gate_agree(name):
    algorithm = get_routing(name)
    hidden, weight, token_ids = _inputs()
    scores = algorithm.scores(hidden, weight)
    assert scores.shape == (TOKENS, NUM_EXPERTS)
    expert_ids, gates, losses = algorithm.train_routing(scores, Context(training=False, coeffs={"z_loss": 0.1}))
    assert set(losses) == set(algorithm.losses)
    tokens, experts, eval_gates = algorithm.eval_routing(hidden, weight, token_ids, {}, None)
    assert torch.equal(tokens, torch.arange(TOKENS))
    assert torch.equal(experts, expert_ids) and torch.equal(eval_gates, gates)
    given = torch.randint(0, NUM_EXPERTS, (TOKENS,), generator=torch.Generator().manual_seed(3))
    _, chosen, given_gates = algorithm.eval_routing(hidden, weight, token_ids, {}, given)
    assert torch.equal(chosen, given)
    torch.testing.assert_close(algorithm.chosen_gate(hidden, weight, given), given_gates)
    if algorithm.gate == "sigmoid":
        torch.testing.assert_close(given_gates, torch.sigmoid(scores.gather(1, given[:, None]).squeeze(1)))
    else:
        torch.testing.assert_close(given_gates, scores.softmax(-1).gather(1, given[:, None]).squeeze(1))


def test_optional_losses_follow_their_coefficient():
    algorithm = get_routing("switch")
    hidden, weight, _ = _inputs()
    logits = algorithm.scores(hidden, weight)
    assert set(algorithm.train_routing(logits, Context(True))[2]) == {"aux_loss"}
    assert set(algorithm.train_routing(logits, Context(True, {"z_loss": 1e-3}))[2]) == {"aux_loss", "z_loss"}


def test_balanced_training_routing_solves_the_whole_micro_batch():
    algorithm = get_routing("base")
    hidden, weight, _ = _inputs()
    scores = algorithm.scores(hidden, weight)
    expert_ids, _, losses = algorithm.train_routing(scores, Context(training=True))
    assert torch.equal(expert_ids, routing.balanced_assignment(scores))
    assert routing.tokens_per_expert(expert_ids, NUM_EXPERTS).tolist() == [TOKENS // NUM_EXPERTS] * NUM_EXPERTS
    assert losses == {}


def test_hash_and_expert_choice_routing():
    hidden, weight, token_ids = _inputs()
    hashed = get_routing("hash")
    table = routing.random_hash_table(VOCAB, NUM_EXPERTS, seed=1)
    tokens, experts, gates = hashed.eval_routing(hidden, None, token_ids, {"hash_table": table}, None)
    assert torch.equal(experts, hashed.train_routing(token_ids, table)) and torch.equal(experts, table[token_ids])
    assert torch.equal(tokens, torch.arange(TOKENS)) and torch.equal(gates, torch.ones(TOKENS))
    choice = get_routing("expert-choice")
    probs = routing.router_probs(choice.scores(hidden, weight))
    thresholds = routing.kth_largest_probs(probs, 3)
    pairs = choice.eval_routing(hidden, weight, token_ids, {"thresholds": thresholds}, None)
    for got, want in zip(pairs, routing.threshold_assignment(probs, thresholds)):
        assert torch.equal(got, want)
    token_index, expert_index, _ = choice.train_routing(probs, 3)
    assert torch.equal(expert_index, torch.arange(NUM_EXPERTS).repeat_interleave(3))
    assert token_index.shape == (NUM_EXPERTS * 3,)


def test_registry_and_command_line_import_neither_torch_nor_megatron():
    """Listing the routers (the --moe-router choices, the config and --help, which the shell recipes
    read through the size files) imports nothing heavy; an algorithm's facts import its torch
    functions only."""
    code = (
        "import sys\n"
        "sys.modules['megatron'] = None; sys.modules['torch'] = None\n"
        "from stablemoe_megatron.routing import get_routing, routing_names\n"
        "from stablemoe_megatron.cli_args import build_parser\n"
        "assert routing_names() == ('stablemoe', 'switch', 'base', 'hash', 'expert-choice')\n"
        "assert '{stablemoe,switch,base,hash,expert-choice}' in build_parser().format_help()\n"
        "try:\n"
        "    get_routing('top2')\n"
        "    raise AssertionError('no KeyError')\n"
        "except KeyError as exc:\n"
        "    assert 'choices: stablemoe' in str(exc)\n"
        "del sys.modules['torch']\n"
        "assert get_routing('hash').table_from_training_data\n"
        "assert sys.modules.get('megatron') is None\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
