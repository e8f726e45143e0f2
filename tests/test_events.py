"""Pruning events are promises: compiled steps, tensors without a gradient, skipped non-finite steps
and resumes from the optimizer's state_dict all give the masks of the plain, uninterrupted run."""

import io
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import sparsetrain
from sparsetrain import methods

STEPS = 12
METHODS = {
    "magnitude-oneshot": lambda: methods.Magnitude(0.6),
    "magnitude-oneshot-later": lambda: methods.Magnitude(0.6, start=3),
    "magnitude-linear": lambda: methods.Magnitude(0.6, schedule="linear", start=0, end=8, interval=2),
    "magnitude-cubic-global": lambda: methods.Magnitude(
        0.6, schedule="cubic", start=1, end=9, interval=2, scope="global"
    ),
    "magnitude-largest": lambda: methods.Magnitude(0.3, largest=True, schedule="linear", start=0, end=8, interval=2),
    "magnitude-filters": lambda: methods.Magnitude(
        0.5, structure="filters", schedule="linear", start=0, end=8, interval=4
    ),
    "stochastic-l1": lambda: methods.StochasticMagnitude(0.6, start=1, end=9, interval=2, temperature=0.5, l1=2e-2),
    "selective": lambda: methods.SelectiveDecay(0.6, start=0, end=8, interval=2),
    "greg1": lambda: methods.GReg1(0.5, update_interval=2, delta=0.05, ceiling=0.2, stabilize=2),
    "greg2": lambda: methods.GReg2(
        0.5, update_interval=2, delta=0.05, ceiling=0.1, stabilize=2, delta_all=0.01, warm_ceiling=0.02
    ),
}

# Structured methods prune each layer's own filters here (coupled=False): these tests are about when
# decisions happen, and per-layer masks make the expected sparsity of every tensor the target.


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def _build(method, opt_name="SGD", seed=0, **opt_kw):
    model = _mlp(seed)
    kw = {"lr": 0.05, "momentum": 0.9} if opt_name == "SGD" else {"lr": 1e-2}
    opt = getattr(sparsetrain.optim, opt_name)(model.parameters(), backend="torch", seed=7, **kw, **opt_kw)
    return model, opt, sparsetrain.Pruner(model, opt, METHODS[method](), record_every=2, coupled=False)


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 6, generator=gen), torch.randn(5, 4, generator=gen)


def _train(model, opt, steps, step_fn=None, poison=()):
    for step in steps:
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        if step in poison:
            model[2].weight.grad[0, 0] = float("nan")
        (step_fn or opt.step)()
        opt.zero_grad()


