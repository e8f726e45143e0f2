"""Structured pruning with GReg-1 on a small ResNet, exported as a physically smaller model.

GReg-1 picks, in each residual block's first convolution, the half of the filters with the
smallest mean |w|, pushes them to zero with a growing L2 penalty inside the fused SGD step, holds
the penalty, then prunes them (weights, bias and optimizer state). ``pruner.export`` then removes
the pruned filters and the matching input channels of the next convolution with Torch-Pruning's
dependency graph, and checks that the smaller model computes what the masked model computes.

The blocks are ``x + conv2(relu(conv1(x)))`` followed by BatchNorm and ReLU: the pruned filters
of ``conv1`` output exactly zero, so removing them does not change the function. Data:
scikit-learn's real 8x8 digits.

    python examples/resnet_greg_export.py
    python examples/resnet_greg_export.py --tiny
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sparsetrain
from sparsetrain import methods
from sparsetrain.export import size_report
from sparsetrain.optional import require


class Block(nn.Module):
    """A residual block: ``relu(bn(x + conv2(relu(conv1(x)))))``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x + self.conv2(torch.relu(self.conv1(x)))))


def resnet(width: int = 16, blocks: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Block(width, 2 * width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as [N, 1, 8, 8] standardized images and labels, 80/20 split."""
    data = require("sklearn.datasets", "this example's digits").load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a narrow model for 30 steps: a smoke run")
    parser.add_argument("--backend", default=None, help="auto (default), torch, triton or native")
    args = parser.parse_args(argv)
    steps = 30 if args.tiny else args.steps

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = resnet(width=4 if args.tiny else 16, blocks=1 if args.tiny else 3)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, backend=args.backend)
    # lam grows by delta every update_interval steps up to the ceiling, is held for `stabilize`
    # steps, then the picked filters are pruned; the rest of training fine-tunes the kept ones.
    # (The paper's delta of 1e-4 suits runs of many epochs; this short run grows it faster.)
    grow_steps = max(2, steps // 3)
    method = methods.GReg1(
        0.5, structure="filters", update_interval=1, delta=1.0 / grow_steps, ceiling=1.0, stabilize=max(1, steps // 10)
    )
    # coupled channel groups, traced from example inputs: a pruned channel takes its BatchNorm entries,
    # the consumers' input slices and, through residual adds, every convolution tied to it
    pruner = sparsetrain.Pruner(model, opt, method, example_inputs=x_train[:2])
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(len(y_train), (64,), generator=gen)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  phase {method.phase}")
    if method.pruned_at is None:
        raise SystemExit(f"GReg-1 did not reach its pruning step in {steps} steps (phase {method.phase})")

    model.eval()
    example = x_test[:8]
    print(pruner.summary(example))
    small = pruner.export(example)  # Torch-Pruning removes the pruned filters; outputs checked equal
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        small_acc = (small(x_test).argmax(1) == y_test).float().mean().item()
    before, after = size_report(model, example), size_report(small, example)
    print(f"test accuracy: pruned {acc:.1%}, exported {small_acc:.1%}")
    print(f"parameters {before['params']} -> {after['params']}, MACs {before['macs']} -> {after['macs']}")
    return small_acc


if __name__ == "__main__":
    main()
