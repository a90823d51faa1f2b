"""The MoE layer (cute_moe.moe) on the CPU: argument validation, and its forward and all four
gradients against the plain-torch reference with the GEMM launches replaced by CPU math (the fused
GEMM1 and backward kernels too; the routing, gathers and combine are the layer's own code), eagerly
and under torch.compile(fullgraph=True). The mocked GEMMs leave the rows past the last group NaN, as
the kernels leave them unwritten."""

import pytest
import torch
import torch.nn.functional as F

import cute_moe
from cute_moe import moe_backward_gemms, moe_gemms, ops
from cute_moe.moe_layer import moe_reference
from cute_moe.nn import MoE
from cute_moe.testing import calc_diff

bf16 = torch.bfloat16
T, H, I, E, TOPK = 37, 32, 24, 5, 3


def _mock_grouped_gemms(monkeypatch):
    def ragged(a, b, offs, out_dtype=None):  # 2-D x 3-D grouped_mm, either major of b
        out = torch.full((a.shape[0], b.shape[2]), float("nan"), dtype=out_dtype or bf16)
        start = 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = (a[start:end].double() @ b[g].double()).to(out.dtype)
            start = end
        return out

    def k_grouped(a, b, d, ks, ks_tensor, c=None):
        start = 0
        for g, rows in enumerate(ks_tensor.tolist() if ks is None else ks):
            d[g] = a[start:start + rows].double().T @ b[start:start + rows].double()
            start += rows

    def gathered_swiglu(x, row_index, w13, ends, h_out=None):  # GEMM1: gather, GEMM, SwiGLU epilogue
        act = torch.full((row_index.shape[0], w13.shape[1] // 2), float("nan"), dtype=bf16)
        if h_out is not None:
            h_out.fill_(float("nan"))
        start = 0
        for g, end in enumerate(ends.tolist()):
            h = x[row_index[start:end].long()].double() @ w13[g].double().T
            gate, up = h.chunk(2, dim=1)
            act[start:end] = (F.silu(gate) * up).to(bf16)
            if h_out is not None:
                h_out[start:end] = h.to(bf16)
            start = end
        return act

    def gathered_swiglu_backward(grad_out, row_index, w2, ends, h, weight):  # dact GEMM + SwiGLU backward
        inter = w2.shape[2]
        dh = torch.full((row_index.shape[0], 2 * inter), float("nan"), dtype=bf16)
        d_weight = torch.zeros(row_index.shape[0])
        start = 0
        for g, end in enumerate(ends.tolist()):
            a = grad_out[row_index[start:end].long()].double() @ w2[g].double()
            gate, up = h[start:end].double().chunk(2, dim=1)
            dact = a * weight[start:end, None].double()
            dh[start:end] = torch.cat([torch.ops.aten.silu_backward(dact * up, gate), dact * F.silu(gate)], 1).to(bf16)
            d_weight[start:end] = (a * F.silu(gate) * up).sum(1).float()
            start = end
        return dh, d_weight

    for name in ("grouped_mm", "grouped_mm_n_major_b"):
        monkeypatch.setitem(ops.OPS, name, ragged)
    monkeypatch.setattr(moe_gemms, "GATHERED_SWIGLU", gathered_swiglu)
    monkeypatch.setattr(moe_backward_gemms, "GATHERED_SWIGLU_BACKWARD", gathered_swiglu_backward)
    monkeypatch.setitem(ops.OPS, "k_grouped_bf16_gemm_tn_contiguous", k_grouped)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(bf16)
    logits = torch.randn(T, E, generator=gen)
    logits[:, 3] = -1e9  # expert 3 receives no token
    weights, idx = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    idx[::4, 1] = -1  # dropped slots
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(bf16)
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(bf16)
    return x, idx.to(torch.int32), weights, w13, w2


def _layer(x, idx, weights, w13, w2):
    return cute_moe.moe(x, idx, weights, w13, w2)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-aot_eager"])
def test_forward_and_all_gradients_match_the_reference(monkeypatch, compiled):
    _mock_grouped_gemms(monkeypatch)
    x, idx, weights, w13, w2 = _inputs()
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    torch._dynamo.reset()
    layer = torch.compile(_layer, fullgraph=True, backend="aot_eager") if compiled else _layer
    out = layer(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    assert out.shape == (T, H) and out.dtype == bf16
    grad = torch.randn(T, H).to(bf16)
    out.backward(grad)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, weights, w13, w2)]
    ref = moe_reference(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], ref_leaves[3], torch.float64)
    ref.backward(grad.double())
    assert calc_diff(out.detach(), ref.detach()) < 1e-4
    for name, leaf, ref_leaf in zip(("x", "topk_weights", "w13", "w2"), leaves, ref_leaves):
        assert calc_diff(leaf.grad, ref_leaf.grad) < 1e-4, name
    assert torch.equal(leaves[2].grad[3], torch.zeros_like(leaves[2].grad[3]))  # the expert without tokens
    assert torch.equal(leaves[1].grad[::4, 1], torch.zeros(len(range(0, T, 4))))  # dropped slots


