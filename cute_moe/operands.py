"""Operand descriptors: element type, major mode and scale recipe of one GEMM operand.

The one place where dtype names are defined and converted (torch dtype <-> name <-> DSL type name).
A backend accepts or refuses a combination of descriptors; nothing else in the package branches on
operand types by hand. No cutlass import here (``import cute_moe`` must stay light).
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ElementType:
    """One element type: its name in specs and tables, torch dtype, DSL type name and bits."""

    name: str
    torch_dtype: torch.dtype
    dsl_name: str
    bits: int


ELEMENT_TYPES: dict[str, ElementType] = {t.name: t for t in (
    ElementType("bf16", torch.bfloat16, "BFloat16", 16),
    ElementType("fp32", torch.float32, "Float32", 32),
    ElementType("fp8_e4m3", torch.float8_e4m3fn, "Float8E4M3FN", 8),
    ElementType("fp4_e2m1", torch.int8, "Float4E2M1FN", 4),  # packed two per byte
)}
_BY_TORCH = {t.torch_dtype: t.name for t in ELEMENT_TYPES.values() if t.bits >= 8}

# Where the contiguous (stride-1) dimension of an operand lies: along K, or along M (A) / N (B).
MAJORS = ("k", "mn")

# Scale recipes: (granularity in MN, granularity in K, scale type); "none" for unscaled operands.
SCALE_RECIPES: dict[str, Optional[tuple[int, int, str]]] = {
    "none": None,
    "fp32_1x128": (1, 128, "fp32"),  # DeepSeek activations: one FP32 scale per row per 128 K
    "fp32_128x128": (128, 128, "fp32"),  # DeepSeek weights: one FP32 scale per 128x128 block
    "ue8m0_1x32": (1, 32, "ue8m0"),  # MX formats: one power-of-two scale per 32 K
}


def dtype_name(dtype: torch.dtype) -> str:
    """Name of a torch dtype in specs and tables ("bf16", "fp32", "fp8_e4m3"; else torch's name)."""
    return _BY_TORCH.get(dtype, str(dtype).replace("torch.", ""))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an element type name."""
    return element_type(name).torch_dtype


def element_type(name: str) -> ElementType:
    try:
        return ELEMENT_TYPES[name]
    except KeyError:
        raise ValueError(f"dtype: expected one of {tuple(ELEMENT_TYPES)}, got {name!r}") from None


def dsl_type(name: str):
    """The CuTe DSL numeric type of an element type name (imports cutlass)."""
    import cutlass

    return getattr(cutlass, element_type(name).dsl_name)


@dataclass(frozen=True)
class Operand:
    """One GEMM input: element type, major mode and scale recipe."""

    dtype: str = "bf16"
    major: str = "k"
    scale: str = "none"

    def __post_init__(self) -> None:
        element_type(self.dtype)
        if self.major not in MAJORS:
            raise ValueError(f"major: expected one of {MAJORS}, got {self.major!r}")
        if self.scale not in SCALE_RECIPES:
            raise ValueError(f"scale: expected one of {tuple(SCALE_RECIPES)}, got {self.scale!r}")
        if (self.scale == "none") != (element_type(self.dtype).bits >= 16):
            raise ValueError(f"scale: {self.dtype} operands {'need' if self.scale == 'none' else 'take no'} "
                             f"a scale recipe, got {self.scale!r}")

    @property
    def scaled(self) -> bool:
        return self.scale != "none"

    @property
    def label(self) -> str:
        """Short name: the dtype, with the major mode when it is not K."""
        return self.dtype if self.major == "k" else f"{self.dtype}:{self.major}"


BF16 = Operand("bf16")
FP8_PER_TOKEN = Operand("fp8_e4m3", scale="fp32_1x128")
FP8_PER_BLOCK = Operand("fp8_e4m3", scale="fp32_128x128")
MXFP4 = Operand("fp4_e2m1", scale="ue8m0_1x32")  # packed E2M1 weights, UE8M0 exponents per 32 K

# Named operand pairs (A, B) of the public ops and of the tools' --dtype option.
PRECISIONS: dict[str, tuple[Operand, Operand]] = {
    "bf16": (BF16, BF16),
    "fp8": (FP8_PER_TOKEN, FP8_PER_BLOCK),
    "fp8xfp4": (FP8_PER_TOKEN, MXFP4),
    "bf16xfp4": (BF16, MXFP4),
}


def operands_label(a: Operand, b: Operand) -> str:
    """Label of an operand pair in tables and logs: ``bf16``, ``fp8_e4m3``, ``fp8_e4m3xfp4_e2m1``."""
    return a.label if a.label == b.label else f"{a.label}x{b.label}"


def precision_of(label: str) -> tuple[Operand, Operand]:
    """The operand pair of a label written by operands_label (tables store labels)."""
    for a, b in PRECISIONS.values():
        if operands_label(a, b) == label:
            return a, b
    known = [operands_label(a, b) for a, b in PRECISIONS.values()]
    raise ValueError(f"operands: expected one of {known}, got {label!r}")
