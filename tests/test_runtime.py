"""stablemoe_megatron.runtime: rank helpers, the free port, and the process-pool spawner's error reporting."""
import socket

import pytest

from stablemoe_megatron import runtime
from stablemoe_megatron.errors import ConfigError


def test_rank_helpers_read_torchrun_environment_before_a_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert runtime.global_rank() == 3 and not runtime.is_first_rank()
    assert runtime.world_size() == 4 and runtime.world_size_from_env() == 4
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert runtime.global_rank() == 0 and runtime.is_first_rank() and runtime.world_size() == 1
    runtime.barrier()  # no process group: a no-op


def test_free_port_can_be_bound():
    port = runtime.free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- functions the spawned workers run (importable by module and name) ---------------------------
def _rank_and_world():
    import torch

    return torch.distributed.get_rank(), torch.distributed.get_world_size(), runtime.global_rank()


def _config_error_on_rank_one():
    if runtime.global_rank() == 1:
        raise ConfigError("--flag 3 is not allowed here; use 2")
    return "fine"


def _value_error():
    raise ValueError("deliberate failure in the worker")


def test_pool_runs_jobs_and_returns_a_workers_config_error_as_one():
    pool = runtime.GlooPool(2)
    try:
        assert pool.run(_rank_and_world, timeout=60) == [(0, 2, 0), (1, 2, 1)]
        assert pool.run(_rank_and_world, timeout=60)[1] == (1, 2, 1)  # the workers persist
        with pytest.raises(ConfigError) as info:
            pool.run(_config_error_on_rank_one, timeout=60)
        assert str(info.value) == "--flag 3 is not allowed here; use 2"
    finally:
        pool.close(graceful=False)
    assert not any(proc.is_alive() for proc in pool.procs)


def test_run_world_reports_another_failure_with_the_workers_traceback():
    with pytest.raises(RuntimeError) as info:
        runtime.run_world(_value_error, 1, timeout=120, what="conversion")
    message = str(info.value)
    assert message.startswith("conversion: rank 0 of 1 failed:")
    assert "_value_error" in message and "ValueError: deliberate failure in the worker" in message