def test_bf16_autocast_casts_fp32_inputs_and_weights(monkeypatch):
    _mock_grouped_gemms(monkeypatch)
    x, idx, weights, w13, w2 = _inputs()
    leaves = [t.float().requires_grad_(True) for t in (x, w13, w2)]
    with torch.autocast("cpu", dtype=bf16):
        out = cute_moe.moe(leaves[0], idx, weights, leaves[1], leaves[2])
    assert out.dtype == bf16
    assert calc_diff(out.detach(), moe_reference(x, idx, weights, w13, w2, torch.float64)) < 1e-4
    out.float().sum().backward()
    assert all(leaf.grad is not None and leaf.grad.dtype == torch.float32 for leaf in leaves)
    with pytest.raises(TypeError, match=r"^x: expected dtype bfloat16"):
        cute_moe.moe(leaves[0], idx, weights, w13, w2)  # no autocast: fp32 x is refused


def test_module_with_router(monkeypatch):
    _mock_grouped_gemms(monkeypatch)
    layer = MoE(E, H, I, top_k=2, router=True)
    x = torch.randn(3, 7, H).to(bf16).requires_grad_(True)
    out = layer(x)
    assert out.shape == x.shape
    out.float().sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    assert layer.w13.grad.shape == layer.w13.shape


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.zeros(T, H)), TypeError, r"^x: expected dtype bfloat16"),
    (dict(topk_idx=torch.zeros(T, TOPK)), TypeError, r"^topk_idx: expected dtype int32 or int64"),
    (dict(topk_idx=torch.zeros(T + 1, TOPK, dtype=torch.int32)), ValueError, r"^topk_idx: expected 37 rows"),
    (dict(topk_weights=torch.zeros(T, TOPK + 1)), ValueError, r"^topk_weights: expected shape \(37, 3\)"),
    (dict(w13=torch.zeros(E, 2 * I, H + 8, dtype=bf16)), ValueError, r"^w13: expected \[E, 2I, 32\]"),
    (dict(w2=torch.zeros(E, I, H, dtype=bf16)), ValueError, r"^w2: expected shape \(5, 32, 24\)"),
    (dict(w13=torch.zeros(E, 20, H, dtype=bf16), w2=torch.zeros(E, H, 10, dtype=bf16)), ValueError,
     r"^w13: expected non-empty E, H and I with H and I multiples of 8"),
    (dict(activation="gelu"), ValueError, r"^activation: expected one of"),
])
def test_bad_arguments_are_refused_naming_them(change, error, match):
    x, idx, weights, w13, w2 = _inputs()
    args = dict(x=x, topk_idx=idx, topk_weights=weights, w13=w13, w2=w2, activation="swiglu")
    args.update(change)
    with pytest.raises(error, match=match):
        cute_moe.moe(**args)
