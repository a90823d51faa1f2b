"""In-process cache of compiled specializations (backed by the disk cache) and per-device launch facts."""

import threading
from typing import Callable

import torch

from . import cache
from .specs import GemmSpec, KernelConfig

_kernels: dict[tuple[GemmSpec, KernelConfig], Callable] = {}
_counts = {"compiled": 0, "disk": 0}
_miss_lock = threading.Lock()  # cute.compile is not thread-safe
_sm_counts: dict[int, int] = {}


def get_kernel(spec: GemmSpec, config: KernelConfig) -> Callable:
    """Compiled function for (spec, config): from memory, else loaded from the disk cache, else compiled
    now (and exported to the disk cache)."""
    fn = _kernels.get((spec, config))
    if fn is None:
        with _miss_lock:
            fn = _kernels.get((spec, config))
            if fn is None:
                fn, source = cache.get_or_compile(spec, config)
                _counts[source] += 1
                _kernels[(spec, config)] = fn
    return fn


def max_clusters(device: torch.device, cluster_size: int) -> int:
    """Clusters of ``cluster_size`` CTAs that fit at once (one CTA per SM)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _sm_counts.get(index)
    if sms is None:
        sms = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms // cluster_size


def compiled_count() -> int:
    """Specializations compiled in this process (tests assert a precompiled cache keeps it unchanged)."""
    return _counts["compiled"]


def loaded_count() -> int:
    """Specializations loaded from the disk cache in this process."""
    return _counts["disk"]


def clear_memory() -> None:
    """Forget the in-memory specializations (the next get_kernel goes to disk); counters are kept.

    ops.py keeps its own per-shape launcher table, which holds the functions too.
    """
    _kernels.clear()
