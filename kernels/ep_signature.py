"""Launch signatures of the EP dispatch / combine kernels and their compilation on any machine.

Every buffer crosses as a 64-bit address (Int64); the one tensor argument, the CTA call counters
(int32 [num_ctas] on the launch device), gives TVM-FFI the device, and the kernel runs on the caller's
current CUDA stream (so it is captured by CUDA graphs). The token count is a runtime Int32.

    dispatch(x, x_scales, topk_idx, topk_w, num_tokens, peers, rank, calls, slot_row, scan, err,
             out_x, out_scales, out_counts, out_raw_counts, out_src_info, stats, timeout_ns)
    combine(y, topk_idx, num_tokens, peers, rank, calls, dispatch_calls, slot_row, err, out, timeout_ns)
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream
from cutlass.cute.typing import Int32, Int64

from cute_moe.ep_layout import EPGeometry

from .ep_combine import EPCombineKernel
from .ep_dispatch import EPDispatchKernel

DISPATCH_ADDRESSES_BEFORE_COUNT = 4  # x, x_scales, topk_idx, topk_w
DISPATCH_ADDRESSES_AFTER_CALLS = 9  # slot_row ... stats
COMBINE_ADDRESSES_AFTER_CALLS = 4  # dispatch_calls, slot_row, err, out


def _calls(geom: EPGeometry):
    return make_fake_compact_tensor(cutlass.Int32, (geom.num_ctas,), assumed_align=4)


def _options(arch: str) -> str:
    return f"--enable-tvm-ffi --gpu-arch {arch}"


def compile_dispatch(geom: EPGeometry, layout: str, idx_bytes: int, arch: str = "sm_90a"):
    """Compile the dispatch kernel of ``geom`` for ``layout`` ('masked' | 'psum') and int32/int64 ids."""
    kernel = EPDispatchKernel(geom, layout, idx_bytes)
    args = ([Int64(0)] * DISPATCH_ADDRESSES_BEFORE_COUNT + [Int32(0), Int64(0), Int32(0), _calls(geom)]
            + [Int64(0)] * DISPATCH_ADDRESSES_AFTER_CALLS + [Int64(0), make_fake_stream(use_tvm_ffi_env_stream=True)])
    return cute.compile(kernel, *args, options=_options(arch))


def compile_combine(geom: EPGeometry, idx_bytes: int, arch: str = "sm_90a"):
    """Compile the combine kernel of ``geom`` for int32/int64 ids."""
    kernel = EPCombineKernel(geom, idx_bytes)
    args = ([Int64(0), Int64(0), Int32(0), Int64(0), Int32(0), _calls(geom)]
            + [Int64(0)] * COMBINE_ADDRESSES_AFTER_CALLS + [Int64(0), make_fake_stream(use_tvm_ffi_env_stream=True)])
    return cute.compile(kernel, *args, options=_options(arch))
