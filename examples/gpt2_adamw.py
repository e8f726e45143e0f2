"""A small GPT-2 (``transformers``, random initialization) trained with sparsetrain's fused AdamW.

Gradual magnitude pruning (cubic schedule to 50%) of the attention and MLP weights (GPT-2's
``Conv1D`` modules) runs inside the optimizer's fused step. The model learns to predict the bytes
of this file (a 256-token byte vocabulary, so no tokenizer or download is needed). The output
head is tied to the token embedding and is left dense.

    python examples/gpt2_adamw.py
    python examples/gpt2_adamw.py --tiny
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sparsetrain
from sparsetrain import methods
from sparsetrain.optional import require


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a one-layer model for 12 steps: a smoke run")
    parser.add_argument("--backend", default=None, help="auto (default), torch, triton or native")
    args = parser.parse_args(argv)
    steps = 12 if args.tiny else args.steps
    transformers = require("transformers", "the GPT-2 example")
    conv1d = require("transformers.pytorch_utils", "the GPT-2 example").Conv1D

    torch.manual_seed(0)
    context = 32 if args.tiny else 64
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=context,
        n_embd=32 if args.tiny else 128,
        n_layer=1 if args.tiny else 4,
        n_head=2 if args.tiny else 4,
        bos_token_id=None,
        eos_token_id=None,
        loss_type="ForCausalLM",
    )
    model = transformers.GPT2LMHeadModel(config)
    text = torch.tensor(list(Path(__file__).read_bytes()), dtype=torch.int64)

    opt = sparsetrain.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, backend=args.backend)
    method = methods.Magnitude(
        0.5, schedule="cubic", start=steps // 5, end=max(steps // 5 + 1, steps * 3 // 4), interval=max(1, steps // 20)
    )
    pruner = sparsetrain.Pruner(model, opt, method, types=(conv1d,))  # c_attn, c_proj, c_fc of every block
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        starts = torch.randint(len(text) - context, (8,), generator=gen)
        batch = torch.stack([text[s : s + context] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"backend {opt.backend}")
    print(pruner.summary(batch[:1]))
    return loss.item()


if __name__ == "__main__":
    main()
