"""N:M-sparse Linear layers on PyTorch's semi-structured sparse kernels (GPUs with sm_80 and later).

After :class:`sparsetrain.methods.NM` has pruned a model 2:4, the weights of its Linear layers can be
stored as ``torch.sparse.SparseSemiStructuredTensor`` so that the forward and backward matmuls run
on the GPU's sparse tensor cores (half the multiply-adds). This applies to plain ``nn.Linear``
modules (a model from :meth:`sparsetrain.Pruner.export`, or one whose masks are folded in); the
layout needs CUDA, float16 or bfloat16 weights and the shape constraints of
``torch.sparse.to_sparse_semi_structured``. On CPU only the masks and the accuracy of N:M training
are available.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_two_four(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive elements of each row of ``weight`` has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.detach().reshape(-1, 4) != 0).sum(dim=1).le(2).all())


def to_semi_structured(model: nn.Module, *, include: list[str] | None = None) -> list[str]:
    """Store the 2:4-sparse weight of every ``nn.Linear`` of ``model`` in the semi-structured sparse layout.

    Args:
        model: a model whose Linear weights were pruned 2:4 (:class:`sparsetrain.methods.NM` with
            ``n=2, m=4``), on a CUDA device with sm_80 or later, in float16 or bfloat16.
        include: names of the Linear modules to convert (default ``None``: every Linear whose
            weight is 2:4 sparse).

    Returns:
        The names of the modules converted (in ``model.named_modules()`` order).

    Raises:
        RuntimeError: no CUDA device of compute capability 8.0 or later holds a selected weight.
        ValueError: a module named in ``include`` is not an ``nn.Linear``, its weight is not 2:4
            sparse or not float16 / bfloat16. Nothing is converted when any check fails.
    """
    modules = dict(model.named_modules())
    names = list(include) if include is not None else [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    chosen = []
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"to_semi_structured: {name!r} is not an nn.Linear module of the model")
        weight = module.weight
        if not is_two_four(weight):
            if include is not None:
                raise ValueError(f"to_semi_structured: the weight of {name!r} is not 2:4 sparse")
            continue
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"to_semi_structured: the weight of {name!r} is {weight.dtype}; the sparse kernels take float16 or "
                "bfloat16 (convert the model first, e.g. model.half())"
            )
        if weight.device.type != "cuda" or torch.cuda.get_device_capability(weight.device) < (8, 0):
            raise RuntimeError(
                f"to_semi_structured: the weight of {name!r} is on {weight.device}; semi-structured sparsity needs a "
                "CUDA GPU of compute capability 8.0 or later"
            )
        chosen.append((name, module))
    for _, module in chosen:
        sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach())
        module.weight = nn.Parameter(sparse, requires_grad=module.weight.requires_grad)
    return [name for name, _ in chosen]
