"""The autograd path: keep torch's own (fused) AdamW and prune with MaskedPruner.

``MaskedPruner`` masks the pruned weights in the forward and adds the method's regularization
gradient in the backward; ``pruner.step()`` after the optimizer's step runs the method's schedule
and, at pruning events, updates the masks with the same fused op and random stream as the fused
optimizers. Here: gradual magnitude pruning to 80% on a cubic schedule, on scikit-learn's real
8x8 digits.

    python examples/autograd_adamw.py
    python examples/autograd_adamw.py --tiny
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from sparsetrain import methods
from sparsetrain.autograd import MaskedPruner
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
    args = parser.parse_args(argv)
    steps = 40 if args.tiny else args.steps

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    # Create the pruner before the optimizer's first step; the parameters stay the same tensors.
    method = methods.Magnitude(
        0.8,
        schedule="cubic",
        start=steps // 10,
        end=max(steps // 10 + 1, int(steps * 0.7)),
        interval=max(4, steps // 30),
    )
    pruner = MaskedPruner(model, method, exclude=["4"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(len(y_train), (64,), generator=gen)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        pruner.step()  # the schedule; at pruning events the masks are updated
        opt.zero_grad()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}")

    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {acc:.1%} on {len(y_test)} digits")
    print(pruner.summary())
    plain = pruner.export()  # a plain nn.Sequential with the masks folded into the weights
    with torch.no_grad():
        torch.testing.assert_close(plain(x_test), model(x_test))
    return acc


if __name__ == "__main__":
    main()
