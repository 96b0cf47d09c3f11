"""The multi-rank test helper: layouts are set up as asked, failures and hangs are reported."""
import pytest
import torch

from distributed import DistributedTestError, run_distributed


def _layout():
    from megatron.core import parallel_state as ps

    return dict(
        rank=torch.distributed.get_rank(),
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        pp=(ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
        dp=ps.get_data_parallel_world_size(),
    )


def _fail_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("deliberate failure on rank one")
    return "fine"


def _hang_on_rank_zero():
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()  # rank 1 never joins
    return "returned"


@pytest.mark.parametrize("world,tp,pp,ep,dp", [(1, 1, 1, 1, 1), (2, 2, 1, 1, 1), (2, 1, 2, 1, 1),
                                               (2, 1, 1, 2, 2), (4, 2, 1, 2, 2), (4, 1, 2, 2, 2)])
def test_layout_is_initialised(world, tp, pp, ep, dp):
    layouts = run_distributed(_layout, world_size=world, tp=tp, pp=pp, ep=ep)
    assert [lay["rank"] for lay in layouts] == list(range(world))
    for lay in layouts:
        assert lay["tp"][1] == tp and lay["pp"][1] == pp and lay["ep"][1] == ep and lay["dp"] == dp
    assert sorted({(lay["tp"][0], lay["pp"][0]) for lay in layouts}) == sorted(
        {(t, p) for t in range(tp) for p in range(pp)})


def test_a_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_one, world_size=2, timeout=60)
    assert "rank 1 of 2 failed" in str(info.value)
    assert "deliberate failure on rank one" in str(info.value)
    assert "_fail_on_rank_one" in str(info.value)  # the traceback, not just the message
    # The broken pool was discarded: the next call works.
    assert run_distributed(_layout, world_size=2)[1]["rank"] == 1


def test_a_hung_collective_times_out():
    with pytest.raises(DistributedTestError, match=r"timed out after 5s waiting for rank\(s\) \[0\]"):
        run_distributed(_hang_on_rank_zero, world_size=2, timeout=5)
    assert run_distributed(_layout, world_size=2)[0]["rank"] == 0


def _thread_count():
    import os

    return len(os.listdir(f"/proc/{os.getpid()}/task"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs /proc")
def test_rebuilding_parallel_state_does_not_leak_process_groups():
    """Each job rebuilds parallel_state in the persistent workers; its gloo groups (three threads
    each) must be destroyed with it, or a long test session drowns in idle gloo threads."""
    first = run_distributed(_thread_count, world_size=2, tp=2)
    for _ in range(4):
        later = run_distributed(_thread_count, world_size=2, ep=2)
    assert later == run_distributed(_thread_count, world_size=2, tp=2)
    assert max(later) <= max(first) + 8, (first, later)
