"""Fused hc_post forward and backward (SIMT, one CTA of 256 threads per token, FP32 math).

Forward: ``out[t, q, c] = post[t, q] * f[t, c] + sum_p comb[t, p, q] * res[t, p, c]`` (bf16 out),
reading f and the n streams once and writing the n output streams once.
Backward, from ``g = d out`` (bf16): ``grad_f[c] = sum_q post[q] g[q, c]`` and
``grad_res[p, c] = sum_q comb[p, q] g[q, c]`` (bf16, written while streaming), and the per-token
reductions over C ``grad_post[q] = sum_c g[q, c] f[c]``, ``grad_comb[p, q] = sum_c res[p, c] g[q, c]``
(FP32): each thread keeps n + n*n partial sums in registers, warps reduce them with butterfly
shuffles, shared memory joins the warps. Thread i handles the 8-column chunks i, i + 256, ... with
16-byte loads and stores (C a multiple of 8, rows 16-byte aligned: checked by the host).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass.memory import SmemAllocator

from .hc_simt import COLUMN_UNROLL, THREADS, VEC, WARPS, block_sums, load_vec, store_vec, vec_frag, vector_steps


class HcPost:
    """Compile-time n (streams) and C (hidden)."""

    def __init__(self, n: int, c: int):
        if n <= 0 or c <= 0 or c % VEC != 0:
            raise ValueError(f"n, c: expected positive sizes, c a multiple of {VEC}, got n={n}, c={c}")
        self.n, self.c = n, c
        self.chunks = c // VEC
        self.iters = vector_steps(c)
        self.num_sums = n + n * n  # grad_post then grad_comb (row-major p, q)
        if self.num_sums > THREADS:
            raise ValueError(f"n: expected n + n*n <= {THREADS}, got n={n}")

    @cute.jit
    def forward(self, mF: cute.Tensor, mRes: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor,
                mOut: cute.Tensor, stream):
        """f [T, C], res [T, n, C], post [T, n], comb [T, n, n] -> out [T, n, C]."""
        self.forward_kernel(mF, mRes, mPost, mComb, mOut).launch(
            grid=(mF.shape[0], 1, 1), block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def forward_kernel(self, mF: cute.Tensor, mRes: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor,
                       mOut: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        n = self.n
        post = [mPost[(t, q)] for q in range(n)]
        comb = [[mComb[(t, p, q)] for q in range(n)] for p in range(n)]
        frag = vec_frag(mOut.element_type)
        for it in cutlass.range(self.iters, unroll=COLUMN_UNROLL):
            chunk = it * THREADS + tidx
            if chunk < self.chunks:
                f = load_vec(mF[(t, None)], chunk, frag)
                res = [load_vec(mRes[(t, p, None)], chunk, frag) for p in range(n)]
                for q in cutlass.range_constexpr(n):
                    acc = f * post[q]
                    for p in cutlass.range_constexpr(n):
                        acc = acc + res[p] * comb[p][q]
                    store_vec(acc, mOut[(t, q, None)], chunk, frag)

    @cute.jit
    def backward(self, mG: cute.Tensor, mF: cute.Tensor, mRes: cute.Tensor, mPost: cute.Tensor,
                 mComb: cute.Tensor, mGradF: cute.Tensor, mGradRes: cute.Tensor, mGradPost: cute.Tensor,
                 mGradComb: cute.Tensor, stream):
        """g [T, n, C] -> grad_f [T, C], grad_res [T, n, C], grad_post [T, n], grad_comb [T, n, n]."""

        @cute.struct
        class SharedStorage:
            partials: cute.struct.MemRange[Float32, WARPS * self.num_sums]

        self.shared_storage = SharedStorage
        self.backward_kernel(mG, mF, mRes, mPost, mComb, mGradF, mGradRes, mGradPost, mGradComb).launch(
            grid=(mG.shape[0], 1, 1), block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def backward_kernel(self, mG: cute.Tensor, mF: cute.Tensor, mRes: cute.Tensor, mPost: cute.Tensor,
                        mComb: cute.Tensor, mGradF: cute.Tensor, mGradRes: cute.Tensor, mGradPost: cute.Tensor,
                        mGradComb: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        n = self.n
        storage = SmemAllocator().allocate(self.shared_storage)
        partials = storage.partials.get_tensor(cute.make_layout(WARPS * self.num_sums))
        post = [mPost[(t, q)] for q in range(n)]
        comb = [[mComb[(t, p, q)] for q in range(n)] for p in range(n)]
        sums = cute.make_rmem_tensor(cute.make_layout(self.num_sums), Float32)
        sums.fill(0.0)
        frag = vec_frag(mGradRes.element_type)
        for it in cutlass.range(self.iters, unroll=COLUMN_UNROLL):
            chunk = it * THREADS + tidx
            if chunk < self.chunks:
                f = load_vec(mF[(t, None)], chunk, frag)
                res = [load_vec(mRes[(t, p, None)], chunk, frag) for p in range(n)]
                g = [load_vec(mG[(t, q, None)], chunk, frag) for q in range(n)]
                grad_f = g[0] * post[0]
                for q in cutlass.range_constexpr(1, n):
                    grad_f = grad_f + g[q] * post[q]
                store_vec(grad_f, mGradF[(t, None)], chunk, frag)
                for p in cutlass.range_constexpr(n):
                    grad_r = g[0] * comb[p][0]
                    for q in cutlass.range_constexpr(1, n):
                        grad_r = grad_r + g[q] * comb[p][q]
                    store_vec(grad_r, mGradRes[(t, p, None)], chunk, frag)
                for q in cutlass.range_constexpr(n):
                    sums[q] = sums[q] + (g[q] * f).reduce(cute.ReductionOp.ADD, 0.0, 0)
                for p in cutlass.range_constexpr(n):
                    for q in cutlass.range_constexpr(n):
                        sums[n + p * n + q] = sums[n + p * n + q] + (res[p] * g[q]).reduce(
                            cute.ReductionOp.ADD, 0.0, 0)
        total = block_sums(sums, self.num_sums, partials, tidx)
        if tidx < self.num_sums:
            if tidx < n:
                mGradPost[(t, tidx)] = total
            else:
                index = tidx - n
                mGradComb[(t, index // n, index % n)] = total
