"""Shape-keyed table of ready launches shared by the public ops (the warm path's one dict lookup)."""

from typing import Callable

import torch

from . import runtime
from .dispatch import check_config_fits, choose_config, forced_config
from .layouts.alignment import get_mk_alignment_for_contiguous_layout
from .specs import GemmSpec
from .validation import dtype_name


class _Launch:
    """A compiled specialization bound to its launch facts."""

    __slots__ = ("fn", "clusters")

    def __init__(self, fn: Callable, clusters: int):
        self.fn = fn
        self.clusters = clusters


# (op, static shape, output dtype, has C / expected_m / alignment, device, forced config) -> _Launch
_launches: dict[tuple, _Launch] = {}


def build_launch(key: tuple, kind: str, n: int, k: int, d_dtype: torch.dtype, has_c: bool, num_groups: int,
                 expected_m: int, device: torch.device, ab_dtype: str = "bf16") -> _Launch:
    """First call of a shape: dispatch, compile or load, and remember the launch under ``key``."""
    alignment = get_mk_alignment_for_contiguous_layout() if kind in ("contiguous", "psum") else 0
    d_name = dtype_name(d_dtype)
    config = forced_config() or choose_config(kind, n, k, num_groups, expected_m, alignment, ab_dtype=ab_dtype,
                                              d_dtype=d_name)
    check_config_fits(kind, config, alignment)
    spec = GemmSpec(kind=kind, n=n, k=k, ab_dtype=ab_dtype, d_dtype=d_name, has_c=has_c,
                    alignment=alignment if kind == "psum" else 0)
    launch = _Launch(runtime.get_kernel(spec, config), runtime.max_clusters(device, config.cluster_size))
    _launches[key] = launch
    return launch


def run_launch(launch: _Launch, validate: Callable[[], None], *args) -> None:
    """Launch; if TVM-FFI refuses an argument, re-validate in Python for an error naming it."""
    try:
        launch.fn(*args, launch.clusters)
    except (ValueError, TypeError):
        validate()
        raise




def clear_launches() -> None:
    """Forget every shape's launch (the next call of each shape dispatches and loads again)."""
    _launches.clear()
