"""Static description of a GEMM problem (``GemmSpec``), independent of any arch.

Together with the target arch (part of the spec) and a backend's kernel config, it is everything a
compiled object depends on: token counts never are. Which specs an arch can run is the backend's
decision (``arch.get_backend(spec.arch).check(spec, config)``).
"""

from dataclasses import asdict, dataclass, field

from .arch import check_arch, default_arch
from .operands import BF16, Operand, element_type, operands_label

# Problem kinds: how rows are grouped (see kernels/scheduler.py); k_grouped groups the reduction
# dimension instead (weight gradients: D [G, M, N], K rows per group known at launch). The
# gathered_swiglu kinds are the MoE layer's fused GEMM1 (ragged rows gathered from x by a row index,
# SwiGLU epilogue; n = 2I, k = H; the _h kind also writes the pre-activations h); gathered_swiglu_backward
# is its backward dact GEMM (dO rows gathered, w2 N-major, SwiGLU backward epilogue; n = I, k = H).
KINDS = ("dense", "contiguous", "psum", "masked", "ragged", "k_grouped", "gathered_swiglu", "gathered_swiglu_h",
         "gathered_swiglu_backward")
# Kinds whose launches may add C to the product.
C_KINDS = ("dense", "k_grouped")
D_DTYPES = ("bf16", "fp32")
# Kinds whose groups start on multiples of the contiguous-layout alignment.
ALIGNED_KINDS = ("contiguous", "psum")


@dataclass(frozen=True)
class GemmSpec:
    """Problem kind, operands (their majors included), output type and the static extents N and K of
    D = [C +] A . B^T. For ``k_grouped`` the reduction extent is grouped and dynamic: ``k`` holds M,
    the rows of each group's D block (the static extent besides N)."""

    kind: str
    n: int
    k: int
    a: Operand = field(default=BF16)
    b: Operand = field(default=BF16)
    d_dtype: str = "bf16"
    has_c: bool = False
    arch: str = field(default_factory=default_arch)
    alignment: int = 0  # psum kind: rows each group's segment is aligned to

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        for name in ("a", "b"):
            if not isinstance(getattr(self, name), Operand):
                raise TypeError(f"{name}: expected an Operand, got {type(getattr(self, name)).__name__}")
        if self.d_dtype not in D_DTYPES:
            raise ValueError(f"d_dtype: expected one of {D_DTYPES}, got {self.d_dtype!r}")
        element_type(self.d_dtype)
        check_arch(self.arch)
        for name in ("n", "k"):
            value = getattr(self, name)
            if value <= 0 or value % 8 != 0:
                raise ValueError(f"{name}: expected a positive multiple of 8 (16-byte rows), got {value}")
        if self.has_c and self.kind not in C_KINDS:
            raise ValueError(f"has_c: C is supported for the kinds {C_KINDS} only, got kind={self.kind!r}")
        if (self.kind == "psum") != (self.alignment > 0):
            raise ValueError(f"alignment: expected a positive alignment exactly for the psum kind, "
                             f"got kind={self.kind!r}, alignment={self.alignment}")

    @property
    def operands(self) -> str:
        """Label of the operand pair (``bf16``, ``fp8_e4m3``, ...)."""
        return operands_label(self.a, self.b)

    def key(self) -> str:
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())

    @classmethod
    def from_dict(cls, data: dict) -> "GemmSpec":
        """Inverse of ``dataclasses.asdict`` (cache manifests store specs that way)."""
        data = dict(data)
        for name in ("a", "b"):
            if isinstance(data.get(name), dict):
                data[name] = Operand(**data[name])
        return cls(**data)

