"""Widening MXFP4 weights in shared memory (SM90 has no FP4 tensor-core path): the E2M1 constants and
the per-block widening shared by the kernels that widen a packed B k-block into a swizzled BF16 / E4M3
tile before WGMMA reads it (``fp4_grouped_gemm.py``, ``kernels/mega_moe_fp4.py``).

One work item is one 32-element block of one weight row: 16 packed bytes (element 2i in the low
nibble) -> 32 values ``value(code) * 2^shift``. BF16 widening takes the UE8M0 exponent itself (exact:
BF16 has FP32's exponent range); E4M3 widening takes the block's shift ``e - e_max`` against the
largest exponent of the row's 128-K block, which the kernel applies when it promotes the block.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from . import fp4_widen_bits as widen_bits
from .grouped_gemm import SMEM_CAPACITY, SMEM_RESERVED_BYTES

MX_BLOCK = 32  # K elements per UE8M0 exponent
PACKED_PER_BLOCK = MX_BLOCK // 2  # bytes of one 32-element block
WIDEN_BARRIER_ID = 2  # 0: __syncthreads, 1: the epilogue's barrier
BYTE_MASK = 0xFF
CODES_PER_WORD = 8  # E2M1 codes in one 32-bit word of the packed tile
# An E2M1 code's three magnitude bits (e1 e0 m) placed at FP32 bits 24..22 and its sign at bit 31
# give exactly value(code) * 2^-126: exponent field e (e >= 1: 2^(e-127) * (1 + m/2); e = 0: the
# subnormal m * 2^-127). The kernels multiply by 2^126 (folded into the scale for FP8) in FP32
# without flush-to-zero.
E2M1_MAG_MASK = 0x7
E2M1_SIGN_BIT = 0x8
E2M1_MAG_SHIFT = 22
E2M1_RAW_SHIFT = 126
FP32_SIGN_SHIFT = 28  # E2M1 sign bit (bit 3) -> FP32 sign bit (bit 31)
FP32_MANTISSA_BITS = 23
FP32_BIAS = 127
FP32_SUBNORMAL_2_POW_M127 = 1 << 22  # 2^-127, UE8M0 exponent 0
FP32_MIN_NORMAL_EXP = 1
SWIZZLE_ALIGN_BYTES = 1024  # a 128-byte swizzle pattern repeats every 1024 bytes


@dsl_user_op
def prmt(a, b, selector, *, loc=None, ip=None) -> Int32:
    """PTX ``prmt.b32`` (byte permute of the 8 bytes ``b:a``); pure, so the compiler may schedule it."""
    return Int32(llvm.inline_asm(T.i32(), [Int32(x).ir_value(loc=loc, ip=ip) for x in (a, b, selector)],
                                 "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", has_side_effects=False,
                                 is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


class E2m1Widening:
    """Mixin of a kernel configuration with ``fp8`` (widen to E4M3, else BF16), ``ab_dtype`` (the
    widened type), ``tile_shape_mnk``, ``requested_stages`` (0: as many as fit), ``stages`` and
    ``table_len`` (the shared-memory struct's ring and group table)."""

    def stage_count(self, stage_bytes: int, fixed_bytes: int) -> int:
        """Stages of ``stage_bytes`` that fit in shared memory beside ``fixed_bytes``, the group table and
        the barriers (the requested count when smaller); at least 2."""
        fit = (SMEM_CAPACITY - SMEM_RESERVED_BYTES - self.table_len * 4 - fixed_bytes) // stage_bytes
        stages = fit if self.requested_stages == 0 else min(self.requested_stages, fit)
        if stages < 2:
            raise ValueError(f"stages: tile {self.tile_shape_mnk} leaves room for {fit} stages, need 2")
        return stages

    def storage_struct(self, **buffers):
        """The CTA's shared-memory struct: the stage ring's mbarriers, the scheduler's group table, then
        ``buffers`` in order (name -> (element type, count, alignment in bytes))."""
        fields = {"mainloop_barriers": cute.struct.MemRange[cutlass.Int64, self.stages * 2],
                  "group_values": cute.struct.MemRange[Int32, self.table_len]}
        for name, (dtype, count, alignment) in buffers.items():
            fields[name] = cute.struct.Align[cute.struct.MemRange[dtype, count], alignment]
        return cute.struct(type("SharedStorage", (), {"__annotations__": fields}))

    @staticmethod
    def set_block_accumulate(tiled_mma: cute.TiledMma, first_mma: cute.TiledMma):
        """FP8 block accumulators: a block's first WGMMA overwrites (``first_mma``), the others add."""
        first_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)

    @cute.jit
    def mma_fp8_block(self, tiled_mma, first_mma, tCrA, tCrB, block_acc, num_k_blocks: cutlass.Constexpr[int],
                      stage: Int32, buffer: Int32):
        """Issue and commit one 128-K block's WGMMAs into ``block_acc`` (overwritten by the first)."""
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(num_k_blocks):
            mma = first_mma if kb == 0 else tiled_mma
            cute.gemm(mma, block_acc, tCrA[(None, None, kb, stage)], tCrB[(None, None, kb, buffer)], block_acc)
        cute.nvgpu.warpgroup.commit_group()

    @cute.jit
    def widen_item(self, sP: cute.Tensor, sW: cute.Tensor, stage: Int32, buffer: Int32, n: Int32, b: Int32,
                   exponent: Int32, fast):
        """Widen block ``b`` of row ``n`` of the packed tile of ``stage`` (``sP``: (rows, bytes, stages))
        into the widened tile ``buffer`` (``sW``: (rows, K, buffers)): the byte-permute path where
        ``fast`` holds, the exact FP32 path elsewhere (``exponent``: see ``widen_words``)."""
        packed = cute.make_rmem_tensor((PACKED_PER_BLOCK,), cutlass.Uint8)
        cute.autovec_copy(cute.local_tile(sP[(n, None, stage)], (PACKED_PER_BLOCK,), (b,)), packed)
        widened = cute.make_rmem_tensor((MX_BLOCK,), self.ab_dtype)
        words = cute.recast_tensor(packed, Int32)
        if fast:
            self.widen_words(words, cute.recast_tensor(widened, Int32), exponent)
        else:
            self.widen_exact(words, widened, exponent)
        cute.autovec_copy(widened, cute.local_tile(sW[(n, None, buffer)], (MX_BLOCK,), (b,)))

    @cute.jit
    def widen_words(self, words: cute.Tensor, out: cute.Tensor, exponent: Int32):
        """Fast path: 4 packed words -> 8 (E4M3) / 16 (BF16) widened words by byte-permute lookups
        (``fp4_widen_bits``); ``exponent`` is the block shift (FP8) or the UE8M0 exponent (BF16)."""
        if cutlass.const_expr(self.fp8):
            tables = widen_bits.e4m3_tables(exponent)
            for j in cutlass.range_constexpr(PACKED_PER_BLOCK // 4):
                first, second = widen_bits.e4m3_words(words[j], tables, prmt)
                out[2 * j] = first
                out[2 * j + 1] = second
        else:
            tables = widen_bits.bf16_tables(exponent, prmt)
            for j in cutlass.range_constexpr(PACKED_PER_BLOCK // 4):
                w0, w1, w2, w3 = widen_bits.bf16_words(words[j], tables, prmt)
                out[4 * j] = w0
                out[4 * j + 1] = w1
                out[4 * j + 2] = w2
                out[4 * j + 3] = w3

    @cute.jit
    def widen_exact(self, words: cute.Tensor, widened: cute.Tensor, exponent: Int32):
        """Exact FP32 path for every exponent (the fast path's domain ends at subnormal or infinite
        results): codes placed as FP32 ``value * 2^-126``, scaled without flush-to-zero, rounded once;
        one packed word (8 values) at a time. ``exponent`` is the block shift (FP8) or the UE8M0
        exponent (BF16)."""
        shift = exponent
        if cutlass.const_expr(self.fp8):
            shift = exponent + FP32_BIAS + E2M1_RAW_SHIFT  # value * 2^(e - e_max)
        scale = self.pow2(shift)  # BF16: value * 2^(e - 127), after the 2^126 below
        for w in cutlass.range_constexpr(PACKED_PER_BLOCK // 4):
            bits = cute.make_rmem_tensor((CODES_PER_WORD,), Int32)
            for i in cutlass.range_constexpr(CODES_PER_WORD):
                code = words[w] >> (4 * i)  # bits taken here, inside the slow path
                bits[i] = (code & E2M1_MAG_MASK) << E2M1_MAG_SHIFT | (code & E2M1_SIGN_BIT) << FP32_SIGN_SHIFT
            values = cute.recast_tensor(bits, Float32).load()
            if cutlass.const_expr(not self.fp8):
                values = values * Float32(2.0 ** E2M1_RAW_SHIFT)  # exact, normal results
            cute.local_tile(widened, (CODES_PER_WORD,), (w,)).store((values * scale).to(self.ab_dtype))

    @cute.jit
    def pow2(self, biased: Int32) -> Float32:
        """2^(biased - 127) exactly for biased in [0, 254] (0 gives the subnormal 2^-127); 0 below."""
        bits = cute.make_rmem_tensor((1,), Int32)
        bits[0] = Int32(0)
        if biased == 0:
            bits[0] = Int32(FP32_SUBNORMAL_2_POW_M127)
        if biased >= FP32_MIN_NORMAL_EXP:
            bits[0] = biased << FP32_MANTISSA_BITS
        return cute.recast_tensor(bits, Float32)[0]
