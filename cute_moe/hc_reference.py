"""Reference math of DeepSeek-V4's manifold-constrained hyper-connections (mHC), in plain torch.

Written from DeepSeek-V4's inference model code (``Block.hc_pre`` / ``Block.hc_post`` of model.py and
``hc_split_sinkhorn`` of kernel.py; see docs/hc.md for what was matched). Every function computes in
the dtype of its inputs promoted to at least float32, so the tests run it in float64 as the oracle and
the fused ops reuse the gate/Sinkhorn part (differentiable, unrolled) in float32.

Layouts: streams ``x [T, n, C]``; projection ``fn [(2 + n) * n, n * C]`` whose output columns are
``[pre (n) | post (n) | comb (n * n, row-major p, q)]``; ``scale [3]`` (pre, post, comb);
``base [(2 + n) * n]``.
"""

import torch

NORM_EPS = 1e-6  # RMS epsilon of the projection's prenorm (the model's norm_eps)
HC_EPS = 1e-6  # hc_eps: added to pre, to the softmax and to every Sinkhorn denominator
SINKHORN_ITERS = 20  # hc_sinkhorn_iters: the softmax + 1 column step, then 19 (row, column) pairs
POST_MULT = 2.0  # post = 2 * sigmoid(...)


def mix_width(n: int) -> int:
    """Columns of the projection: n pre + n post + n*n comb."""
    return (2 + n) * n


def split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                   iters: int = SINKHORN_ITERS, eps: float = HC_EPS):
    """mixes ``[T, (2+n)n]`` -> pre ``[T, n]``, post ``[T, n]``, comb ``[T, n, n]`` (doubly stochastic).

    comb starts as a row softmax (+eps), gets one column normalization, then ``iters - 1`` pairs of
    (row, column) normalizations, each denominator ``sum + eps``; the last step is a column step."""
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = POST_MULT * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre_reference(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                     norm_eps: float = NORM_EPS, iters: int = SINKHORN_ITERS, eps: float = HC_EPS,
                     dtype: torch.dtype = torch.float32):
    """(layer input ``[T, C]``, post ``[T, n]``, comb ``[T, n, n]``) computed in ``dtype``.

    mixes = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps); layer input = sum_p pre[p] * x[p]."""
    t, n, c = x.shape
    xf = x.to(dtype)
    flat = xf.reshape(t, n * c)
    rsqrt = torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + norm_eps)
    mixes = (flat @ fn.to(dtype).T) * rsqrt
    pre, post, comb = split_sinkhorn(mixes, scale.to(dtype), base.to(dtype), n, iters, eps)
    y = (pre.unsqueeze(-1) * xf).sum(dim=1)
    return y, post, comb


def hc_post_reference(f_out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Next streams ``[T, n, C]``: ``out[q] = post[q] * f_out + sum_p comb[p, q] * residual[p]``
    (comb is applied transposed, as the model's ``sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), 2)``)."""
    f, r = f_out.to(dtype), residual.to(dtype)
    mixed = torch.einsum("tpq,tpc->tqc", comb.to(dtype), r)
    return post.to(dtype).unsqueeze(-1) * f.unsqueeze(1) + mixed
