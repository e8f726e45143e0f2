"""Shrink in flight (sparsetrain.shrink): removing dead channel groups from the live model mid-training.

Continuing after a shrink must give what continuing the masked model gives: the same losses and,
50 steps later, the same outputs within 1e-4 relative (fp32; the matmuls have other sizes, so not
bit for bit), with the same optimizer object, learning-rate scheduler and pruning schedule.
"""

from __future__ import annotations

import copy
import os

import pytest
import shrink_cases as cases
import torch
from torch import nn
from torch.nn.utils import parametrize

import sparsetrain
from sparsetrain import backends, methods
from sparsetrain.autograd import MaskedPruner
from sparsetrain.shrink import ShrinkError, rebuild

STEPS = 60  # every method's last structured event is before step 10: 50 steps follow the last shrink


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 1e-4 relative: each element within 1e-4 of itself or of the output's largest magnitude."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def fused_run(model_name, method_name, opt_name, shrink, steps=STEPS, backend="torch"):
    model = cases.build(model_name)
    opt = cases.optimizer(opt_name, model.parameters(), backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 25, 0.5)
    pruner = sparsetrain.Pruner(
        model, opt, cases.method(method_name), example_inputs=cases.probe(model_name), shrink_after_prune=shrink
    )
    losses = cases.train_steps(model, opt, cases.batches(model_name, steps), scheduler)
    return model, opt, pruner, losses


@pytest.mark.parametrize(
    "model_name, method_name, opt_name",
    [
        ("cnn", "greg", "sgd"),
        ("cnn", "magnitude", "sgd"),
        ("cnn", "greg", "adamw"),
        ("mlp", "greg", "adamw"),
        ("mlp", "magnitude", "sgd"),
        ("mlp", "magnitude", "amsgrad"),
    ],
)
def test_continuing_after_a_shrink_matches_the_masked_model(model_name, method_name, opt_name):
    masked, _, masked_pruner, masked_losses = fused_run(model_name, method_name, opt_name, shrink=False)
    small, opt, pruner, losses = fused_run(model_name, method_name, opt_name, shrink=True)
    dense = sum(p.numel() for p in masked.parameters())
    assert pruner.shrinks and sum(p.numel() for p in small.parameters()) < 0.6 * dense
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(masked_losses), rtol=1e-4, atol=0)
    probe = cases.probe(model_name)
    close(cases.outputs(small, probe), cases.outputs(masked, probe))
    # the same pruning state, on what remains: one alive flag per remaining channel, as many as the masked model's
    for g, g_masked, alive, alive_masked in zip(
        pruner.groups.groups, masked_pruner.groups.groups, pruner.alive_units(), masked_pruner.alive_units()
    ):
        assert g.size + g.removed == g_masked.size and bool(alive.all())
        assert int(alive.sum()) == int(alive_masked.sum())
    # the same optimizer object steps the same Parameter objects, now smaller
    params = list(small.parameters())
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    buffer = {"sgd": "momentum_buffer", "adamw": "exp_avg_sq", "amsgrad": "max_exp_avg_sq"}[opt_name]
    assert all(buffer in opt.state[p] for p in params)
    for p in params:
        for name, value in opt.state[p].items():
            if name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert value.shape == p.shape


@pytest.mark.parametrize(
    "backend, opt_name, steps", [("native", "sgd", 30), ("native", "adam", 30), ("triton", "adamw", 8)]
)  # interpreted Triton: a short run
def test_shrink_on_other_cpu_backends(backend, opt_name, steps):
    usable, reason = backends.availability(backend)
    if not usable:
        pytest.skip(reason)
    masked, *_ = fused_run("mlp", "oneshot", opt_name, shrink=False, steps=steps, backend=backend)
    small, _, pruner, _ = fused_run("mlp", "oneshot", opt_name, shrink=True, steps=steps, backend=backend)
    assert pruner.shrinks
    probe = cases.probe("mlp")
    close(cases.outputs(small, probe), cases.outputs(masked, probe))


