"""Test setup: skip `gpu` tests without a Hopper GPU (kernels compile for sm_90a without one)."""

import pytest
import torch


def has_hopper_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    if has_hopper_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA Hopper (sm_90) GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