def _assert_same_run(a, b):
    (model_a, opt_a, pruner_a), (model_b, opt_b, pruner_b) = a, b
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    for t_a, t_b in zip(pruner_a.targets, pruner_b.targets):
        assert torch.equal(pruner_a.mask(t_a.param), pruner_b.mask(t_b.param)), t_a.name
    assert pruner_a.step_count == pruner_b.step_count
    assert opt_a.prune_events == opt_b.prune_events
    history_a, history_b = pruner_a.history.as_dict(), pruner_b.history.as_dict()
    torch.testing.assert_close(history_a, history_b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_step_equals_eager_with_one_compilation(method):
    eager = _build(method)
    _train(eager[0], eager[1], range(STEPS))
    compiled = _build(method)
    torch._dynamo.reset()  # every test's optimizer is a new object for the same compiled code
    counter = CompileCounter()
    step = torch.compile(compiled[1].step, backend=counter, fullgraph=True)
    _train(compiled[0], compiled[1], range(STEPS), step_fn=step)
    _assert_same_run(eager, compiled)
    assert counter.frame_count == 1
    assert any(not eager[2].mask(t.param).all() for t in eager[2].targets)


def test_compiled_step_through_aot_autograd_stochastic_adam():
    eager = _build("stochastic-l1", "AdamW")
    _train(eager[0], eager[1], range(STEPS))
    compiled = _build("stochastic-l1", "AdamW")
    torch._dynamo.reset()
    step = torch.compile(compiled[1].step, backend="aot_eager", fullgraph=True)
    _train(compiled[0], compiled[1], range(STEPS), step_fn=step)
    _assert_same_run(eager, compiled)
    assert compiled[1].prune_events == 5


@pytest.mark.parametrize("method", ["greg1", "stochastic-l1", "magnitude-linear"])
def test_tensor_without_gradient_on_an_event_step_gets_its_decision(method):
    model, opt, pruner = _build(method)
    parity = 0 if method.startswith("magnitude") else 1  # events: even steps; odd for stochastic, GReg's prune 11
    for step in range(STEPS):
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        if step % 2 == parity:  # the middle layer's gradients are missing on every event step
            model[2].weight.grad = model[2].bias.grad = None
        opt.step()
        opt.zero_grad()
    ratio = 0.5 if method == "greg1" else 0.6
    for t in pruner.targets:
        sparsity = float((~pruner.mask(t.param)).float().mean())
        assert sparsity == pytest.approx(ratio, abs=0.12 if method == "stochastic-l1" else 0.01), t.name
        assert torch.equal(t.param.detach() == 0, ~pruner.mask(t.param) | (t.param.detach() == 0))
    if method == "greg1":
        assert pruner.method.phase == "pruned" and pruner.method.pruned_at % 2 == parity


@pytest.mark.parametrize("method", ["greg1", "stochastic-l1", "magnitude-linear", "magnitude-oneshot-later"])
def test_skipped_nonfinite_step_changes_nothing_and_keeps_the_event(method):
    # steps 3, 4, 5 (events of every method here) first come poisoned: the run equals one without them
    poisoned = _build(method, skip_nonfinite=True)
    _train(poisoned[0], poisoned[1], [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10, 11], poison=_Once({3, 4, 5}))
    clean = _build(method, skip_nonfinite=True)
    _train(clean[0], clean[1], range(STEPS))
    _assert_same_run(clean, poisoned)
    target = 0.5 if method == "greg1" else 0.6
    for t in clean[2].targets:
        assert float((~clean[2].mask(t.param)).float().mean()) == pytest.approx(target, abs=0.12), t.name


@pytest.mark.parametrize("method", ["greg1", "stochastic-l1"])
def test_a_step_the_grad_scaler_skips_changes_nothing_and_keeps_the_event(method):
    """torch.amp.GradScaler (unscale_, clipping, scaler.step, update) under bfloat16 autocast: a step whose
    gradients hold inf is never handed to the optimizer, and the run equals one without it. Power-of-two scales
    are exact, so weights, masks, history and counts are bit-identical."""

    def run(steps, poison):
        built = _build(method)
        model, opt, _ = built
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
        for step in steps:
            x, y = _batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss * (float("inf") if step in poison else 1.0)).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return built

    poisoned = run([0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11], _Once({3, 4}))
    _assert_same_run(run(range(STEPS), ()), poisoned)


@pytest.mark.parametrize("method", ["greg1", "magnitude-linear"])
def test_a_skipped_step_with_a_closure_keeps_the_event_too(method):
    """With ``opt.step(closure)`` the pruner scheduled before the closure made the gradients, so it never saw
    a non-finite step: the schedule and the step count advanced on steps skip_nonfinite=True skipped (GReg
    grew its penalty, Magnitude spent its event). It now schedules once the closure has run."""
    poisoned, poison = _build(method, skip_nonfinite=True), _Once({3, 4, 5})
    model, opt, _ = poisoned
    for step in [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10, 11]:

        def closure(step=step):
            opt.zero_grad()
            x, y = _batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step in poison:
                model[2].weight.grad[0, 0] = float("nan")
            return loss

        opt.step(closure)
    clean = _build(method, skip_nonfinite=True)
    _train(clean[0], clean[1], range(STEPS))
    _assert_same_run(clean, poisoned)


class _Once:
    """A set of steps, each held only the first time it is asked for."""

    def __init__(self, steps):
        self.steps = set(steps)

    def __contains__(self, step):
        if step in self.steps:
            self.steps.remove(step)
            return True
        return False


