"""Models, training loops and the two-rank DDP job of tests/test_shrink.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import sparsetrain
from sparsetrain import methods
from sparsetrain.demo import ResidualBlock as Residual


def residual_cnn() -> nn.Module:
    """Stem (conv-BN-ReLU, max pool), an identity residual block, a strided one with a 1x1 downsample, classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Residual(8, 8),
        Residual(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class MLPBlock(nn.Module):
    """A transformer feed-forward block (pre-LayerNorm, GELU, residual) and a linear read-out."""

    def __init__(self, d: int = 12, hidden: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(7, d)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.fc3 = nn.Linear(d, hidden)
        self.fc4 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.ln(h))))
        h = h + self.fc4(nn.functional.gelu(self.fc3(self.ln(h))))
        return self.head(h.mean(dim=1))


MODELS = {
    "cnn": (residual_cnn, (1, 12, 12), 10),
    "mlp": (MLPBlock, (5, 7), 5),
}


def method(name: str):
    if name == "magnitude":  # three structured events: steps 3, 6 and 9
        return methods.Magnitude(0.5, structure="filters", schedule="linear", start=3, end=9, interval=3)
    if name == "oneshot":
        return methods.Magnitude(0.5, structure="filters", start=5)
    return methods.GReg1(0.5, update_interval=1, delta=0.05, ceiling=0.2, stabilize=3)  # prunes at step 8


def optimizer(name: str, params, backend: str = "torch"):
    if name == "sgd":
        return sparsetrain.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4, backend=backend)
    if name == "adam":
        return sparsetrain.optim.Adam(params, lr=3e-3, weight_decay=1e-3, backend=backend)
    return sparsetrain.optim.AdamW(params, lr=3e-3, weight_decay=1e-2, amsgrad=name == "amsgrad", backend=backend)


def batches(model_name: str, steps: int, batch: int = 8, seed: int = 1):
    shape, classes = MODELS[model_name][1], MODELS[model_name][2]
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(steps)]  # fmt: skip


def build(model_name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_name][0]()


def probe(model_name: str) -> torch.Tensor:
    return torch.randn(4, *MODELS[model_name][1], generator=torch.Generator().manual_seed(99))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


def train_steps(model, opt, data, scheduler=None, after=None) -> list[float]:
    losses = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if after is not None:
            after()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------- DDP
def ddp_job(rank: int, world: int, out: str) -> None:
    """Each rank trains on its half of every batch; shrinks after the event; compares with one process."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    data = batches("mlp", 16, batch=8)
    x0 = probe("mlp")

    def run(distributed: bool):
        model = build("mlp")
        net = DistributedDataParallel(model) if distributed else model
        opt = optimizer("sgd", model.parameters())
        pruner = sparsetrain.Pruner(net, opt, method("oneshot"), example_inputs=x0)
        for step, (x, y) in enumerate(data):
            if distributed:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            if distributed and step == 6:
                net = pruner.shrink()
        return model, net, pruner

    model, net, pruner = run(True)
    assert isinstance(net, DistributedDataParallel) and net.module is model
    assert pruner.shrinks and model.fc1.weight.shape[0] < 24
    reference, _, _ = run(False)
    got = outputs(model, x0)
    torch.testing.assert_close(got, outputs(reference, x0), rtol=1e-4, atol=1e-5 * float(got.abs().max()))
    gathered = [torch.zeros_like(got) for _ in range(world)]
    dist.all_gather(gathered, got)
    for other in gathered:
        assert torch.equal(other, got)  # every rank shrank identically and trains identically
    if rank == 0:
        torch.save({"shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}, out)
