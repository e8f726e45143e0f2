"""The autograd path (MaskedPruner with any optimizer): masks in its state, tied weights, masked
biases, metrics of the masked weights, and plain checkpoints of a live model."""

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsetrain import methods
from sparsetrain.autograd import MaskedPruner


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(384, 4),
    )


def _train(model, opt, pruner, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        opt.zero_grad()


def _method():
    return methods.Magnitude(0.6, schedule="linear", start=0, end=8, interval=2)


def test_state_dict_holds_the_masks_and_resumes_bit_identically():
    straight = _cnn()
    pruner = MaskedPruner(straight, _method())
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    _train(straight, opt, pruner, range(12))

    first = _cnn()
    first_pruner = MaskedPruner(first, _method())
    first_opt = torch.optim.AdamW(first.parameters(), lr=1e-2)
    _train(first, first_opt, first_pruner, range(5))
    buffer = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": first_opt.state_dict(), "pruner": first_pruner.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = _cnn(seed=5)
    resumed_pruner = MaskedPruner(resumed, _method())
    resumed.load_state_dict(saved["model"])
    resumed_pruner.load_state_dict(saved["pruner"])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(saved["opt"])
    for t in resumed_pruner.targets:
        assert not resumed_pruner.mask(t.param).all(), t.name
    _train(resumed, resumed_opt, resumed_pruner, range(5, 12))
    for a, b in zip(pruner.targets, resumed_pruner.targets):
        assert torch.equal(pruner.mask(a.param), resumed_pruner.mask(b.param))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed_pruner.step_count == pruner.step_count == 12


def test_metrics_measure_the_masks_with_adamw():
    model = _cnn(1)
    pruner = MaskedPruner(model, methods.Magnitude(0.8, schedule="cubic", end=6, interval=2), record_every=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, pruner, range(10))
    metrics = pruner.metrics()
    for t in pruner.targets:
        dead = float((~pruner.mask(t.param)).float().mean())
        assert dead == pytest.approx(0.8, abs=0.02)
        masked_zero = float((t.module.weight == 0).float().mean())  # what the model computes with
        assert metrics[t.name]["weight_sparsity"] == pytest.approx(masked_zero, abs=1e-7)
        assert pruner.history.as_dict()["layers"][t.name]["weight_sparsity"][-1] == pytest.approx(masked_zero, abs=1e-7)
        assert float((t.param == 0).float().mean()) < 0.5  # AdamW keeps moving the originals


def test_biases_of_pruned_filters_stay_masked():
    model = _cnn(2)
    method = methods.GReg1(0.5, update_interval=1, delta=0.5, ceiling=1.0, stabilize=1)
    pruner = MaskedPruner(model, method, include=["0", "2"], coupled=False)  # each layer's own filters and bias
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, pruner, range(12))
    assert method.phase == "pruned"
    for t in pruner.targets:
        dead = ~pruner.mask(t.param).reshape(t.param.shape[0], -1).any(dim=1)
        assert dead.sum() == t.param.shape[0] // 2
        assert torch.equal(t.module.bias[dead], torch.zeros(int(dead.sum())))
        assert torch.equal(t.module.weight[dead], torch.zeros_like(t.module.weight[dead]))


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=48, n_positions=12, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(config), config


def test_tied_gpt2_weights_are_masked_everywhere_and_save_pretrained_reloads(tmp_path):
    transformers, model, config = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    pruner = MaskedPruner(model, methods.Magnitude(0.5), include=["lm_head"])
    alive = pruner.mask("lm_head")
    assert not alive.all()
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    embedded = model.transformer.wte(ids)
    torch.testing.assert_close(embedded, (model.lm_head.weight * alive)[ids], rtol=0, atol=0)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        live = model(ids).logits
    keys = model.state_dict().keys()
    assert "lm_head.weight" in keys or "transformer.wte.weight" in keys
    assert not any("parametrizations" in k for k in keys)

    model.save_pretrained(tmp_path)
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(plain.transformer.wte.weight, model.transformer.wte.weight)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, live, rtol=0, atol=0)


def test_torch_save_of_a_live_model_loads_into_a_plain_model_and_back():
    model = _cnn(3)
    pruner = MaskedPruner(model, methods.Magnitude(0.5))
    state = model.state_dict()
    assert set(state) == set(_cnn().state_dict())
    plain = _cnn(4)
    plain.load_state_dict(state)  # strict: the plain keys, the masked values
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    for t in pruner.targets:
        assert torch.equal(plain.get_submodule(t.module_name).weight == 0, ~pruner.mask(t.param) | (t.param == 0))
    live = _cnn(5)
    live_pruner = MaskedPruner(live, methods.Magnitude(0.5))
    live.load_state_dict(state)
    live_pruner.load_state_dict(pruner.state_dict())
    torch.testing.assert_close(live(x), model(x), rtol=0, atol=0)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8))


