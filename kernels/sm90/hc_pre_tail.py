"""Fused tail of hc_pre (SIMT, one CTA of 256 threads per token, FP32 math).

From the prenorm GEMM's per-split partials ``D [S, T, (2+n)n]`` and ``sqr_sum [S, T]`` of token t:
sum the splits, ``rsqrt = 1/sqrt(sqr_sum / (n*C) + norm_eps)``, ``mixes = D * rsqrt``, the gates
``pre = sigmoid(mixes[:n] * scale[0] + base[:n]) + eps`` and ``post = 2 sigmoid(...)``, and the n x n
mixing matrix: row softmax + eps, one column normalization, then ``iters - 1`` (row, column) pairs,
every denominator ``sum + eps`` -- all in registers (every thread computes the same 16 values, so no
shared memory or barrier is needed). Thread 0 writes pre, post, comb and rsqrt; then the CTA streams
the token's n rows of x once: ``y[c] = sum_p pre[p] * x[p, c]`` (thread i: the 8-column chunks i,
i + 256, ..., 16-byte loads and stores; C a multiple of 8, rows 16-byte aligned).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from cute_moe.hc_reference import POST_MULT

from .hc_simt import COLUMN_UNROLL, THREADS, VEC, load_vec, store_vec, vec_frag, vector_steps


class HcPreTail:
    """Compile-time n (streams), C (hidden), Sinkhorn iterations and epsilons."""

    def __init__(self, n: int, c: int, iters: int, norm_eps: float, hc_eps: float):
        if n <= 0 or c <= 0 or iters < 1 or c % VEC != 0:
            raise ValueError(f"n, c, iters: expected positive values, c a multiple of {VEC}, got n={n}, c={c}, "
                             f"iters={iters}")
        self.n, self.c, self.iters = n, c, iters
        self.norm_eps, self.hc_eps = norm_eps, hc_eps
        self.width = (2 + n) * n
        self.chunks = c // VEC
        self.col_steps = vector_steps(c)

    @cute.jit
    def __call__(self, mX: cute.Tensor, mD: cute.Tensor, mS: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                 mY: cute.Tensor, mPre: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, mRsqrt: cute.Tensor,
                 stream):
        """x [T, n, C] bf16, D [S, T, W] and sqr_sum [S, T] fp32, scale [3], base [W] -> y [T, C] bf16,
        pre / post [T, n], comb [T, n, n], rsqrt [T] (fp32)."""
        self.kernel(mX, mD, mS, mScale, mBase, mY, mPre, mPost, mComb, mRsqrt).launch(
            grid=(mX.shape[0], 1, 1), block=[THREADS, 1, 1], stream=stream)

    @staticmethod
    def _sigmoid(z):
        return 1.0 / (1.0 + cute.math.exp(-z))

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mD: cute.Tensor, mS: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
               mY: cute.Tensor, mPre: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, mRsqrt: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        n, eps = self.n, self.hc_eps
        # Sum the splits: entries 0..W-1 of D, then the square-sum.
        totals = cute.make_rmem_tensor(cute.make_layout(self.width + 1), Float32)
        totals.fill(0.0)
        for s in cutlass.range(mD.shape[0], unroll=1):
            for j in cutlass.range_constexpr(self.width):
                totals[j] = totals[j] + mD[(s, t, j)]
            totals[self.width] = totals[self.width] + mS[(s, t)]
        rsqrt = cute.math.rsqrt(totals[self.width] / (n * self.c) + self.norm_eps)
        mixes = [totals[j] * rsqrt for j in range(self.width)]
        pre = [self._sigmoid(mixes[p] * mScale[0] + mBase[p]) + eps for p in range(n)]
        post = [POST_MULT * self._sigmoid(mixes[n + q] * mScale[1] + mBase[n + q]) for q in range(n)]
        logits = [[mixes[2 * n + p * n + q] * mScale[2] + mBase[2 * n + p * n + q] for q in range(n)]
                  for p in range(n)]
        comb = []
        for p in cutlass.range_constexpr(n):
            row_max = logits[p][0]
            for q in cutlass.range_constexpr(1, n):
                row_max = cute.math.max(row_max, logits[p][q])
            exps = [cute.math.exp(logits[p][q] - row_max) for q in range(n)]
            total = exps[0]
            for q in cutlass.range_constexpr(1, n):
                total = total + exps[q]
            comb.append([exps[q] / total + eps for q in range(n)])
        comb = self._normalize_columns(comb)
        for _ in cutlass.range_constexpr(self.iters - 1):
            comb = self._normalize_rows(comb)
            comb = self._normalize_columns(comb)
        if tidx == 0:
            mRsqrt[t] = rsqrt
            for p in cutlass.range_constexpr(n):
                mPre[(t, p)] = pre[p]
                mPost[(t, p)] = post[p]
                for q in cutlass.range_constexpr(n):
                    mComb[(t, p, q)] = comb[p][q]
        frag = vec_frag(mY.element_type)
        for step in cutlass.range(self.col_steps, unroll=COLUMN_UNROLL):
            chunk = step * THREADS + tidx
            if chunk < self.chunks:
                acc = load_vec(mX[(t, 0, None)], chunk, frag) * pre[0]
                for p in cutlass.range_constexpr(1, n):
                    acc = acc + load_vec(mX[(t, p, None)], chunk, frag) * pre[p]
                store_vec(acc, mY[(t, None)], chunk, frag)

    def _normalize_rows(self, comb: list) -> list:
        out = []
        for row in comb:
            total = row[0]
            for v in row[1:]:
                total = total + v
            denominator = total + self.hc_eps
            out.append([v / denominator for v in row])
        return out

    def _normalize_columns(self, comb: list) -> list:
        n = self.n
        denominators = []
        for q in range(n):
            total = comb[0][q]
            for p in range(1, n):
                total = total + comb[p][q]
            denominators.append(total + self.hc_eps)
        return [[comb[p][q] / denominators[q] for q in range(n)] for p in range(n)]
