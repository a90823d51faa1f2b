"""Byte transpose (SIMT, shared-memory tiled): ``dst[b, c, r] = src[b, r, c]`` for uint8 ``[B, R, C]``.

Copies an MN-major FP8 operand ``[.., K, MN]`` into K-major form ``[.., MN, K]`` (cute_moe/fp8_backward.py)
at memory speed: each CTA moves one TILE x TILE block; its 256 threads read the block's rows with
16-byte loads into shared memory, meet at a barrier, then each gathers 16 bytes of one column and
writes them as one 16-byte store of the output row. R and C are multiples of 16 with 16-byte
aligned rows (the host checks; it falls back to a torch copy otherwise), so a vector is either
wholly inside the tensor or wholly outside; blocks at the edges skip the outside vectors.
"""

import cutlass
import cutlass.cute as cute
from cutlass.memory import SmemAllocator

TILE = 64  # bytes per side of a CTA's block
VEC = 16  # bytes per global load / store
VECS_PER_ROW = TILE // VEC
THREADS = TILE * VECS_PER_ROW  # one 16-byte vector per thread in each phase
PAD = 4  # bytes after each shared row: the column reads of rows 16 apart hit different banks
ROW_BYTES = 16  # R and C must be multiples of this: rows of whole 16-byte vectors


class ByteTranspose:
    """uint8 ``[B, R, C]`` -> ``[B, C, R]`` (R, C multiples of 16; B, R, C dynamic)."""

    @cute.jit
    def __call__(self, mSrc: cute.Tensor, mDst: cute.Tensor, stream):
        @cute.struct
        class SharedStorage:
            block: cute.struct.Align[cute.struct.MemRange[cutlass.Uint8, TILE * (TILE + PAD)], 16]

        self.shared_storage = SharedStorage
        batches, rows, cols = mSrc.shape
        # Row blocks on x (R may be a token count: up to 2^31 - 1 blocks), column blocks on y.
        grid = ((rows + (TILE - 1)) // TILE, (cols + (TILE - 1)) // TILE, batches)
        self.kernel(mSrc, mDst).launch(grid=grid, block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mSrc: cute.Tensor, mDst: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        row_block, col_block, batch = cute.arch.block_idx()
        storage = SmemAllocator().allocate(self.shared_storage)
        block = storage.block.get_tensor(cute.make_layout((TILE, TILE), stride=(TILE + PAD, 1)))
        rows, cols = mSrc.shape[1], mSrc.shape[2]
        row0, col0 = row_block * TILE, col_block * TILE
        line, vec = tidx // VECS_PER_ROW, tidx % VECS_PER_ROW  # a row of the block, a 16-byte part of it
        frag = cute.make_rmem_tensor(cute.make_layout(VEC), cutlass.Uint8)

        # Read: row row0 + line, bytes [col0 + 16 vec, + 16) -> block[line, 16 vec + i].
        if row0 + line < rows and col0 + vec * VEC < cols:
            src_row = mSrc[(batch, row0 + line, None)]
            cute.autovec_copy(cute.local_tile(src_row, (VEC,), (col_block * VECS_PER_ROW + vec,)), frag)
            for i in cutlass.range_constexpr(VEC):
                block[(line, vec * VEC + i)] = frag[i]
        cute.arch.sync_threads()

        # Write: output row col0 + line, bytes [row0 + 16 vec, + 16) <- block[16 vec + i, line].
        if col0 + line < cols and row0 + vec * VEC < rows:
            for i in cutlass.range_constexpr(VEC):
                frag[i] = block[(vec * VEC + i, line)]
            dst_row = mDst[(batch, col0 + line, None)]
            cute.autovec_copy(frag, cute.local_tile(dst_row, (VEC,), (row_block * VECS_PER_ROW + vec,)))


def compile_byte_transpose(arch: str = "sm_90a"):
    """Compile the transpose for ``arch``; returns the TVM-FFI function ``fn(src, dst)`` on uint8
    ``[B, R, C]`` / ``[B, C, R]`` torch tensors (row-major, 16-byte aligned, R and C multiples of 16),
    launched on the caller's current CUDA stream."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    batches = cute.sym_int()
    rows, cols = cute.sym_int(divisibility=ROW_BYTES), cute.sym_int(divisibility=ROW_BYTES)
    src = make_fake_compact_tensor(cutlass.Uint8, (batches, rows, cols), stride_order=(2, 1, 0), assumed_align=16)
    dst = make_fake_compact_tensor(cutlass.Uint8, (batches, cols, rows), stride_order=(2, 1, 0), assumed_align=16)
    return cute.compile(ByteTranspose(), src, dst, make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=f"--enable-tvm-ffi --gpu-arch {arch}")

