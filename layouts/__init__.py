"""Host-side layouts for the MoE GEMMs: FP8 casts, scale-factor layouts and token permutations."""

from .alignment import (
    align,
    get_mk_alignment_for_contiguous_layout,
    get_theoretical_mk_alignment_for_contiguous_layout,
    set_mk_alignment_for_contiguous_layout,
)
from .quantization import (
    FP8_E4M3_MAX,
    ceil_to_ue8m0,
    per_block_cast_to_fp8,
    per_block_dequant,
    per_channel_cast_to_fp8,
    per_channel_dequant,
    per_token_cast_to_fp8,
    per_token_dequant,
)
from .scale_factors import (
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
    transform_sf_into_required_layout,
)
from .token_layout import (
    ContiguousLayout,
    MaskedLayout,
    build_contiguous_layout,
    build_masked_layout,
    layout_masked_to_psum,
    masked_m_to_psum,
    permute_tokens,
    psum_to_grouped_layout,
    unpermute_and_reduce,
)

__all__ = [
    "FP8_E4M3_MAX",
    "ContiguousLayout",
    "MaskedLayout",
    "align",
    "build_contiguous_layout",
    "build_masked_layout",
    "ceil_to_ue8m0",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_mn_major_tma_aligned_tensor",
    "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_tma_aligned_size",
    "layout_masked_to_psum",
    "masked_m_to_psum",
    "per_block_cast_to_fp8",
    "per_block_dequant",
    "per_channel_cast_to_fp8",
    "per_channel_dequant",
    "per_token_cast_to_fp8",
    "per_token_dequant",
    "permute_tokens",
    "psum_to_grouped_layout",
    "set_mk_alignment_for_contiguous_layout",
    "transform_sf_into_required_layout",
    "unpermute_and_reduce",
]