def _adam_steps(model, opt, pruner, steps, before_pruner_step=None):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 8, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if before_pruner_step is not None:
            before_pruner_step(step)
        pruner.step()
        opt.zero_grad()


def test_structured_event_scores_the_masked_weights_not_the_moved_originals():
    # AdamW (no weight decay) keeps moving the masked originals with its moments after the first event;
    # the second event must rank the channels by the weights the model computes with
    model = _mlp(1)
    method = methods.Magnitude(0.5, structure="filters", schedule="linear", start=4, end=24, interval=10)
    pruner = MaskedPruner(model, method, include=["0"], coupled=False)
    (target,) = [t for t in pruner.targets if t.param.dim() == 2]
    opt = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.0)
    seen = {}

    def record(step):
        if step == 24:  # the second event: what the decision should see
            alive_rows = pruner.mask(target.param).any(dim=1)
            original = target.param.detach().abs().sum(dim=1)
            seen["moved"] = original[~alive_rows].min() > original[alive_rows].min()
            seen["scores"] = (target.param.detach() * pruner.mask(target.param)).abs().sum(dim=1)
            seen["alive"] = alive_rows

    _adam_steps(model, opt, pruner, range(25), record)
    assert int((~seen["alive"]).sum()) == 2  # the first event (k = 2 of 10 at half the schedule)
    assert seen["moved"]  # the dead rows' originals grew above a live row's: the case this test is about
    expected_dead = torch.zeros(10, dtype=torch.bool)
    expected_dead[torch.topk(seen["scores"], 5, largest=False).indices] = True  # the dead (scores 0) among them
    assert torch.equal(~pruner.mask(target.param).any(dim=1), expected_dead)
    assert torch.equal(expected_dead & ~seen["alive"], ~seen["alive"])  # nothing dead is revived


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_thresholds_ignore_the_moved_originals(scope):
    # the dead weights are the first of each event's count only if they are read as zeros
    model = _mlp(1)
    method = methods.Magnitude(0.6, scope=scope, schedule="linear", start=4, end=24, interval=10)
    pruner = MaskedPruner(model, method)
    opt = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.0)
    _adam_steps(model, opt, pruner, range(25))
    dead = [int((~pruner.mask(t.param)).sum()) for t in pruner.targets]
    sizes = [t.param.numel() for t in pruner.targets]
    if scope == "layer":
        assert dead == [round(0.6 * n) for n in sizes]
    else:
        assert sum(dead) == round(0.6 * sum(sizes))


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_gradient_embedding_is_refused_before_anything_changes(bag):
    """An nn.Embedding / EmbeddingBag with sparse=True makes sparse gradients, which a masked weight's dense
    gradient (masked, plus regularization) cannot be: refused by name at construction, the model untouched;
    a module switched to sparse=True afterwards is refused in the backward with the same reason."""
    torch.manual_seed(0)
    table = nn.EmbeddingBag(20, 8, mode="sum", sparse=True) if bag else nn.Embedding(20, 8, sparse=True)
    model = nn.Sequential(table, nn.Flatten(), nn.Linear(8 if bag else 40, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0' \(Embedding(Bag)?, sparse=True\).*sparse=False"):
        MaskedPruner(model, methods.Magnitude(0.5), include=["0", "2"])
    assert not hasattr(model[0], "parametrizations")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    table.sparse = False
    pruner = MaskedPruner(model, methods.Magnitude(0.5), include=["0", "2"])
    table.sparse = True
    tokens = torch.randint(0, 20, (4, 5))
    with pytest.raises(RuntimeError, match="sparse=False"):
        model(tokens).sum().backward()
    table.sparse = False
    model(tokens).sum().backward()
    assert model[0].parametrizations.weight.original.grad.layout == torch.strided
    assert pruner.step_count == 0


def _scaled_run(steps, skipped=(), **method_kw):
    """MaskedPruner with torch's AdamW under torch.amp.GradScaler (CPU); the loss is made inf at ``skipped``."""
    model = _cnn()
    pruner = MaskedPruner(model, methods.Magnitude(0.6, schedule="linear", start=0, end=6, interval=2, **method_kw))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if step in skipped else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        pruner.step()
        opt.zero_grad()
    return model, pruner


def test_a_step_the_grad_scaler_skips_leaves_the_schedule_waiting():
    """A training step whose optimizer step torch.amp.GradScaler skipped (inf/NaN gradients) changes nothing, as
    with the fused optimizers: the schedule counts optimizer steps, so the run equals one without those steps
    (an event on a skipped step included: step 2 is one)."""
    clean, clean_pruner = _scaled_run(10)
    skipped, skipped_pruner = _scaled_run(13, skipped=(2, 3, 7))
    assert skipped_pruner.step_count == clean_pruner.step_count == 10
    for t, u in zip(clean_pruner.targets, skipped_pruner.targets):
        assert torch.equal(clean_pruner.mask(t.name), skipped_pruner.mask(u.name)), t.name
    for (name, a), b in zip(clean.state_dict().items(), skipped.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}])