def test_masked_pruner_with_a_torch_optimizer():
    def run(shrink):
        model = cases.build("cnn")
        pruner = MaskedPruner(
            model, cases.method("oneshot"), example_inputs=cases.probe("cnn"), shrink_after_prune=shrink
        )
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
        losses = cases.train_steps(model, opt, cases.batches("cnn", 30), after=lambda: pruner.step(opt))
        return model, opt, pruner, losses

    masked, _, _, masked_losses = run(False)
    small, opt, pruner, losses = run(True)
    assert len(pruner.shrinks) == 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(masked_losses), rtol=1e-4, atol=0)
    close(cases.outputs(small, cases.probe("cnn")), cases.outputs(masked, cases.probe("cnn")))
    for p in small.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    # the masks still apply (parametrizations carried over) and the plain state_dict reloads into a smaller model
    fresh = rebuild(cases.build("cnn"), pruner.state_dict(), cases.probe("cnn"))
    fresh.load_state_dict(small.state_dict())
    close(cases.outputs(fresh, cases.probe("cnn")), cases.outputs(small, cases.probe("cnn")))


@pytest.mark.parametrize("kept", ["whole", "state-and-groups"], ids=["torch.save", "dcp-helpers"])
def test_a_shrunk_checkpoint_resumes_into_a_rebuilt_model(tmp_path, kept):
    # "state-and-groups": what torch.distributed.checkpoint's get_optimizer_state_dict keeps of it
    data = cases.batches("mlp", 40)
    probe = cases.probe("mlp")

    def start(model):
        opt = cases.optimizer("sgd", model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 15, 0.5)
        return opt, scheduler

    model = cases.build("mlp")
    opt, scheduler = start(model)
    pruner = sparsetrain.Pruner(model, opt, cases.method("magnitude"), example_inputs=probe, shrink_after_prune=True)
    cases.train_steps(model, opt, data[:8], scheduler)  # events at steps 3 (nothing yet: level 0) and 6
    assert len(pruner.shrinks) == 1
    removed = [g.removed for g in pruner.groups.groups]
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, path)
    cases.train_steps(model, opt, data[8:], scheduler)

    saved = torch.load(path)
    if kept != "whole":
        saved["opt"] = {key: saved["opt"][key] for key in ("state", "param_groups")}
    resumed = rebuild(cases.build("mlp", seed=5), saved["opt"], probe)
    resumed.load_state_dict(saved["model"])
    opt2, scheduler2 = start(resumed)
    opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    pruner2 = sparsetrain.Pruner(
        resumed, opt2, cases.method("magnitude"), example_inputs=probe, shrink_after_prune=True
    )
    assert [g.removed for g in pruner2.groups.groups] == removed and any(removed)
    cases.train_steps(resumed, opt2, data[8:], scheduler2)
    assert len(pruner2.shrinks) == len(pruner.shrinks) == 2  # the event at step 9 shrinks both runs
    assert [tuple(p.shape) for p in resumed.parameters()] == [tuple(p.shape) for p in model.parameters()]
    torch.testing.assert_close(cases.outputs(resumed, probe), cases.outputs(model, probe), rtol=0, atol=0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_ranks_shrink_identically(tmp_path):
    from distributed_cases import Ranks

    ranks = Ranks(world=2)
    try:
        ranks.run(cases.ddp_job, str(tmp_path / "out.pt"), timeout=120)
    finally:
        ranks.close()
    assert os.path.exists(tmp_path / "out.pt")


def test_greg_renumbers_its_picked_channels():
    method = methods.GReg1(0.5)
    method.picked = {"a": torch.tensor([1, 4, 6, 9]), "b": torch.tensor([0, 2])}
    method.units_removed(None, {"a": [4, 5, 0], "b": []})
    assert method.picked["a"].tolist() == [0, 3, 6] and method.picked["b"].tolist() == [0, 2]


# ---------------------------------------------------------------------------------- refusals
def snapshot(model, opt):
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})


