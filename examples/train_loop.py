"""A plain training loop with the fused SGD and StochasticMagnitude pruning (L2 decay).

Trains a small MLP on scikit-learn's 1,797 real 8x8 digits (they ship inside the package, nothing
is downloaded) and prunes 90% of its weights while training; regularization, update, pruning
decision and masking run in the optimizer's one fused step.

    python examples/train_loop.py            # about 1,500 steps
    python examples/train_loop.py --tiny     # a few seconds
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sparsetrain
from sparsetrain import methods
from sparsetrain.optional import require


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as float tensors [N, 64] (standardized) and labels, 80/20 split."""
    data = require("sklearn.datasets", "this example's digits").load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="40 steps: a smoke run")
    parser.add_argument("--backend", default=None, help="auto (default), torch, triton or native")
    args = parser.parse_args(argv)
    steps = 40 if args.tiny else args.steps

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend=args.backend)
    # Prune during the middle of training (cubic schedule), leave the last 30% to recover.
    method = methods.StochasticMagnitude(
        target=0.9, start=max(1, steps // 10), end=max(2, int(steps * 0.7)), interval=5, temperature=0.1, l2=1e-3
    )
    pruner = sparsetrain.Pruner(model, opt, method, exclude=["4"])  # keep the output layer dense
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(len(y_train), (64,), generator=gen)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()  # regularize + update + prune + mask, one fused op for all tensors
        opt.zero_grad()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}")

    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {acc:.1%} on {len(y_test)} digits, backend {opt.backend}")
    print(pruner.summary())
    return acc


if __name__ == "__main__":
    main()
