"""A .bin/.idx pair is checked before any work: truncated, mismatched, empty or malformed data is one
line naming the file (exit 2), never a numpy traceback or a silent run on the wrong tokens."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import tiny_dataset
from stablemoe_megatron.data_integrity import check_indexed_dataset
from stablemoe_megatron.errors import ConfigError
from trainer_cases import tiny_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("integrity_data"))


def _copy_pair(src_prefix: str, dst_prefix: Path, bin_from: str = None) -> str:
    shutil.copyfile(src_prefix + ".idx", str(dst_prefix) + ".idx")
    shutil.copyfile((bin_from or src_prefix) + ".bin", str(dst_prefix) + ".bin")
    return str(dst_prefix)


def _train(data, prefix, tmp_path):
    argv = tiny_flags(data, **{"--data-path": prefix, "--train-iters": 2, "--split": "100,0,0",
                               "--moe-stage2-start-iter": 1})
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO),
               MASTER_PORT=str(27000 + os.getpid() % 900), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "stablemoe_megatron.train", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_a_good_pair_passes_and_counts_its_sequences(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert check_indexed_dataset(data["prefix"]) == len(IndexedDataset(data["prefix"]))


def test_truncated_bin(data, tmp_path):
    prefix = _copy_pair(data["prefix"], tmp_path / "cut")
    raw = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(raw[:-100])
    with pytest.raises(ConfigError) as err:
        check_indexed_dataset(prefix)
    assert str(err.value).startswith(f"--data-path {prefix}.bin: is {len(raw) - 100} bytes but {prefix}.idx "
                                     f"describes {len(raw)} (shorter: truncated")


@pytest.mark.parametrize("other", ["prefix2", "valid_prefix"])
def test_idx_paired_with_another_datasets_bin(data, tmp_path, other):
    """A longer .bin trained on the wrong tokens without a word before; a shorter one crashed in numpy."""
    prefix = _copy_pair(data["prefix"], tmp_path / "mixed", bin_from=data[other])
    ours, theirs = os.path.getsize(data["prefix"] + ".bin"), os.path.getsize(data[other] + ".bin")
    assert ours != theirs
    with pytest.raises(ConfigError, match=("longer" if theirs > ours else "shorter") + ": truncated, or the .bin of another"):
        check_indexed_dataset(prefix, "--valid-data-path")


def test_empty_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    with pytest.raises(ConfigError) as err:
        check_indexed_dataset(prefix)
    assert str(err.value) == (f"--data-path {prefix}: the dataset holds no documents ({prefix}.idx); check the "
                              f"input given to tools/preprocess_data.py")


@pytest.mark.parametrize("damage", ["header", "short-index", "pointers"])
def test_malformed_idx(data, tmp_path, damage):
    prefix = _copy_pair(data["prefix"], tmp_path / "bad")
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    if damage == "header":
        raw[:4] = b"JUNK"
        expected = "is not a megatron .idx index file"
    elif damage == "short-index":
        raw = raw[:-8]
        expected = "bytes but its header describes"
    else:
        sequences = int(np.frombuffer(bytes(raw[18:26]), dtype="<u8")[0])
        offset = 34 + 4 * sequences + 8  # the second pointer
        raw[offset:offset + 8] = (12345678).to_bytes(8, "little")
        expected = "inconsistent sequence lengths and offsets"
    Path(prefix + ".idx").write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=expected):
        check_indexed_dataset(prefix)


def test_trainer_stops_before_any_work_naming_the_file(data, tmp_path):
    prefix = _copy_pair(data["prefix"], tmp_path / "cut")
    raw = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(raw[:-100])
    out = _train(data, prefix, tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith(f"stablemoe-train: error: --data-path {prefix}.bin: is ") and "Traceback" not in out.stderr
    assert "model stage params" not in out.stdout  # nothing was built
