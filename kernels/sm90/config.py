"""Compile-time choices of the SM90 grouped GEMM kernel and the limits they must respect.

No cutlass import: the dispatcher, the tuned-table reader and the validation read these on the host.
"""

from dataclasses import asdict, dataclass

# Groups whose row counts one launch holds in the scheduler's shared-memory table.
MAX_GROUPS = 1024
TILE_MS = (64, 128)  # one consumer warpgroup per 64 rows
# FP4-weight swap-AB kernel (``swap_ab=1``, kernels/sm90/fp4_swap_gemm.py): tile_m is the token tile,
# WGMMA's N extent (the weights are WGMMA's A operand, 64 rows per consumer warpgroup along tile_n).
SWAP_AB_TILE_MS = (8, 16, 32, 64, 128)
SWAP_AB_TILE_NS = (64, 128, 192, 256)  # weight rows per CTA: one consumer warpgroup per 64
TILE_NS = (64, 128, 256)
CLUSTERS = ((1, 1), (2, 1), (1, 2))
FP8_SCALE_BLOCK = 128  # DeepSeek FP8 scale granularity along K (and along N for B)


@dataclass(frozen=True)
class Sm90Config:
    """Compile-time choices of the SM90 kernel.

    tile_m x tile_n: CTA tile (tile_m // 64 consumer warpgroups); cluster_m x cluster_n: CTAs sharing
    B (along M) or A (along N) loads through TMA multicast; stages: smem pipeline depth (0 = as many
    as fit); panel: M-blocks per rasterization panel inside a group; swap_ab: 1 selects the FP4-weight
    swap-AB kernel (weights as WGMMA's register-sourced A operand, tile_m = tokens per tile in
    SWAP_AB_TILE_MS), only for B = MXFP4 (kernels/sm90/fp4_rules.py).
    """

    tile_m: int = 128
    tile_n: int = 256
    cluster_m: int = 1
    cluster_n: int = 1
    stages: int = 0
    panel: int = 8
    swap_ab: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if type(value) is not int:
                raise TypeError(f"{name}: expected int, got {type(value).__name__} {value!r}")
        if self.swap_ab not in (0, 1):
            raise ValueError(f"swap_ab: expected 0 or 1, got {self.swap_ab}")
        if self.swap_ab and self.tile_m not in SWAP_AB_TILE_MS:
            raise ValueError(f"tile_m: the swap-AB kernel takes tile_m in {SWAP_AB_TILE_MS}, got {self.tile_m}")
        if not self.swap_ab and self.tile_m not in TILE_MS:
            raise ValueError(f"tile_m: expected 64 or 128, got {self.tile_m}")
        if self.swap_ab and self.tile_n not in SWAP_AB_TILE_NS:
            raise ValueError(f"tile_n: the swap-AB kernel takes tile_n in {SWAP_AB_TILE_NS}, got {self.tile_n}")
        if not self.swap_ab and self.tile_n not in TILE_NS:
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
