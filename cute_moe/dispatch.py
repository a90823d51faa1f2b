"""Problem -> KernelConfig rules for the SM90 kernels (pure and deterministic), and overrides."""

import contextlib
import os
from functools import lru_cache
from typing import Iterator, Optional

from .specs import KernelConfig


def parse_config(text: str) -> KernelConfig:
    """``"tile_m=64,tile_n=128,cluster_m=2"`` -> KernelConfig (fields not named keep their defaults)."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in KernelConfig.__dataclass_fields__ or not value.strip().isdigit():
            raise ValueError(f"CUTE_MOE_CONFIG: expected comma-separated field=int among "
                             f"{list(KernelConfig.__dataclass_fields__)}, got {item!r}")
        fields[name] = int(value)
    return KernelConfig(**fields)


_forced: Optional[KernelConfig] = parse_config(os.environ["CUTE_MOE_CONFIG"]) if os.environ.get(
    "CUTE_MOE_CONFIG") else None


def forced_config() -> Optional[KernelConfig]:
    """The config every launch uses instead of the rules (CUTE_MOE_CONFIG or ``force_config``), if any."""
    return _forced


@contextlib.contextmanager
def force_config(config: KernelConfig) -> Iterator[None]:
    """Use ``config`` for every GEMM launched inside the block."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


@lru_cache(maxsize=4096)
def choose_config(kind: str, n: int, k: int, num_groups: int, expected_m: int, alignment: int) -> KernelConfig:
    """Pick the kernel configuration for one problem.

    - masked with few rows per expert (expected_m <= 64): 64-row tiles, one consumer warpgroup; the
      problem is bound by reading the weights once, so no M-cluster (its partner tile would be empty);
    - everything else: 128 x 256 tiles, two consumer warpgroups, B multicast over an M-cluster of 2
      when both CTAs of a cluster fall in one expert segment (contiguous: the segment alignment must
      cover 256 rows), otherwise A multicast over an N-cluster of 2;
    - N-clusters need an even number of 256-wide N blocks.
    """
    if kind == "masked" and expected_m <= 64:
        return KernelConfig(tile_m=64, tile_n=256)
    tile_n = 256 if n % 256 == 0 or n > 1024 else 128
    if kind == "contiguous" and alignment % 256 != 0:
        if (n // tile_n) % 2 == 0:
            return KernelConfig(tile_m=128, tile_n=tile_n, cluster_m=1, cluster_n=2)
        return KernelConfig(tile_m=128, tile_n=tile_n)
    return KernelConfig(tile_m=128, tile_n=tile_n, cluster_m=2, cluster_n=1)


def check_config_fits(kind: str, config: KernelConfig, alignment: int) -> None:
    """Reject a (forced) config that would compute a wrong answer for this problem kind."""
    if kind == "contiguous" and alignment % (config.tile_m * config.cluster_m) != 0:
        raise ValueError(f"config: contiguous layout aligned to {alignment} rows needs tile_m * cluster_m "
                         f"to divide it, got tile_m={config.tile_m}, cluster_m={config.cluster_m}")