def assert_unchanged(model, opt, before):
    after = snapshot(model, opt)
    for key, value in before["model"].items():
        assert torch.equal(after["model"][key], value), key
    assert after["opt"]["state"].keys() == before["opt"]["state"].keys()
    for key, state in before["opt"]["state"].items():
        for name, value in state.items():
            other = after["opt"]["state"][key][name]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


def pruned_mlp(**kw):
    model = cases.build("mlp")
    opt = cases.optimizer("sgd", model.parameters())
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, **kw), example_inputs=cases.probe("mlp"))
    cases.train_steps(model, opt, cases.batches("mlp", 2))
    return model, opt, pruner


def test_unstructured_pruning_is_refused_and_nothing_changes():
    model, opt, pruner = pruned_mlp()
    before = snapshot(model, opt)
    with pytest.raises(ShrinkError, match="unstructured"):
        pruner.shrink()
    assert_unchanged(model, opt, before)
    other = cases.build("mlp")
    with pytest.raises(ValueError, match="shrink_after_prune"):
        sparsetrain.Pruner(other, cases.optimizer("sgd", other.parameters()), methods.Magnitude(0.5),
                           shrink_after_prune=True)  # fmt: skip


def test_uncoupled_groups_are_refused():
    model = cases.build("mlp")
    opt = cases.optimizer("sgd", model.parameters())
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), coupled=False)
    before = snapshot(model, opt)
    with pytest.raises(ShrinkError, match="coupled"):
        pruner.shrink()
    assert_unchanged(model, opt, before)


def test_optimizer_state_that_cannot_be_sliced_is_refused():
    model = cases.build("mlp")
    pruner = MaskedPruner(model, methods.Magnitude(0.5, structure="filters"), example_inputs=cases.probe("mlp"))
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)  # factored second moments: row and column vectors
    cases.train_steps(model, opt, cases.batches("mlp", 2), after=lambda: pruner.step(opt))
    before = snapshot(model, opt)
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(ShrinkError, match="row_var|col_var"):
        pruner.shrink(optimizers=[opt])
    assert_unchanged(model, opt, before)
    assert [tuple(p.shape) for p in model.parameters()] == shapes
    cases.train_steps(model, opt, cases.batches("mlp", 1), after=lambda: pruner.step(opt))  # masks still in place


def test_auto_shrink_under_ddp_is_refused(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = cases.build("mlp")
        net = nn.parallel.DistributedDataParallel(model)
        opt = cases.optimizer("sgd", model.parameters())
        with pytest.raises(ValueError, match="DistributedDataParallel"):
            sparsetrain.Pruner(net, opt, methods.Magnitude(0.5, structure="filters"),
                               example_inputs=cases.probe("mlp"), shrink_after_prune=True)  # fmt: skip
        assert opt.pruner is None and "mask_words" not in opt.state[model.fc1.weight]
    finally:
        dist.destroy_process_group()


def test_a_compiled_model_is_refused():
    model = cases.build("mlp")
    opt = cases.optimizer("sgd", model.parameters())
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"),
                                example_inputs=cases.probe("mlp"))  # fmt: skip
    pruner.model = torch.compile(model)  # what a loop holding the compiled module would hand over
    with pytest.raises(ShrinkError, match="torch.compile"):
        pruner.shrink()


def test_nothing_dead_is_a_no_op():
    model = cases.build("mlp")
    opt = cases.optimizer("sgd", model.parameters())
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters", start=100),
                                example_inputs=cases.probe("mlp"))  # fmt: skip
    before = snapshot(model, opt)
    assert pruner.shrink() is model
    assert pruner.shrinks == []
    assert_unchanged(model, opt, before)


def test_rebuild_refuses_a_state_without_shrinks():
    with pytest.raises(ValueError, match="no shrink"):
        rebuild(cases.build("mlp"), {"shrinks": []}, cases.probe("mlp"))
    with pytest.raises(ValueError, match="does not have"):
        rebuild(cases.build("mlp"), [{"nope": [0]}], cases.probe("mlp"))
    with pytest.raises(ValueError, match="channel index"):
        rebuild(cases.build("mlp"), [{"fc1": [0.5]}], cases.probe("mlp"))
    model = cases.build("mlp")
    opt = cases.optimizer("sgd", model.parameters())
    pruner = sparsetrain.Pruner(model, opt, cases.method("oneshot"), example_inputs=cases.probe("mlp"))
    state = pruner.state_dict()
    with pytest.raises(ValueError, match="channel index"):
        pruner.load_state_dict({**state, "shrinks": [{"fc1": "all"}]})
    assert pruner.shrinks == []


