"""torch.library contract: opcheck on every op, and torch.compile(fullgraph=True) keeps the op in the graph."""

import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, triton_usable
from helpers import to_device

import sparsetrain
from sparsetrain import backends, contract, masks, ops


def _pruning_args(params, prune, groups, backend="torch"):
    return dict(
        mask_words=[masks.pack(torch.rand(p.shape) < 0.8) for p in params],
        stats=[torch.tensor([p.numel(), 10.0, 50.0, 3.0, 0.5], dtype=torch.float64) for p in params],
        tensor_coefs=[torch.tensor([1e-3, 1e-3, 0.1, 2.0, 0.3, 4.0, 1.0, 0.0]) for _ in params],
        group_coefs=[torch.rand(2, 3).round() for _ in params] if groups else [],
        group_inner=[p.numel() // 3 for p in params] if groups else [],
        shard_offsets=[0, 2**33 + 5],
        seeds=torch.tensor([11, 12], dtype=torch.int64),
        found_inf=None,
        lr=0.1,
        lr_tensor=None,
        prune=prune,
        regularize=True,
        l1_proximal=True,
        backend=backend,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prune", [m for m in contract.PRUNE_MODES if m != "nm"])  # N:M: tests/test_nm.py
def test_opcheck_sgd(prune, backend):
    if backend == "triton" and not triton_usable()[0]:
        pytest.skip(triton_usable()[1])
    params = [torch.randn(6, 5), torch.randn(9)]
    args = (
        params,
        [torch.randn_like(p) for p in params],
        [torch.randn_like(p) for p in params],
        [torch.ones(()) for _ in params],
    )
    kwargs = dict(
        weight_decay=0.01,
        momentum=0.9,
        dampening=0.0,
        nesterov=True,
        maximize=False,
        **_pruning_args(params, prune, groups=prune == "group", backend=backend),
    )
    if backend == "triton":  # compiled Triton needs CUDA tensors; on CPU it runs interpreted
        args, kwargs = to_device(args, DEVICE), to_device(kwargs, DEVICE)
    torch.library.opcheck(ops.sgd_step_, args, kwargs)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adam(amsgrad):
    params = [torch.randn(6, 5), torch.randn(9)]
    states = [[torch.rand_like(p) for p in params] for _ in range(3)]
    args = (
        params,
        [torch.randn_like(p) for p in params],
        states[0],
        states[1],
        states[2] if amsgrad else [],
        [torch.ones(()) for _ in params],
    )
    kwargs = dict(
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.01,
        decoupled=True,
        amsgrad=amsgrad,
        maximize=False,
        **_pruning_args(params, "stochastic", groups=True),
    )
    torch.library.opcheck(ops.adam_step_, args, kwargs)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_compiled_training_step_fullgraph(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    kw = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    opts = [getattr(sparsetrain.optim, name)(m.parameters(), backend="torch", **kw) for m in (model, twin)]
    for opt, m in zip(opts, (model, twin)):
        opt.enable_pruning(m[0].weight)
        opt.set_coefs(m[0].weight, l2=1e-2)
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))

    def optimizer_step(opt):
        opt.step()

    compiled = torch.compile(optimizer_step, fullgraph=True)
    for _ in range(3):
        for m, opt, step in ((model, opts[0], compiled), (twin, opts[1], optimizer_step)):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            step(opt)
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_import_does_not_import_triton():
    code = "import sys, sparsetrain, sparsetrain.optim, sparsetrain.ops; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cli_info_lists_every_backend_with_reason():
    result = subprocess.run(
        [sys.executable, "-m", "sparsetrain.cli", "info"], capture_output=True, text=True, check=True
    )
    out = result.stdout
    assert f"sparsetrain {sparsetrain.__version__}" in out and "torch " in out
    assert "  torch   usable" in out
    native_usable, native_reason = backends.availability("native")
    if native_usable:
        assert "  native  usable" in out and "native build: built: cpu driver" in out
    else:
        assert f"  native  not usable: {native_reason}" in out
    assert "  triton  " in out
    if triton_usable()[0]:  # the subprocess inherits TRITON_INTERPRET from the test set-up
        assert "triton launch: blocks of 1024 elements, 8 per program, 4 (SGD) / 8 (Adam) warps" in out
