"""The sm_90a backend: Hopper's kernel config, rules, kernel family, compile and occupancy.

Registered in cute_moe/arch.py. Imports no cutlass at module level; compiling and occupancy queries
import it on first use.
"""

from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

from cute_moe.arch import KernelFamily

from . import rules
from .config import MAX_GROUPS, Sm90Config

_KERNELS = Path(__file__).resolve().parent.parent
_PACKAGE = Path(__file__).resolve().parent.parent.parent / "cute_moe"
# The grouped GEMM family: the kernel, its scheduler, its launch signature and the descriptors it reads.
GROUPED_GEMM = KernelFamily("sm90_grouped_gemm", tuple(sorted(
    [_KERNELS / "sm90" / name for name in ("grouped_gemm.py", "signature.py", "config.py")]
    + [_KERNELS / name for name in ("scheduler.py", "grouped_schedulers.py")])))


class Sm90Backend:
    """Hopper (H100/H200): one persistent warp-specialized TMA + WGMMA kernel family."""

    arch = "sm_90a"
    config_type = Sm90Config
    max_groups = MAX_GROUPS
    default_num_sms = 132  # H100/H200 SXM; the dispatcher's assumption when no GPU is present

    check_spec = staticmethod(rules.check_spec)
    can_implement = staticmethod(rules.can_implement)
    rule_config = staticmethod(rules.rule_config)
    candidate_configs = staticmethod(rules.candidate_configs)

    def __init__(self) -> None:
        self._clusters: dict[tuple[int, int], int] = {}
        self._sms: dict[int, int] = {}

    @staticmethod
    def parse_config(text: str) -> Sm90Config:
        """``"tile_m=64,tile_n=128,cluster_m=2"`` -> Sm90Config (fields not named keep their defaults)."""
        names = [f.name for f in fields(Sm90Config)]
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name not in names or not value.isdigit():
                raise ValueError(f"expected comma-separated field=int among {names}, got {item!r}")
            values[name] = int(value)
        return Sm90Config(**values)

    @staticmethod
    def format_config(config: Sm90Config) -> str:
        """Tile, cluster, then the other fields that differ from their defaults: ``128x256 c2x1``,
        ``64x128 c1x1 stages=4``."""
        default = Sm90Config()
        others = [f"{name}={value}" for name, value in asdict(config).items()
                  if name not in ("tile_m", "tile_n", "cluster_m", "cluster_n") and value != getattr(default, name)]
        return " ".join([f"{config.tile_m}x{config.tile_n} c{config.cluster_m}x{config.cluster_n}", *others])

    @staticmethod
    def kernel_family(spec) -> KernelFamily:
        return GROUPED_GEMM

    @staticmethod
    def compile(spec, config: Sm90Config) -> Callable:
        from .signature import compile_grouped_gemm

        return compile_grouped_gemm(spec, config)

    def num_sms(self, device_index: int) -> int:
        """SMs of the device (the rules' ``num_sms``), from cutlass's hardware info; cached."""
        count = self._sms.get(device_index)
        if count is None:
            from ..occupancy import multiprocessor_count

            count = self._sms[device_index] = multiprocessor_count(device_index)
        return count

    def max_active_clusters(self, device_index: int, config: Sm90Config) -> int:
        """Clusters of ``config.cluster_size`` CTAs resident at once (one CTA per SM), from cutlass's
        hardware info; cached per device and cluster size."""
        key = (device_index, config.cluster_size)
        count = self._clusters.get(key)
        if count is None:
            from ..occupancy import max_active_clusters

            count = self._clusters[key] = max_active_clusters(device_index, config.cluster_size)
        return count


BACKEND = Sm90Backend()
