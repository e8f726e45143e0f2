"""Workers for tests/test_distributed.py: spawned ranks on the gloo backend (CPU).

One spawn of four processes serves 1-, 2- and 4-rank runs: sub-groups of ranks [0], [0, 1] and
[0, 1, 2, 3] are made once and every case reuses them, so process start-up and group set-up are
paid once per test. Every rank compares its own results with the single-process run (computed on
rank 0 and broadcast), so "identical on every rank" is checked on every rank.
"""

from __future__ import annotations

import math
import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

import sparsetrain
from sparsetrain import distributed, methods

WORLD = 4
SIZES = (1, 2, 4)
BATCH = 8  # global batch: divisible by every world size
STEPS = 10
TIMEOUT = timedelta(seconds=60)  # a collective whose peer died fails instead of hanging


# ---------------------------------------------------------------------------------- launching
class Ranks:
    """``world`` spawned ranks in one gloo process group, kept alive to run several jobs.

    :meth:`run` runs ``fn(rank, world, *args)`` on every rank. The first rank to raise ends the
    job: the ranks are terminated (a group with a failed member cannot be trusted again; the next
    job starts new ones) and its exception (message and traceback, not the "connection closed"
    errors it causes on its peers) is raised here as a RuntimeError. ``timeout`` bounds each job.
    """

    def __init__(self, world: int = WORLD) -> None:
        self.world = world
        self.processes: list = []
        self.cpu_seconds = 0.0  # CPU time the ranks spent in jobs (start-up excluded), summed over ranks

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        context = mp.get_context("spawn")
        self.jobs = [context.Queue() for _ in range(self.world)]
        self.done = context.Queue()
        self.processes = [
            context.Process(target=_serve, args=(rank, self.world, self._tmp.name, self.jobs[rank], self.done))
            for rank in range(self.world)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn, *args, timeout: float = 120.0) -> None:
        if not self.processes:
            self.start()
        for queue in self.jobs:
            queue.put((fn, args))
        deadline = time.monotonic() + timeout
        failures, finished = [], 0
        while finished < self.world and not failures:
            try:
                rank, stamp, error, cpu = self.done.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"distributed job {fn.__name__} did not finish within {timeout:.0f} s") from None
                if not all(p.is_alive() for p in self.processes):
                    failures.append((time.time(), "a rank died without a report"))
                continue
            finished += 1
            self.cpu_seconds += cpu
            if error is not None:
                failures.append((stamp, error))
        if failures:
            time.sleep(0.2)  # a report the failure caused may lag; the earliest is the cause
            while not self.done.empty():
                _, stamp, error, _ = self.done.get()
                if error is not None:
                    failures.append((stamp, error))
            self.close()
            raise RuntimeError(min(failures)[1])

    def close(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=10)
        if self.processes:
            self._tmp.cleanup()
        self.processes = []


def _serve(rank: int, world: int, tmp: str, jobs, done) -> None:
    torch.set_num_threads(1)
    store = os.path.join(tmp, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    while True:
        fn, args = jobs.get()
        cpu = time.process_time()
        try:
            fn(rank, world, *args)
        except BaseException:
            done.put((rank, time.time(), f"rank {rank}: {traceback.format_exc()}", time.process_time() - cpu))
            raise
        done.put((rank, time.time(), None, time.process_time() - cpu))


_SUBGROUPS: dict[int, dist.ProcessGroup] = {}
_REFERENCES: dict = {}


def subgroups() -> dict[int, dist.ProcessGroup]:
    """Process groups of ranks [0], [0, 1], [0..3], made once per process (new_group is collective)."""
    if not _SUBGROUPS:
        for n in SIZES:
            _SUBGROUPS[n] = dist.new_group(list(range(n))) if n < dist.get_world_size() else dist.group.WORLD
    return _SUBGROUPS


# ---------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    # 13 and 7 rows: uneven shards, empty shards on 4 ranks, shard offsets not multiples of 32
    return nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 5))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 10, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(10 * 3 * 3, 5),
    )


