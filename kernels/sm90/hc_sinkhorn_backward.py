"""Backward of hc_pre's per-token gates and Sinkhorn projection (SIMT, one thread per token, FP32).

Per token t, from the projection ``d [T, W]`` (W = (2+n)n), ``rsqrt [T]``, ``scale [3]``, ``base [W]``
and the output gradients ``grad_pre [T, n]``, ``grad_post [T, n]``, ``grad_comb [T, n, n]``: recompute
``mixes = d * rsqrt``, the gates and the forward Sinkhorn (row softmax + eps, one column step, then
``iters - 1`` (row, column) pairs, keeping every step's output and denominators), run it backwards
(``dX = (dY - sum_axis(dY * Y)) / denominator``, then the softmax rule ``dL = P (dP - sum_row(dP P))``)
and write

- ``grad_z [T, W]``: the gradient of the pre-activation ``z = mixes * scale + base`` (its sum over T is
  grad base),
- ``scale_terms [T, 3]``: ``sum_j grad_z[j] * mixes[j]`` over the pre / post / comb columns (summed
  over T: grad scale),
- ``grad_d [T, W] = grad_z * scale * rsqrt`` and ``grad_sqr [T] = sum_j grad_mixes[j] d[j] * (-rsqrt^3 /
  (2 n C))`` (what the grad-x kernel needs).

The same steps as ``cute_moe.hc_backward.split_sinkhorn_backward`` (the CPU path and the tests'
reference), fully unrolled at compile time; the 39 steps' 16 values per token live in registers
(or local memory where the compiler spills them).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from cute_moe.hc_reference import POST_MULT

THREADS = 128  # tokens per CTA (one thread each)
SCALE_GROUPS = 3  # pre, post, comb


class HcSinkhornBackward:
    """Compile-time n (streams), C (hidden), Sinkhorn iterations and hc epsilon."""

    def __init__(self, n: int, c: int, iters: int, hc_eps: float):
        if n <= 0 or c <= 0 or iters < 1:
            raise ValueError(f"n, c, iters: expected positive values, got n={n}, c={c}, iters={iters}")
        self.n, self.c, self.iters, self.hc_eps = n, c, iters, hc_eps
        self.width = (2 + n) * n

    @cute.jit
    def __call__(self, mD: cute.Tensor, mRsqrt: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                 mGradPre: cute.Tensor, mGradPost: cute.Tensor, mGradComb: cute.Tensor, mGradD: cute.Tensor,
                 mGradSqr: cute.Tensor, mGradZ: cute.Tensor, mScaleTerms: cute.Tensor, stream):
        """d [T, W], rsqrt [T], scale [3], base [W], grad_pre / grad_post [T, n], grad_comb [T, n, n]
        -> grad_d [T, W], grad_sqr [T], grad_z [T, W], scale_terms [T, 3] (all fp32)."""
        blocks = (mD.shape[0] + (THREADS - 1)) // THREADS
        self.kernel(mD, mRsqrt, mScale, mBase, mGradPre, mGradPost, mGradComb, mGradD, mGradSqr, mGradZ,
                    mScaleTerms).launch(grid=(blocks, 1, 1), block=[THREADS, 1, 1], stream=stream)

    @staticmethod
    def _sigmoid(z):
        return 1.0 / (1.0 + cute.math.exp(-z))

    def _group(self, j: int) -> int:
        """Scale group of projection column j: 0 pre, 1 post, 2 comb."""
        return 0 if j < self.n else (1 if j < 2 * self.n else 2)

    @cute.kernel
    def kernel(self, mD: cute.Tensor, mRsqrt: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
               mGradPre: cute.Tensor, mGradPost: cute.Tensor, mGradComb: cute.Tensor, mGradD: cute.Tensor,
               mGradSqr: cute.Tensor, mGradZ: cute.Tensor, mScaleTerms: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        t = bidx * THREADS + tidx
        if t < mD.shape[0]:
            n, width = self.n, self.width
            rsqrt = mRsqrt[t]
            scale = [mScale[g] for g in range(SCALE_GROUPS)]
            d = [mD[(t, j)] for j in range(width)]
            mixes = [d[j] * rsqrt for j in range(width)]
            z = [mixes[j] * scale[self._group(j)] + mBase[j] for j in range(width)]
            grad_comb = [[mGradComb[(t, p, q)] for q in range(n)] for p in range(n)]
            grad_z = self._gates_backward(z, [mGradPre[(t, p)] for p in range(n)],
                                          [mGradPost[(t, q)] for q in range(n)])
            grad_z = grad_z + self._sinkhorn_backward(z, grad_comb)
            # Outputs.
            sqr_dot = Float32(0.0)
            terms = [Float32(0.0) for _ in range(SCALE_GROUPS)]
            for j in cutlass.range_constexpr(width):
                g = self._group(j)
                grad_mix = grad_z[j] * scale[g]
                mGradZ[(t, j)] = grad_z[j]
                mGradD[(t, j)] = grad_mix * rsqrt
                sqr_dot = sqr_dot + grad_mix * d[j]
                terms[g] = terms[g] + grad_z[j] * mixes[j]
            mGradSqr[t] = sqr_dot * (-0.5 / (n * self.c)) * rsqrt * rsqrt * rsqrt
            for g in cutlass.range_constexpr(SCALE_GROUPS):
                mScaleTerms[(t, g)] = terms[g]

    def _gates_backward(self, z: list, grad_pre: list, grad_post: list) -> list:
        """grad of z[0:2n] through ``pre = sigmoid(z) + eps`` and ``post = POST_MULT * sigmoid(z)``."""
        n = self.n
        out = []
        for p in range(n):
            sig = self._sigmoid(z[p])
            out.append(grad_pre[p] * sig * (1.0 - sig))
        for q in range(n):
            sig = self._sigmoid(z[n + q])
            out.append(grad_post[q] * POST_MULT * sig * (1.0 - sig))
        return out

    def _sinkhorn_backward(self, z: list, grad: list) -> list:
        """grad of z[2n:] (row-major p, q) given ``grad`` [n][n] of the final comb: recompute the
        forward keeping every step, then reverse the steps and the row softmax."""
        n = self.n
        probs = []
        for p in range(n):
            logits = [z[2 * n + p * n + q] for q in range(n)]
            row_max = logits[0]
            for q in range(1, n):
                row_max = cute.math.max(row_max, logits[q])
            exps = [cute.math.exp(logits[q] - row_max) for q in range(n)]
            total = exps[0]
            for q in range(1, n):
                total = total + exps[q]
            probs.append([exps[q] / total for q in range(n)])
        comb = [[probs[p][q] + self.hc_eps for q in range(n)] for p in range(n)]
        steps = []
        comb = self._normalize(comb, False, steps)
        for _ in range(self.iters - 1):
            comb = self._normalize(comb, True, steps)
            comb = self._normalize(comb, False, steps)
        grad = [list(row) for row in grad]
        for y, denominators, rows in reversed(steps):
            if rows:
                for p in range(n):
                    dot = grad[p][0] * y[p][0]
                    for q in range(1, n):
                        dot = dot + grad[p][q] * y[p][q]
                    grad[p] = [(grad[p][q] - dot) / denominators[p] for q in range(n)]
            else:
                for q in range(n):
                    dot = grad[0][q] * y[0][q]
                    for p in range(1, n):
                        dot = dot + grad[p][q] * y[p][q]
                    for p in range(n):
                        grad[p][q] = (grad[p][q] - dot) / denominators[q]
        out = []
        for p in range(n):
            dot = grad[p][0] * probs[p][0]
            for q in range(1, n):
                dot = dot + grad[p][q] * probs[p][q]
            out += [probs[p][q] * (grad[p][q] - dot) for q in range(n)]
        return out

    def _normalize(self, comb: list, rows: bool, steps: list) -> list:
        """One Sinkhorn step (rows: divide each row by its sum + eps; else each column), recorded in
        ``steps`` as (output, denominators, rows)."""
        n = self.n
        if rows:
            denominators = []
            for p in range(n):
                total = comb[p][0]
                for q in range(1, n):
                    total = total + comb[p][q]
                denominators.append(total + self.hc_eps)
            out = [[comb[p][q] / denominators[p] for q in range(n)] for p in range(n)]
        else:
            denominators = []
            for q in range(n):
                total = comb[0][q]
                for p in range(1, n):
                    total = total + comb[p][q]
                denominators.append(total + self.hc_eps)
            out = [[comb[p][q] / denominators[q] for q in range(n)] for p in range(n)]
        steps.append((out, denominators, rows))
        return out
