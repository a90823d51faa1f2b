"""hc_pre backward over the streams (SIMT, 256 threads per CTA, FP32 math).

``grad_pre``: ``grad_pre[t, p] = sum_c grad_y[t, c] * x[t, p, c]`` (per-token reductions: registers,
butterfly shuffles, then shared memory across the 8 warps; 16-byte loads of 8-column chunks).
``grad_x``: ``grad_x[t, p, c] = pre[t, p] * grad_y[t, c] + sum_j grad_d[t, j] * fn[j, p*C + c]
+ 2 * grad_sqr[t] * x[t, p, c]`` (bf16): the collapse's, the projection's and the square-sum's
gradients in one pass over x (fn, 2.7 MB at C = 7168, is read from L2).
grad_x: CTA (b, s) covers the X_VEC-column chunks [256 b, 256 (b + 1)) of tokens [32 s, 32 (s + 1)); per
stream p a thread loads its 24 x X_VEC values of fn once and applies them to the 32 tokens (fn, read
from L2, costs T / 32 reads of its (2+n)n * n*C * 4 bytes). Between the two launches the host runs the
Sinkhorn backward on [T, (2+n)n] values.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass.memory import SmemAllocator

from .hc_simt import COLUMN_UNROLL, THREADS, VEC, WARPS, block_sums, load_vec, store_vec, vec_frag, vector_steps

TOKENS_PER_CTA = 32  # grad_x: tokens sharing one load of fn's columns
X_VEC = 4  # grad_x: columns per thread (8-byte bf16 and 16-byte fp32 accesses; 4 x 24 fn values in registers)


class HcPreBackward:
    """Compile-time n (streams) and C (hidden)."""

    def __init__(self, n: int, c: int):
        if n <= 0 or c <= 0 or c % VEC != 0:
            raise ValueError(f"n, c: expected positive sizes, c a multiple of {VEC}, got n={n}, c={c}")
        self.n, self.c = n, c
        self.width = (2 + n) * n
        self.scalars_per_token = self.width + n + 1
        self.x_chunks = c // X_VEC  # grad_x: X_VEC-column chunks
        self.chunks = c // VEC
        self.chunk_steps = vector_steps(c)  # grad_pre: 16-byte chunks

    @cute.jit
    def grad_pre(self, mGradY: cute.Tensor, mX: cute.Tensor, mGradPre: cute.Tensor, stream):
        """grad_y [T, C] bf16, x [T, n, C] bf16 -> grad_pre [T, n] fp32."""

        @cute.struct
        class SharedStorage:
            partials: cute.struct.MemRange[Float32, WARPS * self.n]

        self.shared_storage = SharedStorage
        self.grad_pre_kernel(mGradY, mX, mGradPre).launch(
            grid=(mX.shape[0], 1, 1), block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def grad_pre_kernel(self, mGradY: cute.Tensor, mX: cute.Tensor, mGradPre: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        n = self.n
        storage = SmemAllocator().allocate(self.shared_storage)
        partials = storage.partials.get_tensor(cute.make_layout(WARPS * n))
        sums = cute.make_rmem_tensor(cute.make_layout(n), Float32)
        sums.fill(0.0)
        frag = vec_frag(mX.element_type)
        for step in cutlass.range(self.chunk_steps, unroll=COLUMN_UNROLL):
            chunk = step * THREADS + tidx
            if chunk < self.chunks:
                g = load_vec(mGradY[(t, None)], chunk, frag)
                for p in cutlass.range_constexpr(n):
                    sums[p] = sums[p] + (g * load_vec(mX[(t, p, None)], chunk, frag)).reduce(
                        cute.ReductionOp.ADD, 0.0, 0)
        total = block_sums(sums, n, partials, tidx)
        if tidx < n:
            mGradPre[(t, tidx)] = total

    @cute.jit
    def grad_x(self, mGradY: cute.Tensor, mX: cute.Tensor, mFn: cute.Tensor, mPre: cute.Tensor,
               mGradD: cute.Tensor, mGradSqr: cute.Tensor, mGradX: cute.Tensor, stream):
        """grad_y [T, C], x [T, n, C] (bf16), fn [(2+n)n, n*C], pre [T, n], grad_d [T, (2+n)n],
        grad_sqr [T] (fp32) -> grad_x [T, n, C] bf16. Grid (C / (X_VEC * THREADS) column blocks,
        T / TOKENS_PER_CTA token blocks): a thread loads its X_VEC columns of fn once per stream p and
        uses them for TOKENS_PER_CTA tokens."""

        @cute.struct
        class SharedStorage:
            scalars: cute.struct.MemRange[Float32, TOKENS_PER_CTA * self.scalars_per_token]

        self.shared_storage = SharedStorage
        token_blocks = (mX.shape[0] + (TOKENS_PER_CTA - 1)) // TOKENS_PER_CTA
        column_blocks = -(-self.x_chunks // THREADS)
        self.grad_x_kernel(mGradY, mX, mFn, mPre, mGradD, mGradSqr, mGradX).launch(
            grid=(column_blocks, token_blocks, 1), block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def grad_x_kernel(self, mGradY: cute.Tensor, mX: cute.Tensor, mFn: cute.Tensor, mPre: cute.Tensor,
                      mGradD: cute.Tensor, mGradSqr: cute.Tensor, mGradX: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        column_block, token_block, _ = cute.arch.block_idx()
        n, width, stride = self.n, self.width, self.scalars_per_token
        tokens = mX.shape[0]
        first = token_block * TOKENS_PER_CTA
        storage = SmemAllocator().allocate(self.shared_storage)
        scalars = storage.scalars.get_tensor(cute.make_layout(TOKENS_PER_CTA * stride))
        # Per token: grad_d (width values), pre (n), grad_sqr (1); zeros past the last token.
        for r in cutlass.range_constexpr(-(-(TOKENS_PER_CTA * stride) // THREADS)):
            index = r * THREADS + tidx
            if index < TOKENS_PER_CTA * stride:
                token = index // stride
                j = index - token * stride
                t = first + token
                value = Float32(0.0)
                if t < tokens:
                    if j < width:
                        value = mGradD[(t, j)]
                    elif j < width + n:
                        value = mPre[(t, j - width)]
                    else:
                        value = mGradSqr[t]
                scalars[index] = value
        cute.arch.sync_threads()
        chunk = column_block * THREADS + tidx
        if chunk < self.x_chunks:
            frag = vec_frag(mX.element_type, X_VEC)
            frag_fn = vec_frag(Float32, X_VEC)
            for p in cutlass.range_constexpr(n):
                fn = [load_vec(mFn[(j, None)], p * self.x_chunks + chunk, frag_fn) for j in range(width)]
                for token in cutlass.range(TOKENS_PER_CTA, unroll=2):
                    t = first + token
                    if t < tokens:
                        base = token * stride
                        g = load_vec(mGradY[(t, None)], chunk, frag)
                        x = load_vec(mX[(t, p, None)], chunk, frag)
                        acc = g * scalars[base + width + p] + x * (2.0 * scalars[base + width + n])
                        for j in cutlass.range_constexpr(width):
                            acc = acc + fn[j] * scalars[base + j]
                        store_vec(acc, mGradX[(t, p, None)], chunk, frag)