class Block(nn.Module):
    """A small transformer block: self-attention and feed-forward, then a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(12, 2, dim_feedforward=20, dropout=0.0, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


MODELS = {"mlp": (mlp, (9,)), "cnn": (cnn, (3, 7, 7)), "block": (Block, (6, 12))}


def shard(name: str, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2: every layer of the MLP its own unit, the others as one unit (plus the root)."""
    if name == "mlp":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
    if name == "block":
        fully_shard(model.layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, *MODELS[name][1], generator=generator)
    return x, torch.randn(BATCH, 5, generator=generator)


# ---------------------------------------------------------------------------------- methods
METHODS = {
    "stochastic": lambda: methods.StochasticMagnitude(0.6, start=2, end=8, interval=2, schedule="linear", l2=1e-3),
    "greg1": lambda: methods.GReg1(0.5, structure="filters", update_interval=1, delta=0.05, ceiling=0.2, stabilize=2),
    "magnitude": lambda: methods.Magnitude(0.5, scope="global", schedule="linear", start=1, end=7, interval=2),
    "selective": lambda: methods.SelectiveDecay(0.5, sd=1e-2, start=0, end=8, interval=2),
}
EXTRA_METHODS = {  # outside the main matrix: checked on FSDP2 by shard_extras
    "largest_global": lambda: methods.Magnitude(0.4, scope="global", largest=True, start=1, end=7, interval=2),
    "largest_layer": lambda: methods.Magnitude(0.4, largest=True, schedule="cubic", start=1, end=7, interval=2),
    "magnitude_filters": lambda: methods.Magnitude(0.5, structure="filters", start=1, end=7, interval=2),
    "magnitude_filters_max": lambda: methods.Magnitude(
        0.5, structure="filters", norm=float("inf"), start=1, end=7, interval=2
    ),
}


def optimizer_for(model_name: str, params):
    if model_name == "block":
        return sparsetrain.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, seed=7)
    return sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, seed=7)


def event_steps(method_name: str) -> dict[int, int]:
    """The optimizer steps that communicate under FSDP2, and how many collectives each makes.

    Stochastic: its events and the step before each (statistics). GReg-1: every step that scores
    groups (growing, then holding lam, every step here). Global magnitude: its events (one round
    of the selection). Selective decay: every step (mean |g|; on events with the selection).
    """
    if method_name == "stochastic":
        events = range(2, 9, 2)
        return {s: 1 for e in events for s in (e - 1, e)}
    if method_name == "greg1":
        return {s: 1 for s in range(8)}  # 5 growth steps (lam > 0.2), 2 held, pruned at step 7: scored each step
    if method_name == "magnitude":
        return {s: 1 for s in range(3, 8, 2)}  # the schedule's level is 0 at step 1: nothing to select
    return {s: 1 for s in range(STEPS)}


# ---------------------------------------------------------------------------------- runs
def train(model_name, method_name, *, mode="single", group=None, steps=STEPS, exact=False, start=0, state=None):
    """Train one case; returns (model, optimizer, pruner, collectives per step inside ``optimizer.step``).

    ``mode``: "single" (one process), "ddp" or "fsdp" on ``group``. Each rank takes its slice of the
    global batch (the mean of the ranks' gradients is the global one up to rounding). ``exact``:
    the group's first rank computes the whole batch's loss times the group size and the others
    zero, so the averaged gradient equals the one-process gradient bit for bit (checkpoint tests).
    """
    build, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    ranks, rank = 1, 0
    if mode != "single":
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        if mode == "fsdp":
            model = shard(model_name, model, DeviceMesh.from_group(group, "cpu"))
        else:
            model = DistributedDataParallel(model, process_group=group)
    opt = optimizer_for(model_name, model.parameters())
    x, y = data(model_name)
    options = {}
    if method_name in ("greg1", "magnitude_filters", "magnitude_filters_max"):  # coupled groups, traced
        inner = model.module if mode == "ddp" else model
        options["exclude"] = [[n for n, m in inner.named_modules() if isinstance(m, nn.Linear)][-1]]
        options["example_inputs"] = x[:2]
    method = {**METHODS, **EXTRA_METHODS}[method_name]()
    pruner = sparsetrain.Pruner(model, opt, method, **options)  # the DDP wrapper itself
    if state is not None:
        state(model, opt, pruner)
    per_rank = BATCH // ranks
    counts = []
    for _ in range(start, start + steps):
        if exact:
            scale = float(ranks) if rank == 0 else 0.0
            loss = scale * nn.functional.mse_loss(model(x), y)
        else:
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            loss = nn.functional.mse_loss(model(x[part]), y[part])
        loss.backward()
        with CommDebugMode() as comm, CountCollectives() as calls:
            opt.step()
        assert calls.count == comm.get_total_counts(), f"{calls.calls} != {comm.get_comm_counts()}"
        counts.append(calls.count)
        opt.zero_grad()
    return model, opt, pruner, counts