def test_the_schedule_follows_torchs_fused_adamw(impl):
    """torch's fused AdamW step writes the weights without bumping their version counters: the schedule must
    still count its steps (it stalled after the first, pruning nothing more, when steps were told by versions)."""
    model = _cnn()
    pruner = MaskedPruner(model, _method())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **impl)
    _train(model, opt, pruner, range(10))
    assert pruner.step_count == 10
    assert float((~pruner.mask("0.weight")).float().mean()) == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("fused", [False, True])
def test_the_schedule_follows_an_optimizer_step_compiled_after_eager_ones(fused):
    """A compiled optimizer step runs no step-hook bookkeeping, and torch's fused AdamW bumps no version counter:
    pruning must go on once the step is compiled (it stopped: the pruner took every later call for a step the
    GradScaler skipped). Skipping needs inf/NaN gradients as well."""

    def run(compiled):
        model = _cnn()
        pruner = MaskedPruner(model, _method())
        if fused:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        compiled_step = torch.compile(opt.step)
        for step in range(10):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)
            nn.functional.cross_entropy(model(x), y).backward()
            (compiled_step if compiled and step >= 2 else opt.step)()  # eager first: the pruner saw the optimizer
            pruner.step()
            opt.zero_grad()
        return pruner

    eager_pruner, compiled_pruner = run(False), run(True)
    assert compiled_pruner.step_count == eager_pruner.step_count == 10
    for t in eager_pruner.targets:
        assert torch.equal(compiled_pruner.mask(t.name), eager_pruner.mask(t.name)), t.name
    assert float((~compiled_pruner.mask("0.weight")).float().mean()) == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("scaled", [False, True])
def test_the_regularization_gradient_is_scaled_with_the_loss(scaled):
    """Under torch.amp.GradScaler the backward runs on scale * loss, and unscale_ divides every gradient by the
    scale: the masked weight's L2 / L1 gradient, added in that backward, must be scaled too (grad_scaler=), or it
    comes out divided by the scale. Power-of-two scales are exact in fp32: the run equals the unscaled one."""

    def run(scaler):
        model = _cnn()
        method = methods.StochasticMagnitude(0.5, start=2, end=8, interval=2, l2=0.5, l1=0.05)
        pruner = MaskedPruner(model, method, grad_scaler=scaler)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
        for _ in range(9):
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            pruner.step()
            opt.zero_grad()
        return model

    reference = run(torch.amp.GradScaler("cpu", enabled=False))
    scaled_run = run(torch.amp.GradScaler("cpu", init_scale=2.0**16 if scaled else 1.0, growth_interval=2))
    for (name, a), b in zip(reference.state_dict().items(), scaled_run.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        MaskedPruner(_cnn(), methods.Magnitude(0.5), grad_scaler=2.0**16)


_COMPILED_LSTM = """
import torch
from torch import nn
from sparsetrain import methods
from sparsetrain.autograd import MaskedPruner

torch.manual_seed(0)
model = nn.Sequential(nn.LSTM(4, 6, batch_first=True))
pruner = MaskedPruner(model, methods.Magnitude(0.5, schedule="linear", end=2, interval=1), include=["0"])
opt = torch.optim.SGD(model.parameters(), lr=0.1)
compiled = torch.compile(model, backend="eager")
x = torch.randn(3, 5, 4)
for _ in range(3):
    compiled(x)[0].sum().backward()
    opt.step()
    pruner.step()
    opt.zero_grad()
torch.testing.assert_close(compiled(x)[0], pruner.export()(x)[0], rtol=0, atol=0)
print(pruner.step_count)
"""


def test_a_masked_lstm_runs_inside_a_compiled_model():
    """torch.compile traced an LSTM whose weights MaskedPruner masks into heap corruption (the process died):
    the masked recurrent layer now runs eagerly inside the compiled model. In a subprocess, as the failure
    killed the interpreter."""
    done = subprocess.run([sys.executable, "-c", _COMPILED_LSTM], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "3"
