"""How a public op receives one operand of a given descriptor: unpacking, checks, kernel form.

Unscaled operands are plain tensors; scaled ones are ``(tensor, scale_factors)`` pairs (DeepGEMM's
convention). FP8 tensors cross into the kernels as uint8 views (DLPack-safe); per-token FP32 scales
are moved into the MN-major, TMA-aligned layout the kernels read when they are not in it already.
"""

from typing import Optional

import torch

from .layouts.scale_factors import get_mn_major_tma_aligned_tensor
from .operands import SCALE_RECIPES, Operand, torch_dtype
from .validation import check_contiguous, check_multiple, check_shape, check_tensor

FP8_ROW_BYTES = 16  # FP8 rows must be whole 16-byte TMA units
FP32 = (torch.float32,)


def _blocks(extent: int, granularity: int) -> int:
    return -(-extent // granularity)


class OperandIO:
    """One operand of an op: ``name`` for the tensor, ``sf_name`` for its scale factors."""

    def __init__(self, operand: Operand, name: str, sf_name: str):
        self.operand = operand
        self.name = name
        self.sf_name = sf_name
        self.dtypes = (torch_dtype(operand.dtype),)
        self.recipe = SCALE_RECIPES[operand.scale]
        # An MN-major operand is given as the row-major [.., K, MN] tensor (DeepGEMM's nn / tn / tt).
        self.transposed = operand.major == "mn"

    def split(self, value) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tensor, scales or None); a scaled operand must be a pair of tensors."""
        if self.recipe is None:
            return value, None
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"{self.name}: expected a (tensor, scale_factors) pair, got {type(value).__name__}")
        for label, t in ((self.name, value[0]), (self.sf_name, value[1])):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
        return value[0], value[1]

    def check(self, t: torch.Tensor, ndim: int) -> None:
        check_tensor(self.name, t, self.dtypes, ndim)

    @property
    def as_given(self) -> str:
        """How the operand's shape reads in error messages (MN-major operands are [.., K, MN])."""
        return " as [.., K, MN]" if self.transposed else ""

    def logical(self, t: torch.Tensor) -> torch.Tensor:
        """The operand as ``[.., MN, K]`` (a transposed view of an MN-major operand)."""
        return t.transpose(-2, -1) if self.transposed else t

    def kernel(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor as the kernel takes it: ``[.., MN, K]`` (MN-major: a transposed view), FP8 as uint8."""
        if self.transposed:
            t = t.transpose(-2, -1)
        return t if self.recipe is None else t.view(torch.uint8)

    def kernel_scales(self, sf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Scales as the kernel reads them: per-row (1 x K-block) scales MN-major and TMA-aligned."""
        if sf is None or self.recipe[0] != 1:
            return sf
        if sf.dim() >= 2 and sf.stride(-2) == 1 and sf.stride(-1) % 4 == 0 and sf.data_ptr() % 16 == 0:
            return sf
        check_tensor(self.sf_name, sf, FP32, sf.dim())
        return get_mn_major_tma_aligned_tensor(sf)

    def check_scales(self, sf: Optional[torch.Tensor], lead: tuple, k: int, n: int = 0) -> None:
        """Scale factors of shape ``lead + [MN blocks] + [K blocks]`` (MN blocks only for block scales;
        per-row scales take the rows in ``lead``)."""
        if self.recipe is None:
            return
        mn_gran, k_gran, _ = self.recipe
        shape = lead + ((_blocks(n, mn_gran),) if mn_gran > 1 else ()) + (_blocks(k, k_gran),)
        check_tensor(self.sf_name, sf, FP32, len(shape))
        check_shape(self.sf_name, sf, shape)
        if mn_gran > 1:
            check_contiguous(self.sf_name, sf)
        check_multiple(self.name, k, FP8_ROW_BYTES, "K (16-byte FP8 rows)")
