"""Expert tensor parallelism (--expert-tensor-parallel-size, ETP): each expert's FFN split over the ETP
ranks (fc1 column-, fc2 row-parallel, megatron's expert modules) equals one process, and checkpoints
reshard between ETP sizes.

Layer tests: as tests/test_moe_parallel.py, a single-process model defines the weights, the parallel
model loads its shards (half of every expert FFN per rank) through megatron's sharded_state_dict, and
losses and every gradient (after megatron's reductions) must equal the single process's. Two layouts
of 2 gloo ranks: TP2 + sequence parallelism with ETP2 (the ETP group is the TP group, whose ranks hold
different sequence shards), and TP1 with ETP2 (the ETP group is the data-parallel pair, whose ranks
hold different batches). Both MoE layouts: the paper's K-deep pre-norm stacks (replicated norms, an
all-reduce per FFN) and Megatron's single FFN (gather, reduce-scatter).
"""
import math

import pytest
import torch

from data_fixtures import tiny_dataset
from distributed import max_abs_diff_to_global, run_distributed
from moe_cases import forward_backward, reduce_grads_like_megatron
from test_moe_parallel import TOL, _reference
from trainer_cases import losses_by_iteration, tiny_flags, train

from stablemoe_megatron.cli_args import parse_config
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.parallel import ParallelSizes

NORMAL_FC2 = dict(expert_output_init="normal")  # with zero fc2 the experts would add 0 and fc1, norms get no grad
CASES = {
    "stablemoe-paper": dict(router="stablemoe", moe_options=NORMAL_FC2),
    "stablemoe-megatron": dict(router="stablemoe", layout="megatron", moe_options=NORMAL_FC2),
    "switch-paper": dict(router="switch", moe_options=NORMAL_FC2),
    "switch-megatron": dict(router="switch", layout="megatron", moe_options=NORMAL_FC2),
}


def _parallel(case, weights, ref_losses, ref_grads):
    """This rank's (loss diff, grad diff, keys compared, local fc1 rows / global fc1 rows)."""
    from megatron.core import parallel_state as ps

    from distributed import load_global_tensors
    from moe_cases import build

    model = build(**case)
    assert load_global_tensors(model, weights) > 0
    fc1 = next(p for n, p in model.named_parameters() if "local_experts.0.linear_fc1.weight" in n)
    global_fc1 = next(w for k, w in weights.items() if "experts" in k and k.endswith("linear_fc1.weight"))
    dp_rank = ps.get_data_parallel_rank()
    losses = forward_backward(model, dp_rank)
    reduce_grads_like_megatron(model)
    grad_diff, compared = max_abs_diff_to_global(model, ref_grads, grads=True)
    return ((losses - ref_losses[dp_rank]).abs().max().item(), grad_diff, compared,
            fc1.shape[0] / global_fc1.shape[-2])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2sp-etp2", "tp1-etp2"])
def test_expert_tensor_parallel_2_equals_one_process(name, tp):
    case = CASES[name]
    dp = 2 // tp
    weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, dp))[0]
    for loss_diff, grad_diff, compared, fc1_share in run_distributed(
            _parallel, world_size=2, tp=tp, etp=2, args=(case, weights, ref_losses, ref_grads)):
        assert fc1_share == 0.5  # each rank holds half of every expert's FFN
        assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)
        kinds = {kind for kind in ("linear_fc1", "linear_fc2", "norm") if any(
            "experts" in key and kind in key for key in compared)}
        assert kinds == ({"linear_fc1", "linear_fc2", "norm"} if "paper" in name else {"linear_fc1", "linear_fc2"})


def _fresh_losses(case, together):
    """Per-token losses of a freshly initialised model: all batches in one process, or this rank's."""
    from megatron.core import parallel_state as ps

    from moe_cases import build, forward_backward_together

    model = build(**case)
    return forward_backward_together(model, 2) if together else forward_backward(model, ps.get_data_parallel_rank())


def test_swiglu_experts_initialise_as_one_process_under_etp2():
    """The initial model does not depend on ETP: each rank draws every expert weight whole and keeps
    its shard, a gated fc1 [2F, h] as the same rows of both halves (megatron's GLU takes the first half
    of its local output as the gate), so fresh ETP2 models compute one process's losses."""
    case = dict(router="switch", layout="megatron", moe_options=NORMAL_FC2,
                model_options=dict(swiglu=True, ffn_hidden_size=64))
    reference = run_distributed(_fresh_losses, 1, args=(case, True))[0]
    for rank, losses in enumerate(run_distributed(_fresh_losses, 2, etp=2, args=(case, False))):
        assert (losses - reference[rank]).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stablemoe-paper", "switch-megatron"])
