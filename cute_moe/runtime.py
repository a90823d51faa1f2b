"""In-process cache of compiled specializations (backed by the disk cache) and per-device launch facts."""

import threading
from typing import Any, Callable

from . import cache
from .arch import get_backend
from .specs import GemmSpec

_kernels: dict[tuple[GemmSpec, Any], Callable] = {}
_counts = {"compiled": 0, "disk": 0}
_miss_lock = threading.Lock()  # cute.compile is not thread-safe


def get_kernel(spec: GemmSpec, config: Any) -> Callable:
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


def max_clusters(arch: str, device_index: int, config: Any) -> int:
    """Clusters of ``config`` resident at once on the device (the persistent grid), per its backend."""
    return get_backend(arch).max_active_clusters(device_index, config)


def compiled_count() -> int:
    """Specializations compiled in this process (tests assert a precompiled cache keeps it unchanged)."""
    return _counts["compiled"]


def loaded_count() -> int:
    """Specializations loaded from the disk cache in this process."""
    return _counts["disk"]


def clear_memory() -> None:
    """Forget the in-memory specializations (the next get_kernel goes to disk); counters are kept.

    The launcher's warm table holds the functions too: ``launcher.clear_launches()`` forgets those.
    """
    _kernels.clear()
