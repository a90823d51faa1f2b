"""Launch signature of the Mega MoE kernel and its compilation with fake tensors (any machine).

    fn(pool, pool_sf, l1, s1, inter, inter_sf, l2, s2, calls, y, num_tokens, peers, rank, work, err,
       stats, clamp, timeout_ns)

Tensors (every shape static, fixed by the geometry): pool ``[pool_rows, H]`` and inter
``[pool_rows, I]`` uint8 (FP8 bytes) or BF16, their FP32 scales ``[pool_rows, blocks]`` MN-major (row stride
1, block stride ``scale_pitch``), weights l1 ``[L, 2I, H]`` / l2 ``[L, H, I]`` uint8 with block scales
s1 ``[L, 2I/128, H/128]`` / s2 ``[L, H/128, I/128]`` (BF16: no scales, None; FP8 x FP4: packed l1
``[L, 2I, H/2]`` / l2 ``[L, H, I/2]`` uint8 with int32 exponent words s1 ``[L, H/128, 2I]`` / s2
``[L, I/128, H]``), calls int32 ``[grid]``. The rest cross as
64-bit addresses (y, peers' base-address array, the int32 work tables, the host-mapped error record,
the optional stats, 0 = none) and scalars (tokens, rank, clamp, timeout). The kernel runs on the
caller's current CUDA stream (so CUDA graphs capture it).
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor
from cutlass.cute.typing import Float32, Int32, Int64

from cute_moe.mega_moe_layout import ROW_EXPONENT_ROWS, SCALE_BLOCK, MegaMoEGeometry

from .mega_moe import Sm90MegaMoE
from .mega_moe_fp4 import Sm90Fp4MegaMoE

ALIGN_BYTES = 16


def _row_major(dtype, shape: tuple):
    order = tuple(range(len(shape) - 1, -1, -1))
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=ALIGN_BYTES)


def _mn_major_scales(rows: int, blocks: int, pitch: int):
    return make_fake_tensor(cutlass.Float32, (rows, blocks), stride=(1, pitch), assumed_align=ALIGN_BYTES)


def fake_arguments(geom: MegaMoEGeometry) -> tuple:
    """Fake arguments of ``Sm90MegaMoE.__call__`` for ``geom`` (BF16: no scale tensors; FP8 x FP4:
    packed weights and int32 exponent words in place of the FP8 weights and their block scales)."""
    L, H, I, rows = geom.local_experts, geom.hidden, geom.intermediate, geom.pool_rows
    act = cutlass.Uint8 if geom.fp8 else cutlass.BFloat16
    w1_shape, w2_shape = (L, 2 * I, H), (L, H, I)
    scales = [None] * 4
    if geom.fp8:
        scales = [_mn_major_scales(rows, geom.hidden_blocks, geom.scale_pitch),
                  _row_major(cutlass.Float32, (L, 2 * I // SCALE_BLOCK, geom.hidden_blocks)),
                  _mn_major_scales(rows, geom.inter_blocks, geom.scale_pitch),
                  _row_major(cutlass.Float32, (L, geom.hidden_blocks, geom.inter_blocks))]
    if geom.fp4:
        w1_shape, w2_shape = (L, 2 * I, H // 2), (L, H, I // 2)
        scales[1] = _row_major(cutlass.Int32, (L, geom.hidden_blocks + ROW_EXPONENT_ROWS, 2 * I))
        scales[3] = _row_major(cutlass.Int32, (L, geom.inter_blocks + ROW_EXPONENT_ROWS, H))
    return (
        _row_major(act, (rows, H)), scales[0], _row_major(act, w1_shape), scales[1],
        _row_major(act, (rows, I)), scales[2], _row_major(act, w2_shape), scales[3],
        make_fake_compact_tensor(cutlass.Int32, (geom.num_ctas,), assumed_align=4),
        Int64(0), Int32(0), Int64(0), Int32(0), Int64(0), Int64(0), Int64(0), Float32(0.0), Int64(0),
        make_fake_stream(use_tvm_ffi_env_stream=True))


def mega_moe_kernel(geom: MegaMoEGeometry, clamp: bool, block_m: int) -> Sm90MegaMoE:
    """The kernel configuration of ``geom`` (FP8, BF16, or FP8 x FP4 when ``geom.fp4``; ``clamp``: with
    the SwiGLU clamp; ``block_m``: tile height and expert segment alignment, one of ``BLOCK_SIZES``)."""
    return (Sm90Fp4MegaMoE if geom.fp4 else Sm90MegaMoE)(geom, clamp, block_m)


def compile_mega_moe(geom: MegaMoEGeometry, clamp: bool, block_m: int, arch: str = "sm_90a",
                     extra_options: str = ""):
    """Compile ``mega_moe_kernel(geom, clamp, block_m)`` for ``arch``; ``extra_options``: more
    ``cute.compile`` options (e.g. ``--keep-cubin``)."""
    options = f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip()
    return cute.compile(mega_moe_kernel(geom, clamp, block_m), *fake_arguments(geom), options=options)
