"""GPU-only checks (skipped without CUDA): compiled Triton kernels at scale, CUDA graphs, no host syncs."""

import copy

import pytest
import torch
from helpers import clone_params, make_params, max_rel_err, set_grads

import sparsetrain
from sparsetrain import contract, masks, ops, philox

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _big_step(n, algo, backend, prune, seed=0):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    w = torch.randn(n, device=CUDA, generator=gen)
    g = torch.randn(n, device=CUDA, generator=gen)
    alive = torch.rand(n, device=CUDA, generator=gen) < 0.9
    w *= alive
    states = [torch.rand(n, device=CUDA, generator=gen) * alive for _ in range(3)]
    stats = torch.tensor(
        [float(alive.sum()), float(w.abs().sum()), float(torch.exp(-w.abs() / 0.5).mul(alive).sum()), 0.8 * n, 0.5],
        dtype=torch.float64,
        device=CUDA,
    )
    coefs = torch.zeros(contract.NUM_COEFS, device=CUDA)
    coefs[contract.COEF_L2], coefs[contract.COEF_PRUNE_COUNT], coefs[contract.COEF_TEMPERATURE] = 1e-3, 0.05 * n, 1.0
    coefs[contract.COEF_THRESHOLD] = 0.1
    x = dict(
        w=w, g=g, states=states, mask=masks.pack(alive), stats=stats, coefs=coefs, step=torch.tensor(2.0, device=CUDA)
    )
    common = dict(
        mask_words=[x["mask"]],
        stats=[stats],
        tensor_coefs=[coefs],
        group_coefs=[],
        group_inner=[],
        shard_offsets=[],
        seeds=torch.tensor([philox.event_seed(seed, 0, 0)], device=CUDA),
        found_inf=None,
        lr=0.01,
        lr_tensor=None,
        prune=prune,
        regularize=True,
        l1_proximal=True,
        backend=backend,
    )
    if algo == "sgd":
        ops.sgd_step_(
            [w],
            [g],
            [states[0]],
            [x["step"]],
            weight_decay=0.0,
            momentum=0.9,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            **common,
        )
    else:
        ops.adam_step_(
            [w],
            [g],
            [states[0]],
            [states[1]],
            [states[2]],
            [x["step"]],
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            decoupled=True,
            amsgrad=True,
            maximize=False,
            **common,
        )
    return x


@pytest.mark.parametrize("algo,prune", [("sgd", "stochastic"), ("adam", "low")])
def test_1e8_elements_match_reference(algo, prune):
    n = 100_000_003
    ref = _big_step(n, algo, "torch", prune)
    out = _big_step(n, algo, "triton", prune)
    torch.testing.assert_close(out["w"], ref["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["stats"], ref["stats"], rtol=1e-6, atol=1e-6)
    differ = masks.unpack(out["mask"], n) != masks.unpack(ref["mask"], n)
    assert int(differ.sum()) <= n * 1e-6  # only the tie band |u - q| < 1e-6 may differ


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_optimizer_parity_on_cuda(name):
    kwargs = {
        "SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        "Adam": dict(lr=1e-2, amsgrad=True),
        "AdamW": dict(lr=1e-2, weight_decay=0.1),
    }[name]
    ours = make_params([(1025, 3), (33,), (7, 7, 7)], device=CUDA)
    ref = clone_params(ours)
    a = getattr(sparsetrain.optim, name)(ours, backend="triton", **kwargs)
    b = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    for step in range(50):
        set_grads([ours, ref], step)
        a.step()
        b.step()
    assert max_rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("prune", ["low", "stochastic"])
def test_an_event_step_is_refused_inside_a_cuda_graph_capture(prune):
    params = make_params([(4097,)], device=CUDA)
    opt = sparsetrain.optim.SGD(params, lr=0.05, momentum=0.9, backend="triton", capturable=True)
    opt.enable_pruning(params[0])
    opt.set_coefs(params[0], threshold=0.1, prune_count=10.0, temperature=1.0)
    set_grads([params], 0)
    opt.step()  # warm-up and statistics outside the graph
    before = params[0].detach().clone()
    opt.schedule_pruning(prune)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.testing.assert_close(params[0].detach(), before, rtol=0, atol=0)
    assert opt._pending_prune == prune
    opt.step()  # eagerly, the event is taken
    assert opt._pending_prune == "none"


def test_cuda_graph_capture_matches_eager_and_has_no_host_sync():
    params = make_params([(4097,), (31, 9)], device=CUDA)
    eager = clone_params(params)
    opts = [
        sparsetrain.optim.SGD(p, lr=0.05, momentum=0.9, backend="triton", capturable=True, skip_nonfinite=True)
        for p in (params, eager)
    ]
    for opt, ps in zip(opts, (params, eager)):
        for p in ps:
            opt.enable_pruning(p)
            opt.set_coefs(p, l2=1e-3)
    set_grads([params, eager], 0)
    opts[0].step()  # warm-up builds the launch plan outside the graph
    opts[1].step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for opt in opts:
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[0].step()
    for _ in range(3):
        graph.replay()
        opts[1].step()
    torch.cuda.synchronize()
    # both: warm-up + sync-checked step + 3 (replays of the captured step, or eager steps) = 5 steps
    for a, b in zip(params, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_four_linear_runs_on_semi_structured_kernels():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs sm_80 or later")
    from sparsetrain.backends.torch_ref import nm_keep
    from sparsetrain.nm import to_semi_structured

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).to(CUDA).half()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight.view(-1)
            keep = nm_keep(contract.nm_code(2, 4), w.float(), torch.ones_like(w, dtype=torch.bool))
            w.mul_(keep)
    dense = copy.deepcopy(model)
    assert to_semi_structured(model) == ["0", "2"]
    x = torch.randn(64, 256, device=CUDA, dtype=torch.half, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    out, ref = model(x), dense(x_dense)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=2e-2, atol=2e-2)