def test_expert_parallel_2_x_expert_tensor_parallel_2(name):
    """World 4: EP2 x ETP2 (x TP2 + SP), the tokens of an EP exchange gathered over the ETP pair."""
    case = CASES[name]
    for tp, batches in ((1, 4), (2, 2)):
        weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, batches))[0]
        for loss_diff, grad_diff, _, fc1_share in run_distributed(
                _parallel, world_size=4, tp=tp, ep=2, etp=2, args=(case, weights, ref_losses, ref_grads)):
            assert fc1_share == 0.5 and loss_diff <= TOL and grad_diff <= TOL, (tp, loss_diff, grad_diff)


# -- the checks of the flag ---------------------------------------------------------------------------
SIZES = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--data-path", "x", "--train-iters", "10"]
MOE = ["--num-experts", "4", "--disable-bias-linear"]


@pytest.mark.parametrize("argv,world,message", [
    (MOE + ["--expert-tensor-parallel-size", "0"], 1, "--expert-tensor-parallel-size must be >= 1, got 0"),
    (MOE + ["--expert-tensor-parallel-size", "2"], 1,
     "world size 1 is not divisible by --expert-tensor-parallel-size 2 x --expert-model-parallel-size 1 x "
     "--pipeline-model-parallel-size 1; launch a multiple of 2 processes"),
    (MOE + ["--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"], 2,
     "world size 2 is not divisible by --expert-tensor-parallel-size 2 x --expert-model-parallel-size 2 x "
     "--pipeline-model-parallel-size 1; launch a multiple of 4 processes"),
    (["--disable-bias-linear", "--expert-tensor-parallel-size", "2"], 2,
     "--expert-tensor-parallel-size 2 splits the experts' FFNs; this model has none: add --num-experts or use 1"),
    (MOE + ["--moe-expert-ffn-hidden-size", "90", "--expert-tensor-parallel-size", "4"], 4,
     "--expert-tensor-parallel-size 4 does not divide the expert FFN size 90 (--moe-expert-ffn-hidden-size, "
     "default --ffn-hidden-size): choose a divisor of 90"),
    (["--num-experts", "4", "--expert-tensor-parallel-size", "2"], 2,
     "--expert-tensor-parallel-size 2 needs bias-free experts (Megatron-LM: bias in MoE only with expert tensor "
     "parallel size 1): add --disable-bias-linear or use 1"),
], ids=["zero", "world", "world-with-ep", "dense", "ffn", "bias"])
def test_bad_expert_tensor_parallel_sizes_stop_with_one_line(argv, world, message):
    config = parse_config([*SIZES, *argv])
    with pytest.raises(ConfigError) as err:
        config.validate(world)
    assert str(err.value) == message


def test_default_is_whole_experts_and_good_sizes_pass():
    config = parse_config([*SIZES, *MOE, "--tensor-model-parallel-size", "2", "--sequence-parallel"])
    config.validate(2)
    assert config.parallel.expert_tensor_parallel_size is None  # 1 here, not megatron's TP
    config = parse_config([*SIZES, *MOE, "--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2",
                           "--tensor-model-parallel-size", "2", "--sequence-parallel"])
    config.validate(8)
    with pytest.raises(ConfigError, match="--expert-tensor-parallel-size must be >= 1, got 0"):
        ParallelSizes(expert_tensor=0).validate(1)


# -- a trainer run saved under ETP2 reloads (and resumes) under ETP1, and back -----------------------
ITERS, STOP = 8, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("etp_data"))


def _flags(data, run_dir, name, **extra):
    """Tiny StableMoE (2-deep expert stacks, normal fc2 init so the expert norms get gradients)."""
    return tiny_flags(data, **{"--train-iters": ITERS, "--save": run_dir / "ckpt", "--load": run_dir / "ckpt",
                               "--save-interval": STOP, "--metrics-file": run_dir / f"{name}.jsonl",
                               "--moe-sublayers-per-expert": 2, "--moe-expert-output-init": "normal",
                               "--eval-interval": 1000, **extra})


def _train(argv):
    return run_distributed(train, 2, args=(argv,))[-1]


