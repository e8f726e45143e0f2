"""Test set-up. Without a GPU, Triton kernels run interpreted: TRITON_INTERPRET must be set before
any kernel is defined. With a GPU the same tests run compiled kernels on CUDA tensors."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_usable() -> tuple[bool, str]:
    from sparsetrain import backends

    return backends.availability("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
