"""In-process cache of compiled specializations and per-device launch facts."""

from typing import Callable

import torch

from .specs import GemmSpec, KernelConfig

_compiled: dict[tuple[GemmSpec, KernelConfig], Callable] = {}
_sm_counts: dict[int, int] = {}


def get_kernel(spec: GemmSpec, config: KernelConfig) -> Callable:
    """Compiled function for (spec, config): from memory, else compiled now."""
    fn = _compiled.get((spec, config))
    if fn is None:
        from .compile import compile_gemm

        fn = compile_gemm(spec, config)
        _compiled[(spec, config)] = fn
    return fn


def max_clusters(device: torch.device, cluster_size: int) -> int:
    """Clusters of ``cluster_size`` CTAs that fit at once (one CTA per SM)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _sm_counts.get(index)
    if sms is None:
        sms = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms // cluster_size


def compiled_count() -> int:
    """Number of specializations held in memory (tests assert nothing new was compiled)."""
    return len(_compiled)
