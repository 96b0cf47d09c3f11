"""The checkpoint format shared by trainer and export: atomic publishing, the tracker, old train states."""
import json
import os

import pytest

from stablemoe_megatron.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    TRACKER,
    TrainState,
    iteration_dir,
    publish_dir,
    read_tracker,
    read_train_state,
    write_iteration,
    write_tracker,
)
from stablemoe_megatron.errors import ConfigError


def _directory(path, files: dict):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path) -> dict:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_publish_replaces_an_existing_directory_whole(tmp_path):
    final = _directory(tmp_path / "iter_0000003", {"a": "old", "stale": "old"})
    tmp = _directory(tmp_path / "iter_0000003.tmp", {"a": "new", "b": "new"})
    publish_dir(tmp, final)
    assert _contents(final) == {"a": "new", "b": "new"}  # nothing of the old directory survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003"]  # no .tmp, no .old


def test_publish_that_fails_keeps_the_old_directory_whole(tmp_path, monkeypatch):
    final = _directory(tmp_path / "iter_0000003", {"a": "old"})
    tmp = _directory(tmp_path / "iter_0000003.tmp", {"a": "new"})
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src) == str(tmp):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        publish_dir(tmp, final)
    assert _contents(final) == {"a": "old"}
    assert not (tmp_path / "iter_0000003.old").exists()


def test_tracker_round_trip_and_garbage(tmp_path):
    assert read_tracker(tmp_path) is None
    write_tracker(tmp_path, 7)
    assert (tmp_path / TRACKER).read_text() == "7\n" and read_tracker(tmp_path) == 7
    assert not (tmp_path / (TRACKER + ".tmp")).exists()
    (tmp_path / TRACKER).write_text("seven\n")
    with pytest.raises(ConfigError, match="expected an iteration number"):
        read_tracker(tmp_path)


def test_write_iteration_publishes_files_and_tracker(tmp_path):
    root = tmp_path / "run"
    state = TrainState(iteration=4, consumed_train_samples=32, stage=2, layout={"tp": 1})
    final = write_iteration(root, 4, lambda d: (d / "payload").write_text("one"), "model: {}\n", state)
    assert final == iteration_dir(root, 4) and read_tracker(root) == 4
    assert (final / CONFIG_FILE).read_text() == "model: {}\n"
    assert read_train_state(final) == state
    # re-saving the same iteration replaces it whole; a dict train state is written the same way
    write_iteration(root, 4, lambda d: (d / "other").write_text("two"), "x\n", {"iteration": 4})
    assert sorted(p.name for p in final.iterdir()) == sorted([CONFIG_FILE, STATE_FILE, "other"])
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", TRACKER]


def test_write_iteration_that_fails_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "run"
    write_iteration(root, 2, lambda d: (d / "payload").write_text("good"), "y\n", TrainState(iteration=2))

    def broken(directory):
        (directory / "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_iteration(root, 3, broken, "y\n", TrainState(iteration=3))
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", TRACKER]
    assert read_tracker(root) == 2 and (iteration_dir(root, 2) / "payload").read_text() == "good"


def test_train_state_json_is_the_old_format(tmp_path):
    """The file a trainer wrote before tokenizer_vocab_size existed still reads; new files keep the keys."""
    (tmp_path / STATE_FILE).write_text(json.dumps({"iteration": 5, "consumed_train_samples": 40, "stage": 1,
                                                   "layout": {"tp": 1, "pp": 1, "ep": 2}}))
    assert read_train_state(tmp_path) == TrainState(5, 40, 1, {"tp": 1, "pp": 1, "ep": 2}, 0)
    write_iteration(tmp_path / "run", 1, lambda d: None, "", TrainState(iteration=1))
    written = json.loads((iteration_dir(tmp_path / "run", 1) / STATE_FILE).read_text())
    assert list(written) == ["iteration", "consumed_train_samples", "stage", "layout", "tokenizer_vocab_size"]
