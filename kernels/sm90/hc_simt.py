"""Shared pieces of the per-token SIMT hyper-connection kernels: launch shape, 16-byte vector access
along C, and the block reduction."""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

THREADS = 256  # threads per CTA; thread i handles columns i, i + THREADS, ... of a token
WARP = 32
WARPS = THREADS // WARP
COLUMN_UNROLL = 4  # column steps unrolled, so a thread has several loads in flight
VEC = 8  # bf16 values per 16-byte access: thread i of a CTA handles the column chunks i, i + THREADS, ...
ALIGN_BYTES = 16  # every bf16 row of C values starts 16-byte aligned (C % VEC == 0, checked by the host)


def vector_steps(c: int) -> int:
    """Chunk steps of one token row of C (a multiple of VEC) over the CTA's threads."""
    return -(-(c // VEC) // THREADS)


@cute.jit
def load_vec(row: cute.Tensor, chunk: Int32, frag: cute.Tensor):
    """Values ``row[chunk*w : (chunk+1)*w]`` of a 1-D row, w = size of ``frag`` (a register tensor of
    the row's dtype; one 16-byte load for 8 bf16 or 4 fp32), as FP32."""
    width = cute.size(frag.layout)
    cute.autovec_copy(cute.local_tile(row, (width,), (chunk,)), frag)
    return frag.load().to(Float32)


@cute.jit
def store_vec(values, row: cute.Tensor, chunk: Int32, frag: cute.Tensor):
    """Write FP32 ``values`` to ``row[chunk*w : (chunk+1)*w]`` in the row's dtype through ``frag`` (a
    w-long register tensor of that dtype; one 16-byte store for 8 bf16)."""
    width = cute.size(frag.layout)
    frag.store(values.to(row.element_type))
    cute.autovec_copy(frag, cute.local_tile(row, (width,), (chunk,)))


def vec_frag(dtype, width: int = VEC):
    """A ``width``-long register tensor of ``dtype`` for load_vec / store_vec."""
    return cute.make_rmem_tensor(cute.make_layout(width), dtype)


@cute.jit
def block_sums(sums: cute.Tensor, count: cutlass.Constexpr[int], partials: cute.Tensor, tidx: Int32) -> Float32:
    """Sum ``sums[i]`` (i < count, one register array per thread) over the CTA: butterfly shuffles in
    each warp, then ``partials`` (shared, WARPS * count floats) across warps. Thread i < count
    returns the CTA's total of entry i (other threads return 0). Every thread must call it."""
    lane = tidx % WARP
    warp = tidx // WARP
    for i in cutlass.range_constexpr(count):
        value = sums[i]
        for shift in cutlass.range_constexpr(5):
            value = value + cute.arch.shuffle_sync_bfly(value, offset=WARP >> (shift + 1))
        if lane == 0:
            partials[warp * count + i] = value
    cute.arch.sync_threads()
    total = Float32(0.0)
    if tidx < count:
        for w in cutlass.range_constexpr(WARPS):
            total = total + partials[w * count + tidx]
    return total