def _save(model, opt):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_from_optimizer_state_dict_at_every_step_is_bit_identical(method):
    straight = _build(method)
    _train(straight[0], straight[1], range(STEPS))
    first = _build(method)
    for stop in range(1, STEPS):
        _train(first[0], first[1], [stop - 1])
        saved = _save(first[0], first[1])
        model = _mlp(seed=99)  # other initial weights: everything must come from the checkpoint
        model.load_state_dict(saved["model"])
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="torch", seed=7)
        if stop % 2:  # the pruner built before or after loading: both resume
            with warnings.catch_warnings():  # the loaded model may be above its target: a warning, not an error
                warnings.simplefilter("ignore")
                pruner = sparsetrain.Pruner(model, opt, METHODS[method](), record_every=2, coupled=False)
            opt.load_state_dict(saved["opt"])
        else:
            opt.load_state_dict(saved["opt"])
            pruner = sparsetrain.Pruner(model, opt, METHODS[method](), record_every=2, coupled=False)
        assert pruner.step_count == stop
        _train(model, opt, range(stop, STEPS))
        _assert_same_run(straight, (model, opt, pruner))


def test_saved_pruner_state_of_other_targets_is_refused():
    model, opt, pruner = _build("magnitude-linear")
    _train(model, opt, range(2))
    saved = opt.state_dict()
    other_model = _mlp()
    other = sparsetrain.optim.SGD(other_model.parameters(), lr=0.05, momentum=0.9, backend="torch")
    other.load_state_dict(saved)
    with pytest.raises(ValueError, match="saved pruner state prunes"):
        sparsetrain.Pruner(other_model, other, METHODS["magnitude-linear"](), exclude=["4"])


@pytest.mark.parametrize("schedule", ["oneshot", "linear", "cubic"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_largest_reaches_its_target(schedule, scope):
    model = _mlp(3)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="torch")
    end = 0 if schedule == "oneshot" else 8
    method = methods.Magnitude(0.3, largest=True, schedule=schedule, start=0, end=end, interval=2, scope=scope)
    pruner = sparsetrain.Pruner(model, opt, method)
    _train(model, opt, range(STEPS))
    # iterative events decide on the updated weights against thresholds of the step before: within 3%
    # (without the correction for the weights already pruned, linear gave 90% and cubic 100%)
    dead = [(~pruner.mask(t.param)).sum().item() for t in pruner.targets]
    sizes = [t.param.numel() for t in pruner.targets]
    if scope == "layer":
        for d, n in zip(dead, sizes):
            assert d / n == pytest.approx(round(0.3 * n) / n, abs=0 if schedule == "oneshot" else 0.03)
    else:
        total = sum(sizes)
        assert sum(dead) / total == pytest.approx(round(0.3 * total) / total, abs=0 if schedule == "oneshot" else 0.03)


@pytest.mark.parametrize("prune", ["low", "stochastic"])
def test_an_event_step_refuses_cuda_graph_capture_before_anything_changes(monkeypatch, prune):
    """CPU stand-in for a capture (the capture state is mocked; tests/test_gpu.py captures for real): an
    event's host-chosen seeds and decision would be replayed by every replay, so the step is refused."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(37, 5))
    opt = sparsetrain.optim.SGD([w], lr=0.1, momentum=0.9, backend="torch")
    opt.enable_pruning(w)
    opt.set_coefs(w, threshold=0.5, prune_count=3.0, temperature=1.0)
    w.grad = torch.randn_like(w)
    opt.step()  # statistics for the stochastic rule
    w.grad = torch.randn_like(w)
    state = {k: v for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}  # every tensor of the state
    before = (w.detach().clone(), {k: v.clone() for k, v in state.items()}, opt.prune_events)
    opt.schedule_pruning(prune)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=rf"pruning event \('{prune}'\).*captured in a CUDA graph"):
        opt.step()
    torch.testing.assert_close(w.detach(), before[0], rtol=0, atol=0)
    for key, value in before[1].items():
        torch.testing.assert_close(opt.state[w][key], value, rtol=0, atol=0)
    assert opt.prune_events == before[2] and opt._pending_prune == prune  # the event stays pending
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step()  # outside the capture the event is taken
    assert opt._pending_prune == "none" and opt.prune_events == before[2] + (prune == "stochastic")


def test_a_step_without_an_event_is_not_refused_under_capture(monkeypatch):
    w = nn.Parameter(torch.randn(9, 4))
    opt = sparsetrain.optim.SGD([w], lr=0.1, backend="torch")
    opt.enable_pruning(w)
    w.grad = torch.ones_like(w)
    expected = w.detach() - 0.1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    opt.step()
    torch.testing.assert_close(w.detach(), expected)