def test_the_shrink_benchmark_runs_and_counts_fewer_macs(tmp_path):
    from sparsetrain.benchmarks import shrink as bench

    report = bench.run(torch.device("cpu"), size="quick", steps=1, warmup=0, command="test", progress=False)
    assert [r["model"] for r in report["rows"]] == ["resnet-cnn", "transformer-mlp"] and report["complete"]
    for row in report["rows"]:
        assert row["params_after"] < 0.6 * row["params_before"] and 0.2 < row["mac_ratio"] < 0.6
    assert "| resnet-cnn (" in bench.markdown(report)


@pytest.mark.parametrize("passed", ["none", "one of two"])
def test_masked_pruner_refuses_to_step_without_the_optimizers_it_would_leave_stale(passed):
    model = cases.build("cnn")
    pruner = MaskedPruner(model, cases.method("oneshot"), example_inputs=cases.probe("cnn"), shrink_after_prune=True)
    weights = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]  # biases and BatchNorm entries: shrunk too
    opt = torch.optim.AdamW(weights, lr=3e-3)
    other = torch.optim.SGD(rest, lr=1e-2, momentum=0.9)
    given = () if passed == "none" else (opt,)
    x, y = cases.batches("cnn", 1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    other.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(ValueError, match="SGD" if given else "AdamW, SGD|SGD, AdamW"):
        pruner.step(*given)
    assert pruner.step_count == 0 and not pruner.shrinks
    assert [tuple(p.shape) for p in model.parameters()] == shapes
    # with both, the run goes on through the shrink at step 5 and both optimizers' states are sliced
    for x, y in cases.batches("cnn", 8):
        opt.zero_grad()
        other.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        other.step()
        pruner.step(opt, other)
    assert len(pruner.shrinks) == 1
    for o in (opt, other):
        for p, state in o.state.items():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert value.shape == p.shape


class _PositionalConv(nn.Module):
    """wav2vec2's shape in small: a weight-normed convolution added to the stream, then a prunable pair."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.pos = weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2)
        self.c1 = nn.Conv1d(4, 7, 1)
        self.c2 = nn.Conv1d(7, 4, 1)

    def forward(self, x):
        x = x + self.pos(x)
        return self.c2(torch.relu(self.c1(x)))


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_a_parametrized_layer_no_group_changes_shrinks_and_keeps_its_parametrization(path):
    torch.manual_seed(0)
    model, x = _PositionalConv(), torch.randn(3, 4, 9)
    method = methods.Magnitude(0.5, structure="filters")
    if path == "fused":
        pruner = sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), method, example_inputs=x)
    else:
        pruner = MaskedPruner(model, method, example_inputs=x)
    assert [g.name for g in pruner.groups.groups] == ["c1"]
    assert "weight is parametrized (_WeightNorm)" in pruner.groups.skipped["pos"]  # two tensors: its group is left out
    g, v = model.pos.parametrizations.weight.original0, model.pos.parametrizations.weight.original1
    pos_weight = model.pos.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        want = model(x)
    assert pruner.shrink() is model
    assert model.c1.weight.shape == (3, 4, 1) and model.c2.weight.shape == (4, 3, 1)
    assert parametrize.is_parametrized(model.pos, "weight")
    assert model.pos.parametrizations.weight.original0 is g and model.pos.parametrizations.weight.original1 is v
    torch.testing.assert_close(model.pos.weight, pos_weight, rtol=0, atol=0)
    if path == "autograd":  # the masks are back on the shrunk layers
        assert parametrize.is_parametrized(model.c1, "weight") and parametrize.is_parametrized(model.c2, "weight")
    with torch.no_grad():
        close(model(x), want)


def test_a_parametrized_layer_the_shrink_would_change_is_refused_by_name():
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model, x = _PositionalConv(), torch.randn(3, 4, 9)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), example_inputs=x)
    spectral_norm(model.c1)  # added after tracing: the same Parameter, now the parametrization's original
    before = snapshot(model, opt)
    with pytest.raises(ShrinkError, match=r"'c1' \(ParametrizedConv1d\) would change shape.*weight has parametriz"):
        pruner.shrink()
    assert_unchanged(model, opt, before)
    assert model.c1.parametrizations.weight.original.shape == (7, 4, 1)
    assert parametrize.is_parametrized(model.c1, "weight") and parametrize.is_parametrized(model.pos, "weight")


def test_wav2vec2_with_its_weight_normed_positional_convolution_shrinks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        num_feat_extract_layers=2,
    )  # fmt: skip
    model = transformers.Wav2Vec2Model(config).eval()
    x = {"input_values": torch.randn(2, 200)}
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="neurons"), example_inputs=x,
                                include=["encoder.layers.0.feed_forward.intermediate_dense"])  # fmt: skip
    with torch.no_grad():
        want = model(**x).last_hidden_state
    pruner.shrink()
    assert model.encoder.layers[0].feed_forward.intermediate_dense.weight.shape == (12, 16)
    assert parametrize.is_parametrized(model.encoder.pos_conv_embed.conv, "weight")
    with torch.no_grad():
        close(model(**x).last_hidden_state, want)


class _TiedBranches(nn.Module):
    """One weight in two parallel layers whose outputs are added: a unit is a row of it in both."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.c = nn.Linear(7, 9), nn.Linear(7, 9), nn.Linear(9, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + torch.tanh(self.b(2 * x)))


def test_a_tied_weight_cut_alike_in_every_user_shrinks_and_stays_tied():
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 7, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(12)]
    probe = data[0][0]

    def run(shrink):
        model = _TiedBranches()
        opt = cases.optimizer("sgd", model.parameters())
        method = methods.Magnitude(1 / 3, structure="filters", start=4)
        pruner = sparsetrain.Pruner(model, opt, method, example_inputs=probe, shrink_after_prune=shrink)
        return model, opt, pruner, cases.train_steps(model, opt, data)

    masked, _, _, masked_losses = run(False)
    small, opt, pruner, losses = run(True)
    assert len(pruner.shrinks) == 1 and small.a.weight is small.b.weight and small.a.weight.shape == (6, 7)
    assert opt.state[small.a.weight]["momentum_buffer"].shape == (6, 7)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(masked_losses), rtol=1e-4, atol=0)
    close(cases.outputs(small, probe), cases.outputs(masked, probe))
    fresh = rebuild(_TiedBranches(seed=1), pruner.state_dict(), probe)
    assert fresh.a.weight is fresh.b.weight
    fresh.load_state_dict(small.state_dict())
    torch.testing.assert_close(cases.outputs(fresh, probe), cases.outputs(small, probe), rtol=0, atol=0)


def test_a_masked_pruner_shrinks_a_tied_weight_and_keeps_one_mask_for_both_users():
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, 7, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(10)]
    probe = data[0][0]
    runs = []
    for shrink in (False, True):
        model = _TiedBranches()
        method = methods.Magnitude(1 / 3, structure="filters", start=4)
        pruner = MaskedPruner(model, method, example_inputs=probe, shrink_after_prune=shrink, backend="torch")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        runs.append((model, cases.train_steps(model, opt, data, after=lambda p=pruner, o=opt: p.step(o))))
    (masked, masked_losses), (small, losses) = runs
    assert small.a.parametrizations.weight.original is small.b.parametrizations.weight.original
    assert small.a.weight.shape == (6, 7) and masked.a.weight.shape == (9, 7)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(masked_losses), rtol=1e-4, atol=0)
    close(cases.outputs(small, probe), cases.outputs(masked, probe))