def results(model, opt, pruner) -> dict[str, dict[str, torch.Tensor]]:
    """Full (gathered) weights and masks of every pruned tensor, by the Pruner's target name.

    The names must be those of the model's own parameters (the module inside a DDP wrapper: no
    ``module.`` prefix), so a run's results line up with one process's only if the Pruner names
    its targets the same way whatever wraps the model.
    """
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    masks, weights = {}, {}
    for target in pruner.targets:
        assert target.name == names[id(target.param)], f"target {target.name} is {names[id(target.param)]}"
        masks[target.name] = distributed.full(opt.mask(target.param))
        weights[target.name] = distributed.full(target.param.detach())
    return {"masks": masks, "weights": weights}


def reference_of(case, rank: int, **kw):
    """The single-process results of ``case``, computed once on rank 0 and broadcast (cached per process)."""
    key = (case, tuple(sorted(kw.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = broadcast_from_0(results(*train(*case, **kw)[:3]) if rank == 0 else None)
    return _REFERENCES[key]


def broadcast_from_0(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def match_cases(rank: int, world: int, mode: str, cases: list[tuple[str, str]], out: str) -> None:
    """Every case on 1, 2 and 4 ranks: masks equal to one process's, weights within fp32 rounding."""
    groups = subgroups()
    with CountCollectives() as control, CommDebugMode() as comm:
        dist.all_gather([torch.zeros(1)] * dist.get_world_size(), torch.zeros(1))
    assert control.count == 1 == comm.get_total_counts(), "the collective counters do not see an all_gather"
    reference = {case: reference_of(case, rank) for case in cases}
    report = []
    for size in SIZES:
        for case in cases:
            if rank < size:
                model, opt, pruner, counts = train(*case, mode=mode, group=groups[size])
                got = results(model, opt, pruner)
                want = reference[case]
                assert list(got["masks"]) == list(want["masks"]), f"{mode} {case}: targets {list(got['masks'])}"
                for name, mask in want["masks"].items():
                    label = f"{mode} {case} on {size} ranks, rank {rank}: {name}"
                    assert torch.equal(got["masks"][name], mask), f"{label}: masks differ from one process"
                    torch.testing.assert_close(
                        got["weights"][name],
                        want["weights"][name],
                        rtol=1e-5,
                        atol=1e-6,
                        msg=lambda m, label=label: f"{label}: {m}",
                    )
                    assert int(mask.sum()) < mask.numel(), f"{label}: nothing was pruned"
                check_counts(mode, case[1], size, counts)
                if mode == "ddp":  # every rank holds the very same bits
                    everyone = [None] * size
                    dist.all_gather_object(everyone, got, group=groups[size])
                    for other, theirs in enumerate(everyone):
                        for kind in ("masks", "weights"):
                            for name, value in theirs[kind].items():
                                assert torch.equal(value, got[kind][name]), f"ddp {case}: rank {other} {kind} {name}"
                else:
                    check_offsets(model)
                if mode == "ddp" and case[1] == "greg1" and case[0] != "block" and rank == 0:
                    one_rank_alone(case[0], model, pruner)
                report.append((mode, *case, size, counts))
            dist.barrier()
    if rank == 0:
        torch.save(report, out)


def check_offsets(model) -> None:
    """The element offsets given to the fused step are those torch's DTensor computes for the shards."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, p in model.named_parameters():
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        expected = offset[0] * row if p.to_local().numel() else distributed.shard_offset(p)  # empty shard: unused
        assert distributed.shard_offset(p) == expected, f"{name}: offset {distributed.shard_offset(p)} != {expected}"


COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
)


class CountCollectives:
    """Counts calls of torch.distributed's collectives inside the block (the functions are patched)."""

    def __enter__(self) -> CountCollectives:
        self.calls: list[str] = []
        self._saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def _counting(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    @property
    def count(self) -> int:
        return len(self.calls)


class CountDispatched(TorchDispatchMode):
    """Records every c10d operator dispatched inside the block (collectives torch makes itself included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def one_rank_alone(model_name: str, model, pruner) -> None:
    """DDP: metrics() and a structured export() on one rank while the others wait: no collective at all."""
    with CountCollectives() as calls, CountDispatched() as comm:  # CommDebugMode trips over Torch-Pruning's tracing
        metrics = pruner.metrics()
        small = pruner.export(data(model_name)[0][:2])  # checks its outputs against the masked model's
    assert comm.calls == [] and calls.calls == [], f"export/metrics on one rank issued collectives: {comm.calls}"
    assert any(m["dead_outputs"] > 0 for m in metrics.values()), metrics
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.module.parameters())


def check_counts(mode: str, method_name: str, size: int, counts: list[int]) -> None:
    """sparsetrain's own collectives per ``optimizer.step``: none with DDP or one rank, else as :func:`event_steps`."""
    expected = [0] * len(counts)
    if mode == "fsdp" and size > 1:
        for step, n in event_steps(method_name).items():
            expected[step] = n
    assert counts == expected, f"{mode} {method_name} on {size} ranks: collectives per step {counts} != {expected}"


def checkpoint_cases(rank: int, world: int, directory: str, method_name: str) -> None:
    """Save after ``first`` steps on N ranks, resume on M ranks, finish: bit-identical to one uninterrupted process."""
    groups = subgroups()
    first, rest = 5, 5
    case = ("mlp", method_name)
    reference = reference_of(case, rank, steps=first + rest, exact=True)
    for n in SIZES:
        if rank < n:
            model, opt, pruner, _ = train(*case, mode="fsdp", group=groups[n], steps=first, exact=True)
            if method_name == "stochastic":  # torch.distributed.checkpoint's own helpers, written out
                model_state, optim_state = get_state_dict(model, opt)
                assert set(optim_state) == {"state", "param_groups"}  # the pruning state rides in "state"
                state = {"model": model_state, "optim": optim_state}
                dcp.save(state, checkpoint_id=os.path.join(directory, f"{method_name}-{n}"), process_group=groups[n])
            else:
                distributed.save(os.path.join(directory, f"{method_name}-{n}"), model, opt)
        dist.barrier()
    for n in SIZES:
        for m in SIZES:
            if rank < m:
                path = os.path.join(directory, f"{method_name}-{n}")
                restore = standard_load if method_name == "stochastic" else distributed.load
                restore = lambda model, opt, pruner, path=path, load=restore: load(path, model, opt)
                model, opt, pruner, _ = train(
                    *case, mode="fsdp", group=groups[m], steps=rest, exact=True, start=first, state=restore
                )
                got = results(model, opt, pruner)
                for name, mask in reference["masks"].items():
                    label = f"{method_name}: saved on {n} ranks, resumed on {m}, rank {rank}: {name}"
                    assert torch.equal(got["masks"][name], mask), f"{label}: masks differ"
                    assert torch.equal(got["weights"][name], reference["weights"][name]), f"{label}: weights differ"
            dist.barrier()


def standard_load(path: str, model, opt) -> None:
    """torch.distributed.checkpoint's helpers: get_state_dict, dcp.load, set_state_dict."""
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, process_group=distributed.sync_of(opt).group)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def nonfinite_on_one_rank(rank: int, world: int) -> None:
    """skip_nonfinite with FSDP2: an inf in one rank's gradient shard skips the step on every rank."""
    groups = subgroups()
    torch.manual_seed(0)
    model = shard("mlp", mlp(), DeviceMesh.from_group(groups[world], "cpu"))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, skip_nonfinite=True)
    sparsetrain.Pruner(model, opt, METHODS["selective"]())
    x, y = data("mlp")
    for poison in (False, True):
        before = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        nn.functional.mse_loss(model(x), y).backward()
        first = next(iter(model.parameters()))
        if poison and rank == world - 1:
            first.grad.to_local().view(-1)[0] = float("inf")
        opt.step()
        opt.zero_grad()
        changed = any(not torch.equal(before[n], p.detach().to_local()) for n, p in model.named_parameters())
        assert changed != poison, f"rank {rank}: step {'skipped' if not changed else 'taken'} with poison={poison}"


def stats_after_a_mask_change(rank: int, world: int) -> None:
    """FSDP2 on 2 and 4 ranks: statistics summed across ranks, then ``set_mask`` on one tensor, then the
    read before a step that reads them: every tensor's statistics are those of one process (the
    tensors the mask change did not touch are not summed a second time). Then a read requested while
    every vector was global (a Pruner's step before its method runs), a mask change, and the read
    (``Pruner.stats``): the changed tensor's statistics are summed too."""
    groups = subgroups()
    x, y = data("mlp")
    moments = ["after the step", "after set_mask", "after a request, set_mask"]

    def run(group=None) -> list[list[torch.Tensor]]:
        torch.manual_seed(0)
        model = mlp()
        scale = 1.0
        if group is not None:
            model = shard("mlp", model, DeviceMesh.from_group(group, "cpu"))
            scale = float(dist.get_world_size(group)) if dist.get_rank(group) == 0 else 0.0
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, seed=7)
        sync = distributed.sync_of(opt)
        weights = [m.weight for m in model if isinstance(m, nn.Linear)]
        for w in weights:
            opt.enable_pruning(w)
        # rank 0 computes the whole batch's loss times the group size, the others zero: the averaged
        # gradient is the one-process gradient bit for bit
        (scale * nn.functional.mse_loss(model(x), y)).backward()
        opt.step()  # no pruner: every statistic computed, local partial sums on shards
        alive = [
            torch.rand(w.shape, generator=torch.Generator().manual_seed(3 + i)) > 0.5 for i, w in enumerate(weights)
        ]
        seen = []
        for moment in moments:
            if moment == "after set_mask":
                opt.set_mask(weights[0], alive[0])  # rewrites the first tensor's statistics only
            if moment == "after a request, set_mask":
                if sync is not None:
                    sync.request_stats()  # nothing holds partial sums now
                opt.set_mask(weights[1], alive[1])
                if sync is not None:
                    sync.flush()  # as Pruner.stats() before a method reads them
            else:
                distributed.prepare_step(opt, None, "stochastic", False, flag=False)  # what an event step reads
            seen.append([opt.state[w]["stats"].clone() for w in weights])
        return seen

    expected = run()
    for size in (2, 4):
        if rank < size:
            got = run(groups[size])
            wrong = []
            for moment, row, want in zip(moments, got, expected):
                for index, (a, b) in enumerate(zip(row, want)):
                    try:
                        torch.testing.assert_close(a, b)
                    except AssertionError:
                        wrong.append(f"{moment}, weight {index}: {a.tolist()} != {b.tolist()}")
            assert not wrong, f"{size} ranks, statistics differ from one process:\n" + "\n".join(wrong)
        dist.barrier()


def shard_extras(rank: int, world: int) -> None:
    """FSDP2 on 2 and 4 ranks: exact selections over big shards (one collective, two when the
    ranks' values are far apart), Magnitude(largest=True) and structured Magnitude as one process,
    global metrics() / summary(), and export() refused with its reason."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from sparsetrain import selection
    from sparsetrain.pruner import layer_metrics
    from sparsetrain.summary import layer_rows

    groups = subgroups()
    cases = [("mlp", "largest_global"), ("mlp", "largest_layer"), ("cnn", "magnitude_filters")]
    cases.append(("cnn", "magnitude_filters_max"))  # L-inf group scores: maxima across ranks
    reference = {case: reference_of(case, rank) for case in cases}
    generator = torch.Generator().manual_seed(5)
    shapes = [(301, 50), (97, 41), (5003,)]  # shards above the candidate capacity: bins are sent, not shards
    spread = [torch.randn(shape, generator=generator) for shape in shapes]
    ordered = [torch.sort(t.reshape(-1).abs()).values.reshape(t.shape) for t in spread]  # rank 0 small, rank 3 large
    for size in (2, 4):
        if rank < size:
            group = groups[size]
            mesh = DeviceMesh.from_group(group, "cpu")
            for kind, fulls, rounds in (("random", spread, 1), ("ordered", ordered, 2)):
                shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in fulls]
                sync = distributed.ShardSync(group)
                everything = torch.cat([t.reshape(-1).abs() for t in fulls])
                n = everything.numel()
                ks = [1, n // 3, n // 2 + 1, n, n]
                extra = sum(range(size))
                offsets = [torch.tensor(float(rank)) for _ in ks]  # summed across ranks: 0 + 1 (+ 2 + 3)
                offsets[-1] = torch.tensor(1.0)  # n + size: outside [1, n]
                with CountCollectives() as calls:
                    got = selection.kth_smallest_abs_many([shards] * 4, ks[:4], sync=sync)
                    shifted = selection.kth_smallest_abs_many(
                        [shards] * 5, [k - extra for k in ks[:4]] + [n], sync=sync, k_offsets=offsets
                    )
                expected = [float(torch.kthvalue(everything, k).values) for k in ks[:4]]
                assert got == expected, f"{kind} on {size} ranks: {got} != {expected}"
                assert shifted == [*expected, None], f"{kind} on {size} ranks, k offsets: {shifted} != {expected}"
                assert calls.count == 2 * rounds, f"{kind} on {size} ranks: {calls.calls}"
            for case in cases:
                model, opt, pruner, counts = train(*case, mode="fsdp", group=group)
                got = results(model, opt, pruner)
                for name, mask in reference[case]["masks"].items():
                    assert torch.equal(got["masks"][name], mask), f"{case} on {size} ranks: {name} masks differ"
                if not case[1].startswith("magnitude_filters"):
                    assert all(n <= 1 for n in counts), f"{case}: collectives per step {counts}"
                    fraction = sum(int((~m).sum()) for m in got["masks"].values()) / sum(
                        m.numel() for m in got["masks"].values()
                    )
                    assert abs(fraction - 0.4) < 0.02, f"{case}: sparsity {fraction}, target 0.4"
                metrics = pruner.metrics()
                rows = {row.name: row for row in layer_rows(pruner)}
                for target in pruner.targets:
                    whole = distributed.full(target.param.detach())
                    expected = {k: float(v) for k, v in layer_metrics(target, whole).items()}
                    torch.testing.assert_close(metrics[target.name], expected, rtol=1e-6, atol=0)  # float32 means
                    row = rows[target.name]
                    dead_rows = int((whole == 0).reshape(whole.shape[0], -1).all(dim=1).sum())
                    assert (row.alive_params, row.dead_outputs) == (int((whole != 0).sum()), dead_rows), row
                try:
                    pruner.export(data(case[0])[0][:2])
                except RuntimeError as error:
                    assert "FSDP2 shard" in str(error) and "full_state_dict" in str(error), error
                else:
                    raise AssertionError("export() of FSDP2 shards did not refuse")
                if case[1] == "magnitude_filters":  # the way the refusal names: full state dicts, one process
                    export_from_full_state_dicts(case, model, opt, reference[case]["masks"], rank)
        dist.barrier()


def export_from_full_state_dicts(case, model, opt, masks, rank: int) -> None:
    """Gather full model and optimizer state dicts (collective), then on rank 0: a plain model, optimizer
    and Pruner load them and export the smaller model, with the masks of one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, opt, options=options)
    if rank != 0:
        return
    torch.manual_seed(0)
    plain = MODELS[case[0]][0]()
    plain.load_state_dict(model_state)
    plain_opt = optimizer_for(case[0], plain.parameters())
    x = data(case[0])[0][:2]
    last = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)][-1]
    pruner = sparsetrain.Pruner(plain, plain_opt, EXTRA_METHODS[case[1]](), exclude=[last], example_inputs=x)
    plain_opt.load_state_dict(optim_state)
    assert pruner.step_count == STEPS, pruner.step_count
    for target in pruner.targets:
        assert torch.equal(plain_opt.mask(target.param), masks[target.name]), f"{target.name}: masks differ"
    small = pruner.export(x)  # checks its outputs against the masked model's
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in plain.parameters())


def subgroups_ready(rank: int, world: int) -> None:
    subgroups()


def fail_on_rank_1(rank: int, world: int) -> None:
    """Rank 1 raises; the others wait in a collective that can never complete."""
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    dist.barrier()
