"""The translation recipes: examples/translate.sh launches the trainer with tools/reproduce_mt.py's
variant flags on the prepared corpus, and every variant resolves to the intended model."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _dry_run(router: str) -> list:
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "DATA_DIR", "SEED", "NPROC", "TRAIN_ITERS")}
    env.update(DRY_RUN="1", ROUTER=router, PYTHONWARNINGS="ignore")
    out = subprocess.run(["bash", "examples/translate.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout
    argv = shlex.split(out.strip().splitlines()[-1])
    return argv[argv.index("stablemoe_megatron.train") + 1:]


@pytest.mark.parametrize("router,experts,ep", [("stablemoe", 4, 2), ("switch", 4, 2), ("base", 4, 2),
                                               ("hash", 4, 2), ("dense-ffn", 1, 1), ("dense", None, 1)])
def test_translate_recipe_resolves_to_the_variant(router, experts, ep):
    from stablemoe_megatron.cli_args import parse_config

    config = parse_config(_dry_run(router))
    assert config.model.model_family == "encoder_decoder"
    assert (config.model.num_layers, config.model.hidden_size, config.model.source_length,
            config.model.target_length) == (4, 128, 48, 32)
    assert config.training.label_smoothing == 0.1 and config.optimizer.lr_decay_style == "inverse-square-root"
    assert config.moe.num_experts == experts and config.parallel.expert_model_parallel_size == ep
    assert config.data.data_path == [str(REPO / "data" / "mt_processed" / "train")]
    if router == "stablemoe":
        assert config.moe.router == "stablemoe" and config.moe.stage2_start_iter == 40
        assert config.moe.effective_distill_router == "wordemb"
    elif experts:
        assert config.moe.router == ("hash" if router == "dense-ffn" else router)
