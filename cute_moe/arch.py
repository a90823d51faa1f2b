"""Registry of arch backends: which arch a call targets and the backend that owns its kernels.

A backend (one per arch, e.g. ``kernels/sm90/backend.py``) owns everything that is a fact of its
hardware: its kernel config type, what it can implement, its dispatch rules and tuning candidates,
its kernel families (sources, fake-argument signature, compile) and its SM count and cluster
occupancy. Everything else in the package asks this registry. Backend modules are imported on first
use and must not import cutlass at module level (``import cute_moe`` stays light).
"""

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

ARCH_ENV = "CUTE_MOE_ARCH"
# arch name -> module whose BACKEND attribute is the backend object.
_BACKEND_MODULES: dict[str, str] = {
    "sm_90a": "cute_moe.kernels.sm90.backend",
}
# Compute capability -> the arch name its kernels are compiled for.
_CAPABILITY_ARCHS: dict[tuple[int, int], str] = {(9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_103a"}
_device_archs: dict[int, str] = {}


@dataclass(frozen=True)
class KernelFamily:
    """One kernel source family: its name and the files a compiled object of it depends on."""

    name: str
    sources: tuple[Path, ...]


class Backend(Protocol):
    """What the rest of the package asks of an arch backend."""

    arch: str
    config_type: type
    max_groups: int
    default_num_sms: int

    def check(self, spec: Any, config: Any) -> None:
        """Raise ValueError naming the reason when ``config`` cannot implement ``spec`` correctly."""

    def check_spec(self, spec: Any) -> None:
        """Raise ValueError when no config of this backend implements ``spec`` (kind, operands, ...)."""

    def rule_config(self, problem: Any) -> Any:
        """The config the written-down rules choose for a dispatch problem."""

    def candidate_configs(self, problem: Any) -> list:
        """The configs ``cute-moe tune`` measures for a dispatch problem."""

    def parse_config(self, text: str) -> Any:
        """``"tile_m=64,tile_n=128"`` -> config (CUTE_MOE_CONFIG, --config)."""

    def format_config(self, config: Any) -> str:
        """Short form of a config for tables and logs."""

    def kernel_family(self, spec: Any) -> KernelFamily:
        """The source family that implements ``spec``."""

    def compile(self, spec: Any, config: Any) -> Callable:
        """Compile ``spec`` with ``config`` for this arch (no GPU needed); a TVM-FFI callable."""

    def num_sms(self, device_index: int) -> int:
        """SMs of the device (the dispatcher's ``num_sms`` for launches on it)."""

    def max_active_clusters(self, device_index: int, config: Any) -> int:
        """Clusters of ``config`` that run at once on the device (persistent grid size)."""


def registered_archs() -> tuple[str, ...]:
    return tuple(_BACKEND_MODULES)


def check_arch(arch: str) -> None:
    """Refuse an arch without a backend, naming the registered ones."""
    if arch not in _BACKEND_MODULES:
        raise ValueError(f"arch: no cute-moe backend for {arch!r} in this build "
                         f"(registered: {', '.join(_BACKEND_MODULES)})")


def get_backend(arch: str) -> Backend:
    """The backend of ``arch`` (imported on first use)."""
    check_arch(arch)
    return importlib.import_module(_BACKEND_MODULES[arch]).BACKEND


def arch_of_capability(capability: tuple[int, int]) -> str:
    try:
        return _CAPABILITY_ARCHS[tuple(capability)]
    except KeyError:
        raise ValueError(f"device: compute capability {capability[0]}.{capability[1]} has no cute-moe arch "
                         f"(supported: {', '.join(_BACKEND_MODULES)})") from None


def arch_of_device(index: int) -> str:
    """The arch of CUDA device ``index``: CUTE_MOE_ARCH if set, else its compute capability's."""
    override = os.environ.get(ARCH_ENV)
    if override:
        return override
    arch = _device_archs.get(index)
    if arch is None:
        arch = _device_archs[index] = arch_of_capability(torch.cuda.get_device_capability(index))
    return arch


def default_arch() -> str:
    """The arch to plan for when no tensor says: CUTE_MOE_ARCH, else GPU 0's, else the first registered."""
    override = os.environ.get(ARCH_ENV)
    if override:
        return override
    if torch.cuda.is_available():
        return arch_of_device(torch.cuda.current_device())
    return registered_archs()[0]


def backend_for(arch: Optional[str]) -> Backend:
    """``get_backend(arch or default_arch())``."""
    return get_backend(arch or default_arch())
