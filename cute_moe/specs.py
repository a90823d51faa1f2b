"""Static descriptions of a GEMM problem (``GemmSpec``) and of a kernel specialization (``KernelConfig``).

Together with the target arch they are everything a compiled object depends on: token counts never are.
"""

from dataclasses import asdict, dataclass

KINDS = ("dense", "contiguous", "psum", "masked", "ragged")
AB_DTYPES = ("bf16", "fp8_e4m3")
FP8_KINDS = ("dense", "contiguous", "psum", "masked")
D_DTYPES = ("bf16", "fp32")
ARCHS = ("sm_90a",)


@dataclass(frozen=True)
class GemmSpec:
    """Problem kind, operand types and the static extents N and K of D = [C +] A . B^T."""

    kind: str
    n: int
    k: int
    ab_dtype: str = "bf16"
    d_dtype: str = "bf16"
    has_c: bool = False
    arch: str = "sm_90a"
    alignment: int = 0  # psum kind: rows each group's segment is aligned to

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.ab_dtype not in AB_DTYPES:
            raise ValueError(f"ab_dtype: expected one of {AB_DTYPES}, got {self.ab_dtype!r}")
        if self.d_dtype not in D_DTYPES:
            raise ValueError(f"d_dtype: expected one of {D_DTYPES}, got {self.d_dtype!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        for name in ("n", "k"):
            value = getattr(self, name)
            if value <= 0 or value % 8 != 0:
                raise ValueError(f"{name}: expected a positive multiple of 8 (16-byte rows), got {value}")
        if self.has_c and self.kind != "dense":
            raise ValueError(f"has_c: C is supported for the dense kind only, got kind={self.kind!r}")
        if self.ab_dtype == "fp8_e4m3" and self.kind not in FP8_KINDS:
            raise ValueError(f"kind: FP8 supports {FP8_KINDS}, got {self.kind!r}")
        if (self.kind == "psum") != (self.alignment > 0):
            raise ValueError(f"alignment: expected a positive alignment exactly for the psum kind, "
                             f"got kind={self.kind!r}, alignment={self.alignment}")

    @property
    def fp8(self) -> bool:
        return self.ab_dtype == "fp8_e4m3"

    def key(self) -> str:
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class KernelConfig:
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
        if self.tile_m not in (64, 128):
            raise ValueError(f"tile_m: expected 64 or 128, got {self.tile_m}")
        if self.tile_n not in (64, 128, 256):
            raise ValueError(f"tile_n: expected 64, 128 or 256, got {self.tile_n}")
        if (self.cluster_m, self.cluster_n) not in ((1, 1), (2, 1), (1, 2)):
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
