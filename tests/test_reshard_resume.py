"""Resuming WITH the optimizer under another parallel layout continues the run.

A tiny MoE model trains for N steps under layout A (saving at N) and on to 2N: the uninterrupted
run. The checkpoint of step N is then resumed under layout B, optimizer included, to 2N. Its
losses equal the uninterrupted run's within LOSS_TOL, the Adam moments carried across (megatron's
sharded optimizer state, the expert weights' per global expert, the distilled routers' own
optimizer), while a resume with a fresh optimizer (--no-load-optim) clearly departs from them.

Dropout is off (under another layout every rank reseeds its RNG, so dropout masks would differ)
and the learning rate is constant after no warm-up, so a fresh optimizer differs from the restored
one only by its Adam state (moments and step count), not by the LR schedule.

The balance loss and the capacity are counted per micro-batch and the token shuffle is off, so
the layouts compute the same function of the same global batch (by default the counts span the
data-parallel ranks, which differ in number between the layouts).

Tolerance: the layouts still split the same matmuls and sums differently (DP micro-batch counts,
TP shards, PP stages), so float32 sums are reduced in another order. Measured over every pair
below: LM losses (near 6) at most 4.8e-7 apart (1 ulp), most steps bitwise equal; distillation
losses at most 6e-8 apart. A fresh optimizer departs by 8e-3 to 2e-2 in the LM loss and 4e-3 in
the distillation loss from the second resumed step on. LOSS_TOL = 1e-5 and FRESH_MIN = 1e-3 sit
between.
"""
import shutil
from pathlib import Path

import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import losses_by_iteration, tiny_flags, train

N = 3  # steps before the checkpoint; every run ends at 2N
LOSS_TOL = 1e-5
FRESH_MIN = 100 * LOSS_TOL  # how far a fresh-optimizer resume must land from the uninterrupted run