def _eval(load, flags, tokenizer_model):
    from stablemoe_megatron.evaluate import run

    return run(["--load", str(load), "--eval-iters", "2", "--tokenizer-model", tokenizer_model, *flags])["loss"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same run on two data-parallel ranks with experts whole (ETP1) and split (ETP2)."""
    out = {}
    for etp in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"etp{etp}")
        (run_dir / "ckpt").mkdir()
        _, records = _train(_flags(data, run_dir, "metrics", **{"--expert-tensor-parallel-size": etp}))
        out[etp] = {"records": records, "ckpt": run_dir / "ckpt"}
    return out


def test_trainer_run_under_etp2_matches_etp1(runs):
    """The same losses and gradient norms (--clip-grad 0.1 is active; the ETP ranks' copies of the
    expert norms count once: counted on both ranks, the norm is ~5e-6 too large, relatively)."""
    reference, losses = (losses_by_iteration(runs[etp]["records"]) for etp in (1, 2))
    assert sorted(losses) == list(range(1, ITERS + 1))
    for iteration, loss in losses.items():
        assert abs(loss - reference[iteration]) < 1e-5, (iteration, loss, reference[iteration])
    norms = {r["iteration"]: r["grad_norm"] for r in runs[1]["records"] if "grad_norm" in r}
    split = [r for r in runs[2]["records"] if "grad_norm" in r]
    assert len(split) == ITERS
    for record in split:
        expected = norms[record["iteration"]]
        assert abs(record["grad_norm"] / expected - 1) < 1e-6, (record["iteration"], record["grad_norm"], expected)


def test_checkpoints_reload_under_the_other_expert_tensor_parallel_size(data, runs):
    """ETP2's checkpoint evaluates under ETP2, ETP1 (2 ranks) and on 1 rank with one loss; ETP1's under ETP2."""
    model = data["tokenizer_model"]
    for etp, other in ((2, "1"), (1, "2")):
        ckpt = runs[etp]["ckpt"]
        one_rank = run_distributed(_eval, 1, args=(ckpt, [], model))[0]
        as_saved = run_distributed(_eval, 2, args=(ckpt, [], model))
        switched = run_distributed(_eval, 2, args=(ckpt, ["--expert-tensor-parallel-size", other], model))
        for loss in [*as_saved, *switched]:
            assert math.isfinite(loss) and abs(loss - one_rank) < 1e-5, (etp, loss, one_rank)


def test_etp2_checkpoint_resumes_under_etp1_with_its_optimizer_state(data, runs, tmp_path):
    """Resumed under ETP1 at iteration STOP, Adam's moments included, the run continues the ETP2 run's losses."""
    import shutil

    saved = f"iter_{STOP:07d}"
    shutil.copytree(runs[2]["ckpt"] / saved, tmp_path / "ckpt" / saved)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text(str(STOP))
    _, records = _train(_flags(data, tmp_path, "resumed", **{"--expert-tensor-parallel-size": 1}))
    continued, reference = losses_by_iteration(records), losses_by_iteration(runs[2]["records"])
    assert sorted(continued) == list(range(STOP + 1, ITERS + 1))
    for iteration, loss in continued.items():
        assert abs(loss - reference[iteration]) < 1e-5, (iteration, loss, reference[iteration])


def test_converter_reshards_an_etp2_checkpoint_to_whole_experts(data, runs, tmp_path):
    from test_convert_helpers import model_tensors

    from stablemoe_megatron.export.convert import reshard_rank
    from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint

    out = tmp_path / "etp1"
    run_distributed(reshard_rank, 1, args=(str(runs[2]["ckpt"]), str(out), 1, 1, 1))
    source, converted = model_tensors(runs[2]["ckpt"]), model_tensors(out)
    assert sorted(source) == sorted(converted) and all(torch.equal(source[k], converted[k]) for k in source)
    assert TorchDistCheckpoint(out).config.parallel.expert_tensor_parallel_size is None
    model = data["tokenizer_model"]
    loss = run_distributed(_eval, 1, args=(out, [], model))[0]
    assert abs(loss - run_distributed(_eval, 1, args=(runs[2]["ckpt"], [], model))[0]) < 1e-6


def test_expert_norms_count_once_in_the_gradient_norm_under_tp2_with_whole_experts(data, tmp_path):
    """The default ETP1 under TP2 + SP: the attention-TP ranks hold replicas of the experts (each its own
    expert-TP group), so the expert norms count on every rank, not only on attention-TP rank 0 (the
    last rank logs the norm; leaving its expert norms out makes it ~5e-6 too small, relatively)."""
    flags = {"--train-iters": 3, "--moe-stage2-start-iter": False, "--moe-sublayers-per-expert": 2,
             "--moe-expert-output-init": "normal"}
    norms = []
    for world, extra in ((1, {}), (2, {"--tensor-model-parallel-size": 2, "--sequence-parallel": True})):
        argv = tiny_flags(data, **flags, **extra, **{"--metrics-file": tmp_path / f"world{world}.jsonl"})
        _, records = run_distributed(train, world, args=(argv,))[-1]
        norms.append([r["grad_norm"] for r in records if "grad_norm" in r])
    assert len(norms[0]) == len(norms[1]) == 3
    for one, two in zip(*norms):
        assert abs(two / one - 1) < 1e-6, norms
