"""Many ranks (gloo, CPU, spawned processes): FSDP2 and DDP give the masks of one process.

Four ranks are spawned once for the module and run every test's 1-, 2- and 4-rank cases on
sub-groups made once (see tests/distributed_cases.py). Cases: an MLP with uneven and empty
shards whose offsets are not multiples of 32, a small CNN, a small transformer block;
StochasticMagnitude, GReg-1 (coupled filters, traced), global Magnitude and SelectiveDecay,
several pruning events each, with FSDP2 and with the Pruner given the DDP wrapper itself. The
collectives inside every optimizer.step are counted (torch.distributed's functions patched, and
CommDebugMode) and checked: at most one per step, none where nothing is read across ranks.
"""

import os
import time

import distributed_cases as cases
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def ranks():
    pool = cases.Ranks()
    pool.run(cases.subgroups_ready, timeout=120)  # start-up (spawn, imports, groups) before the first test
    yield pool
    pool.close()


@pytest.mark.parametrize("model", list(cases.MODELS))
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_many_ranks_match_one_process(ranks, mode, model, tmp_path):
    """Every method on 1, 2 and 4 ranks: masks bit-identical to one process, collectives counted."""
    out = tmp_path / "report.pt"
    started, cpu = time.monotonic(), ranks.cpu_seconds
    todo = [(model, method) for method in cases.METHODS]
    ranks.run(cases.match_cases, mode, todo, str(out), timeout=300)
    report = torch.load(out)
    assert {(m, name, method, size) for m, name, method, size, _ in report} == {
        (mode, name, method, size) for name, method in todo for size in cases.SIZES
    }
    took = f"{time.monotonic() - started:.1f} s, {ranks.cpu_seconds - cpu:.1f} CPU s"
    print(f"\n{mode} {model}: {len(report)} runs in {took}")
    for m, name, method, size, counts in report:
        print(f"  {m} {name:5} {method:10} ranks={size}: collectives per optimizer.step {counts}")


def test_fsdp_selections_largest_structured_metrics_export(ranks):
    started, cpu = time.monotonic(), ranks.cpu_seconds
    ranks.run(cases.shard_extras, timeout=300)
    print(f"\nshard extras: {time.monotonic() - started:.1f} s, {ranks.cpu_seconds - cpu:.1f} CPU s")


@pytest.mark.parametrize("method", ["stochastic", "selective"])
def test_checkpoint_saved_on_n_ranks_resumes_on_m(ranks, method, tmp_path):
    started, cpu = time.monotonic(), ranks.cpu_seconds
    ranks.run(cases.checkpoint_cases, str(tmp_path), method, timeout=300)
    print(f"\ncheckpoints ({method}): {time.monotonic() - started:.1f} s, {ranks.cpu_seconds - cpu:.1f} CPU s")
    assert sorted(os.listdir(tmp_path)) == [f"{method}-{n}" for n in cases.SIZES]


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(ranks):
    ranks.run(cases.nonfinite_on_one_rank, timeout=120)


def test_a_mask_change_on_one_tensor_leaves_the_others_summed_statistics(ranks):
    ranks.run(cases.stats_after_a_mask_change, timeout=120)


def test_a_failing_rank_ends_the_run_with_its_message(ranks):
    """Last in the module: the failure ends the shared ranks."""
    ranks.run(cases.subgroups_ready, timeout=120)  # started and idle: the job below is all that is timed
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed on purpose") as failure:
        ranks.run(cases.fail_on_rank_1, timeout=120)
    assert "Connection closed" not in str(failure.value)  # the cause, not what it did to the other ranks
    assert time.monotonic() - started < cases.TIMEOUT.total_seconds()  # the waiting ranks did not sit out a timeout
