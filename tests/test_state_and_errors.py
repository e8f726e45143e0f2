"""state_dict round trips, skip_nonfinite, and clear errors on bad input with nothing modified."""

import copy
import io

import pytest
import torch
from helpers import make_params, set_grads

import sparsetrain
from sparsetrain import BackendUnavailableError

SHAPES = [(29, 7), (31,), (5, 3, 3)]


def _build(name, params, pruning):
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3} if name == "SGD" else {"lr": 1e-2, "amsgrad": True}
    opt = getattr(sparsetrain.optim, name)(params, backend="torch", seed=1234, **kw)
    if pruning:
        for p in params[:2]:
            opt.enable_pruning(p)
            opt.set_coefs(p, l2=1e-3, temperature=1.0, prune_count=p.numel() * 0.05, threshold=0.05)
    return opt


def _run(opt, params, steps):
    for step in steps:
        set_grads([params], step)
        if opt.state[params[0]].get("mask_words") is not None and step % 4 == 3:
            opt.schedule_pruning("stochastic" if step % 8 == 3 else "low")
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("pruning", [False, True])
def test_resume_is_bit_identical(name, pruning):
    straight = make_params(SHAPES)
    resumed = [p.detach().clone().requires_grad_() for p in straight]
    opt = _build(name, straight, pruning)
    _run(opt, straight, range(30))

    first = _build(name, resumed, pruning)
    _run(first, resumed, range(13))
    buffer = io.BytesIO()
    torch.save({"model": [p.detach() for p in resumed], "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh_params = [t.clone().requires_grad_() for t in saved["model"]]
    fresh = _build(name, fresh_params, False)
    fresh.load_state_dict(saved["opt"])
    _run(fresh, fresh_params, range(13, 30))

    for a, b in zip(straight, fresh_params):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(straight, fresh_params):
        assert torch.equal(opt.mask(a), fresh.mask(b))
        for key, value in opt.state[a].items():
            other = fresh.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    if pruning:
        assert not opt.mask(straight[0]).all()


def test_skip_nonfinite_leaves_everything_untouched():
    params = make_params(SHAPES)
    opt = _build("SGD", params, pruning=True)
    opt.skip_nonfinite = True
    _run(opt, params, range(3))
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    set_grads([params], 99)
    params[2].grad[0, 0, 0] = float("nan")
    opt.schedule_pruning("low")
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(weights, params))
    after = opt.state_dict()
    for key, state in before["state"].items():
        for field, value in state.items():
            assert torch.equal(value, after["state"][key][field]) if isinstance(value, torch.Tensor) else True
    params[2].grad[0, 0, 0] = float("inf")
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(weights, params))


def test_bad_params_are_rejected():
    with pytest.raises(TypeError, match="parameter 1 of param group 0 has dtype torch.int64"):
        sparsetrain.optim.SGD([torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(TypeError, match="complex"):
        sparsetrain.optim.Adam([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        sparsetrain.optim.SGD(make_params([(3,)]), lr=0.1, backend="tpu")
    with pytest.raises(ValueError, match="Nesterov"):
        sparsetrain.optim.SGD(make_params([(3,)]), lr=0.1, nesterov=True)


def test_unusable_backend_names_the_reason(monkeypatch):
    from sparsetrain import backends

    reason = "the extension sparsetrain._C is not available (not built: no C++ compiler)"
    usable = backends.availability
    monkeypatch.setattr(backends, "availability", lambda name: (False, reason) if name == "native" else usable(name))
    params = make_params([(3,)])
    with pytest.raises(BackendUnavailableError, match=r"backend 'native' is not usable here: .*not built: no C\+\+"):
        sparsetrain.optim.SGD(params, lr=0.1, backend="native")
    monkeypatch.setenv("SPARSETRAIN_BACKEND", "native")
    with pytest.raises(BackendUnavailableError, match="backend 'native' is not usable here"):
        sparsetrain.optim.Adam(params)
    monkeypatch.setenv("SPARSETRAIN_BACKEND", "auto")  # auto falls back to the reference
    assert sparsetrain.optim.Adam(params).backend == "torch" == backends.resolve(None, params[0].device)


def test_sparse_grad_and_mixed_devices_modify_nothing():
    params = make_params([(4, 3), (5,)])
    opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones(4, 3)
    params[1].grad = torch.ones(5).to_sparse()
    before = [p.detach().clone() for p in params]
    sparse = r"parameter 1 of param group 0 \(shape \(5,\), dtype torch.float32\) has a sparse gradient"
    with pytest.raises(RuntimeError, match=sparse):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert float(opt.state[params[0]]["step"]) == 0
    meta = torch.zeros(5, device="meta", requires_grad=True)
    opt.add_param_group({"params": [meta]})
    params[1].grad = torch.ones(5)
    meta.grad = torch.zeros(5, device="meta")
    with pytest.raises(RuntimeError, match="is on meta .* earlier parameters are on cpu"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_state_dict_from_other_model_or_class_is_rejected():
    params = make_params(SHAPES)
    opt = _build("SGD", params, pruning=True)
    _run(opt, params, range(2))
    sd = opt.state_dict()
    other = sparsetrain.optim.SGD(make_params([(29, 7), (30,), (5, 3, 3)]), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="belongs to another model"):
        other.load_state_dict(sd)
    adam = _build("Adam", make_params(SHAPES), pruning=False)
    with pytest.raises(ValueError, match="saved by SGD, not Adam"):
        adam.load_state_dict(sd)
    torch_sd = torch.optim.Adam(make_params(SHAPES), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="lacks .*'momentum'"):
        opt.load_state_dict(torch_sd)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], sd["state"][0]["momentum_buffer"])


def test_capturable_needs_a_device_side_backend_and_keeps_lr_on_device():
    with pytest.raises(ValueError, match="capturable=True needs the triton backend"):
        sparsetrain.optim.SGD(make_params([(3,)]), lr=0.1, backend="torch", capturable=True)
    from conftest import DEVICE, triton_usable

    if not triton_usable()[0]:
        pytest.skip(triton_usable()[1])
    params = make_params([(40, 3)], device=DEVICE)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = sparsetrain.optim.AdamW(params, lr=0.01, backend="triton", capturable=True)
    ref = torch.optim.AdamW(ref_params, lr=0.01)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for step in range(5):
        set_grads([params, ref_params], step)
        opt.step()
        ref.step()
    torch.testing.assert_close(params[0], ref_params[0], rtol=1e-6, atol=1e-7)


def test_set_mask_leaves_statistics_of_a_parameter_shaped_like_them_alone():
    """A parameter with as many elements as the stats vector: set_mask multiplied the stats by the mask."""
    from sparsetrain.contract import NUM_STATS, STAT_SUM_ABS_G

    param = torch.nn.Parameter(torch.randn(NUM_STATS))
    opt = sparsetrain.optim.SGD([param], lr=0.1, momentum=0.9)
    opt.enable_pruning(param)
    param.grad = torch.randn(NUM_STATS)
    opt.step()
    before = opt.state[param]["stats"][STAT_SUM_ABS_G].clone()
    alive = torch.ones(NUM_STATS, dtype=torch.bool)
    alive[STAT_SUM_ABS_G] = False
    opt.set_mask(param, alive)
    torch.testing.assert_close(opt.state[param]["stats"][STAT_SUM_ABS_G], before)
    assert opt.state[param]["momentum_buffer"][STAT_SUM_ABS_G] == 0