LAYOUTS = {  # name: (processes, flags)
    "dp2": (2, {}),
    "dp1": (1, {}),
    "ep2": (2, {"--expert-model-parallel-size": 2}),
    "tp2": (2, {"--tensor-model-parallel-size": 2, "--sequence-parallel": True}),
    "pp2": (2, {"--pipeline-model-parallel-size": 2}),
    "dp2-distopt": (2, {"--use-distributed-optimizer": True}),
    "dp1-distopt": (1, {"--use-distributed-optimizer": True}),
    "pp2-distopt": (2, {"--pipeline-model-parallel-size": 2, "--use-distributed-optimizer": True}),
    "dp2-bf16": (2, {"--bf16": True}),
    "dp2-bf16-distopt": (2, {"--bf16": True, "--use-distributed-optimizer": True}),
}
ROUTERS = {  # StableMoE switches to stage 2 after step N + 2: two resumed steps of its distilled routers
    "stablemoe": {"--moe-router": "stablemoe", "--moe-stage2-start-iter": N + 2},
    "switch": {"--moe-router": "switch", "--moe-stage2-start-iter": False},
}
PAIRS = [  # (router, saved under, resumed under)
    ("stablemoe", "dp2", "dp1"),
    ("stablemoe", "ep2", "dp1"),  # 2 local experts per rank -> 4 local experts
    ("stablemoe", "tp2", "dp1"),
    ("stablemoe", "pp2", "dp1"),
    ("stablemoe", "dp2-distopt", "dp1-distopt"),
    ("stablemoe", "dp2", "dp2-distopt"),  # non-distributed -> distributed optimizer
    ("stablemoe", "dp2-distopt", "dp1"),  # distributed -> non-distributed optimizer
    ("stablemoe", "pp2-distopt", "dp1-distopt"),  # stage 2 of PP2 holds no expert parameters
    ("stablemoe", "dp2-bf16", "dp2-bf16-distopt"),  # fp32 main weights: fp32_param -> param
    ("switch", "ep2", "dp1"),
    ("switch", "tp2", "dp1"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("reshard_data"))


def _flags(data, router: str, layout: str, run_dir: Path, **extra) -> list:
    return tiny_flags(data, **{
        "--train-iters": 2 * N, "--lr-warmup-iters": 0, "--lr-decay-style": "constant",
        "--hidden-dropout": 0, "--attention-dropout": 0, "--eval-iters": 0, "--eval-interval": 1000,
        "--moe-balance-count-scope": "micro-batch", "--no-moe-token-shuffle": True,
        "--metrics-file": run_dir / "metrics.jsonl", **ROUTERS[router], **LAYOUTS[layout][1], **extra})


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """(router, layout) -> (records of the 2N-step run, its run directory with the checkpoint of step N)."""
    runs = {}

    def get(router: str, layout: str):
        if (router, layout) not in runs:
            run_dir = tmp_path_factory.mktemp(f"{router}-{layout}")
            argv = _flags(data, router, layout, run_dir, **{"--save": run_dir / "ckpt", "--save-interval": N})
            runs[router, layout] = run_distributed(train, LAYOUTS[layout][0], args=(argv,))[-1][1], run_dir
        return runs[router, layout]
    return get


def _resume(data, router: str, layout: str, source: Path, run_dir: Path, **extra) -> list:
    """Records of a run resumed under ``layout`` from the checkpoint of step N in ``source``."""
    load = run_dir / "load"
    shutil.copytree(source / "ckpt" / f"iter_{N:07d}", load / f"iter_{N:07d}")
    (load / "latest_checkpointed_iteration.txt").write_text(f"{N}\n")
    argv = _flags(data, router, layout, run_dir, **{"--load": load, **extra})
    return run_distributed(train, LAYOUTS[layout][0], args=(argv,))[-1][1]


def _distill_losses(records) -> dict:
    return {r["iteration"]: layer["distill_loss"] for r in records if "moe_layers" in r
            for layer in r["moe_layers"].values() if layer.get("distill_loss") is not None}


@pytest.mark.parametrize("router,saved,resumed", PAIRS, ids=[f"{r}-{a}-to-{b}" for r, a, b in PAIRS])
def test_resume_with_the_optimizer_under_another_layout_continues_the_run(
        data, uninterrupted, tmp_path, router, saved, resumed):
    reference, source = uninterrupted(router, saved)
    records = _resume(data, router, resumed, source, tmp_path)
    expected, got = losses_by_iteration(reference), losses_by_iteration(records)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for iteration, loss in got.items():
        assert abs(loss - expected[iteration]) <= LOSS_TOL, (iteration, loss, expected[iteration])
    if router == "stablemoe":  # the distilled routers' optimizer (stage 1 until step N + 2)
        expected, got = _distill_losses(reference), _distill_losses(records)
        assert sorted(got) == [N + 1, N + 2]
        for iteration, loss in got.items():
            assert abs(loss - expected[iteration]) <= LOSS_TOL, (iteration, loss, expected[iteration])
        assert {r["iteration"]: r["stage"] for r in records}[2 * N] == 2


@pytest.mark.parametrize("router,saved,resumed", [("stablemoe", "ep2", "dp1"), ("switch", "tp2", "dp1")],
                         ids=["stablemoe-ep2-to-dp1", "switch-tp2-to-dp1"])
def test_a_fresh_optimizer_departs_from_the_uninterrupted_run(data, uninterrupted, tmp_path, router, saved, resumed):
    """The control: the same resume with --no-load-optim. Step N + 1 starts from the same weights
    (equal losses); from step N + 2 on the weights carry one update by a fresh Adam (zero moments,
    step 1) and the losses depart, as do the distilled routers' (StableMoE)."""
    reference, source = uninterrupted(router, saved)
    records = _resume(data, router, resumed, source, tmp_path, **{"--no-load-optim": True})
    expected, got = losses_by_iteration(reference), losses_by_iteration(records)
    assert abs(got[N + 1] - expected[N + 1]) <= LOSS_TOL
    for iteration in range(N + 2, 2 * N + 1):
        assert abs(got[iteration] - expected[iteration]) >= FRESH_MIN, (iteration, got[iteration])
    if router == "stablemoe":
        distill, fresh = _distill_losses(reference), _distill_losses(records)
        assert abs(fresh[N + 2] - distill[N + 2]) >= FRESH_MIN, (fresh, distill)


def _rng_after_resume(argv):
    """This rank's torch / numpy / python RNG states right after the trainer resumed from ``argv``'s --load."""
    import random

    import numpy as np
    import torch

    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.build import build

    build(parse_config(argv), "train").release()
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _rng_seeded(seed):
    import random

    import numpy as np
    import torch

    from stablemoe_megatron.parallel import seed_everything

    seed_everything(seed)
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_under_another_layout_the_rng_is_reseeded_from_seed_and_iteration(data, uninterrupted, tmp_path):
    """The saved RNG states belong to the ranks of the saved layout: resumed under another one,
    every rank is seeded with --seed + the iteration, as a fresh run with that seed would be."""
    _, source = uninterrupted("stablemoe", "dp2")
    load = tmp_path / "load"
    shutil.copytree(source / "ckpt" / f"iter_{N:07d}", load / f"iter_{N:07d}")
    (load / "latest_checkpointed_iteration.txt").write_text(f"{N}\n")
    argv = _flags(data, "stablemoe", "dp1", tmp_path, **{"--load": load})
    resumed = run_distributed(_rng_after_resume, 1, args=(argv,))[0]
    seed = int(argv[argv.index("--seed") + 1])
    seeded = run_distributed(_rng_seeded, 1, args=(seed + N,))[0]
    assert resumed[0].equal(seeded[0]) and (resumed[1] == seeded[1]).all() and resumed[2] == seeded[2]


def _train_saving_the_legacy_way(argv):
    """``train`` with checkpoints as saved before the content metadata was recorded: the
    non-distributed optimizer's keys prefixed ``chained_<i>.``, no content metadata."""
    from megatron.core import dist_checkpointing

    from stablemoe_megatron.training import checkpointing

    metadata, save = checkpointing.OPTIM_METADATA, dist_checkpointing.save
    checkpointing.OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}
    dist_checkpointing.save = lambda state, directory, content_metadata=None: save(state, directory)
    try:
        return train(argv)
    finally:  # the worker process is reused by later tests
        checkpointing.OPTIM_METADATA, dist_checkpointing.save = metadata, save


def test_a_checkpoint_without_content_metadata_reloads_under_another_layout(data, tmp_path):
    """Checkpoints written before this format change (e.g. of runs in progress) keep loading."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    source = tmp_path / "legacy"
    argv = _flags(data, "stablemoe", "pp2", source, **{"--save": source / "ckpt", "--save-interval": N})
    reference = run_distributed(_train_saving_the_legacy_way, 2, args=(argv,))[-1][1]
    saved = source / "ckpt" / f"iter_{N:07d}"
    assert "content_metadata" not in torch.load(saved / "common.pt", weights_only=False)
    stored = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert any(key.startswith("chained_1.optimizer.state.exp_avg.") for key in stored)
    records = _resume(data, "stablemoe", "dp1", source, tmp_path / "resumed")
    expected, got = losses_by_iteration(reference), losses_by_iteration(records)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for iteration, loss in got.items():
        assert abs(loss - expected[iteration]) <= LOSS_TOL, (iteration, loss, expected[iteration])
