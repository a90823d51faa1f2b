"""torch.nn modules built on cute-moe's ops."""

from typing import Optional

import torch
from torch import nn

from .hc import SUPPORTED_N_STREAMS, hc_post, hc_pre
from .hc_reference import HC_EPS, NORM_EPS, SINKHORN_ITERS, mix_width
from .moe_layer import moe

FN_INIT_STD = 0.01  # the model loads fn from its checkpoint; a fresh module starts near uniform mixing


class HyperConnection(nn.Module):
    """A sub-layer wrapped in DeepSeek-V4's manifold-constrained hyper-connection (mHC).

    ``forward(x)`` with streams ``x [..., n, hidden]`` (bf16) returns the next streams, as the model's
    block does around attention and around the MoE::

        y, post, comb = hc_pre(x, fn, scale, base)       # [..., hidden]
        x_next = hc_post(layer(y), x, post, comb)         # [..., n, hidden]

    ``layer`` maps ``[T, hidden]`` to ``[T, hidden]`` (bf16); a norm before it belongs to ``layer``.
    Parameters (fp32, the checkpoint's names): ``fn [(2+n)n, n*hidden]``, ``base [(2+n)n]``, ``scale [3]``.
    """

    def __init__(self, n: int, hidden: int, layer: Optional[nn.Module] = None, norm_eps: float = NORM_EPS,
                 sinkhorn_iters: int = SINKHORN_ITERS, hc_eps: float = HC_EPS):
        super().__init__()
        if n not in SUPPORTED_N_STREAMS:
            raise ValueError(f"n: expected one of {SUPPORTED_N_STREAMS}, got {n}")
        if hidden <= 0 or (n * hidden) % 64 != 0:
            raise ValueError(f"hidden: expected n * hidden a positive multiple of 64, got hidden={hidden}")
        self.n, self.hidden = n, hidden
        self.layer = layer if layer is not None else nn.Identity()
        self.norm_eps, self.sinkhorn_iters, self.hc_eps = norm_eps, sinkhorn_iters, hc_eps
        self.fn = nn.Parameter(torch.randn(mix_width(n), n * hidden) * FN_INIT_STD)
        self.base = nn.Parameter(torch.zeros(mix_width(n)))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or tuple(x.shape[-2:]) != (self.n, self.hidden):
            raise ValueError(f"x: expected shape [..., {self.n}, {self.hidden}], got {tuple(x.shape)}")
        lead = x.shape[:-2]
        streams = x.reshape(-1, self.n, self.hidden)
        y, post, comb = hc_pre(streams, self.fn, self.scale, self.base, self.norm_eps, self.sinkhorn_iters,
                               self.hc_eps)
        out = hc_post(self.layer(y), streams, post, comb)
        return out.reshape(*lead, self.n, self.hidden)


class MoE(nn.Module):
    """A mixture-of-experts FFN: ``forward(x, topk_idx=None, topk_weights=None)`` -> ``cute_moe.moe``.

    Parameters: ``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]``, bf16. The router is
    optional: with ``router=True`` the module holds ``router [E, H]`` (fp32) and, when no routing is
    passed, picks each token's ``top_k`` experts by softmax(x . routerᵀ) (weights not renormalized);
    otherwise the caller passes ``topk_idx [T, k]`` and ``topk_weights [T, k]`` (e.g. from its own
    router, whose gradient flows through ``topk_weights``). x [..., H] bf16 is flattened to tokens.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, top_k: int = 0, router: bool = False,
                 init_std: float = 0.02):
        super().__init__()
        if router and top_k < 1:
            raise ValueError(f"top_k: a module with a router needs top_k >= 1, got {top_k}")
        self.num_experts, self.hidden, self.intermediate, self.top_k = num_experts, hidden, intermediate, top_k
        self.w13 = nn.Parameter((torch.randn(num_experts, 2 * intermediate, hidden) * init_std).to(torch.bfloat16))
        self.w2 = nn.Parameter((torch.randn(num_experts, hidden, intermediate) * init_std).to(torch.bfloat16))
        self.router = nn.Parameter(torch.randn(num_experts, hidden) * init_std) if router else None

    def forward(self, x: torch.Tensor, topk_idx: Optional[torch.Tensor] = None,
                topk_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x: expected shape [..., {self.hidden}], got {tuple(x.shape)}")
        tokens = x.reshape(-1, self.hidden)
        if topk_idx is None:
            if self.router is None:
                raise ValueError("topk_idx: required (this MoE module has no router)")
            probs = torch.softmax(tokens.float() @ self.router.T, dim=-1)
            topk_weights, topk_idx = probs.topk(self.top_k, dim=-1)
        elif topk_weights is None:
            raise ValueError("topk_weights: required with topk_idx")
        out = moe(tokens, topk_idx, topk_weights, self.w13, self.w2)
        return out.reshape(x.shape)
