"""Host-to-device copies of small per-step values that never wait for the GPU."""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list or a numpy array) as a tensor on ``device``, copied asynchronously from
    pinned memory on CUDA.

    A copy from ordinary (pageable) host memory makes the host wait for the stream's earlier work;
    a pinned source with ``non_blocking=True`` does not. torch's pinned-memory cache keeps the
    source alive until the copy has run.
    """
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
