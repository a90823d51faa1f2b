"""Backward of hc_pre's small per-token part, written out in torch ops (no autograd inside, so
AOTAutograd traces it like any formula): the gates and the Sinkhorn iterations are recomputed
(unrolled, the same steps as ``hc_reference.split_sinkhorn``) and run backwards.

For a normalization ``Y = X / (sum_axis X + eps)``: ``dX = (dY - sum_axis(dY * Y)) / (sum_axis X + eps)``.
For the row softmax ``P = softmax(L)``: ``dL = P * (dP - sum_row(dP * P))``.
"""

import torch

from .hc_reference import POST_MULT


def split_sinkhorn_backward(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
                            eps: float, grad_pre: torch.Tensor, grad_post: torch.Tensor, grad_comb: torch.Tensor):
    """Gradients (mixes [T, W], scale [3], base [W]) of ``split_sinkhorn`` given those of its outputs."""
    z_pre = mixes[:, :n] * scale[0] + base[:n]
    z_post = mixes[:, n:2 * n] * scale[1] + base[n:2 * n]
    logits = (mixes[:, 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    probs = torch.softmax(logits, dim=-1)
    # Forward, keeping each normalization's output and denominator: (Y, denominator, axis).
    steps = []
    comb = probs + eps

    def normalize(x: torch.Tensor, axis: int) -> torch.Tensor:
        denominator = x.sum(dim=axis, keepdim=True) + eps
        y = x / denominator
        steps.append((y, denominator, axis))
        return y

    comb = normalize(comb, -2)
    for _ in range(iters - 1):
        comb = normalize(comb, -1)
        comb = normalize(comb, -2)
    grad = grad_comb
    for y, denominator, axis in reversed(steps):
        grad = (grad - (grad * y).sum(dim=axis, keepdim=True)) / denominator
    grad_logits = probs * (grad - (grad * probs).sum(dim=-1, keepdim=True))
    sig_pre, sig_post = torch.sigmoid(z_pre), torch.sigmoid(z_post)
    grad_z_pre = grad_pre * sig_pre * (1 - sig_pre)
    grad_z_post = grad_post * POST_MULT * sig_post * (1 - sig_post)
    grad_z_comb = grad_logits.flatten(-2)
    grad_z = torch.cat([grad_z_pre, grad_z_post, grad_z_comb], dim=-1)
    grad_mixes = torch.cat([grad_z_pre * scale[0], grad_z_post * scale[1], grad_z_comb * scale[2]], dim=-1)
    grad_scale = torch.stack([(grad_z_pre * mixes[:, :n]).sum(), (grad_z_post * mixes[:, n:2 * n]).sum(),
                              (grad_z_comb * mixes[:, 2 * n:]).sum()])
    return grad_mixes, grad_scale, grad_z.sum(0)
