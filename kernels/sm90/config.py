"""Compile-time choices of the SM90 grouped GEMM kernel and the limits they must respect.

No cutlass import: the dispatcher, the tuned-table reader and the validation read these on the host.
"""

from dataclasses import asdict, dataclass

# Groups whose row counts one launch holds in the scheduler's shared-memory table.
MAX_GROUPS = 1024
TILE_MS = (64, 128)  # one consumer warpgroup per 64 rows
TILE_NS = (64, 128, 256)
CLUSTERS = ((1, 1), (2, 1), (1, 2))
FP8_SCALE_BLOCK = 128  # DeepSeek FP8 scale granularity along K (and along N for B)


@dataclass(frozen=True)
class Sm90Config:
    """Compile-time choices of the SM90 kernel.

    tile_m x tile_n: CTA tile (tile_m // 64 consumer warpgroups); cluster_m x cluster_n: CTAs sharing
    B (along M) or A (along N) loads through TMA multicast; stages: smem pipeline depth (0 = as many
    as fit); panel: M-blocks per rasterization panel inside a group.
    """

    tile_m: int = 128
    tile_n: int = 256
    cluster_m: int = 1
    cluster_n: int = 1
    stages: int = 0
    panel: int = 8

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if type(value) is not int:
                raise TypeError(f"{name}: expected int, got {type(value).__name__} {value!r}")
        if self.tile_m not in TILE_MS:
            raise ValueError(f"tile_m: expected 64 or 128, got {self.tile_m}")
        if self.tile_n not in TILE_NS:
            raise ValueError(f"tile_n: expected 64, 128 or 256, got {self.tile_n}")
        if (self.cluster_m, self.cluster_n) not in CLUSTERS:
            raise ValueError(f"cluster: expected (1,1), (2,1) or (1,2), got ({self.cluster_m},{self.cluster_n})")
        if self.stages < 0 or self.stages == 1:
            raise ValueError(f"stages: expected 0 (auto) or >= 2, got {self.stages}")
        if self.panel < 1:
            raise ValueError(f"panel: expected >= 1, got {self.panel}")

    @property
    def cluster_size(self) -> int:
        return self.cluster_m * self.cluster_n

    def key(self) -> str:
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())
