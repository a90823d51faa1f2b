"""The MoE layer (cute_moe.moe, GEMM1 fused: gather + SwiGLU) on a Hopper GPU: the output and all four
gradients against an FP32 plain-torch reference; uneven routing with an expert of 0 tokens, dropped
slots (-1), top-k 1 / 4 / 8, token counts that are multiples of no tile, bf16 autocast; a CUDA-graph replay of
forward + backward with new tokens and new routing; torch.compile(fullgraph=True) of forward +
backward."""

import pytest
import torch

import cute_moe
from cute_moe.moe_layer import moe_reference
from cute_moe.testing import calc_diff

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
H, I, E = 264, 200, 10
# bf16 intermediates (h, SwiGLU output, y, dy) against an FP32 reference: calc_diff stays near 1e-5.
OUT_DIFF, GRAD_DIFF = 5e-4, 2e-3
NAMES = ("x", "topk_weights", "w13", "w2")


def routing(tokens: int, top_k: int):
    logits = torch.randn(tokens, E, device="cuda")
    logits[:, 2] = -1e9  # expert 2 receives no token
    weights, idx = torch.softmax(logits, -1).topk(top_k, dim=-1)
    idx[::5, 0] = -1  # dropped slots
    return idx, weights


def inputs(tokens: int, top_k: int):
    x = torch.randn(tokens, H, device="cuda").to(bf16)
    idx, weights = routing(tokens, top_k)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(bf16)
    w2 = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(bf16)
    return x, idx, weights, w13, w2


def check_against_reference(out, leaves, idx, grad):
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = moe_reference(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], ref_leaves[3])
    ref.backward(grad.float())
    assert not out.isnan().any()
    assert calc_diff(out.detach(), ref.detach()) < OUT_DIFF
    for name, leaf, ref_leaf in zip(NAMES, leaves, ref_leaves):
        assert not leaf.grad.isnan().any(), name
        assert calc_diff(leaf.grad, ref_leaf.grad) < GRAD_DIFF, name
    assert torch.equal(leaves[2].grad[2], torch.zeros_like(leaves[2].grad[2]))  # the expert without tokens
    assert torch.equal(leaves[3].grad[2], torch.zeros_like(leaves[3].grad[2]))


def layer(x, idx, weights, w13, w2):
    return cute_moe.moe(x, idx, weights, w13, w2)


@pytest.mark.parametrize("tokens,top_k", [(301, 1), (1000, 4), (77, 8)])
def test_moe_layer_forward_and_gradients(tokens, top_k):
    torch.manual_seed(tokens)
    x, idx, weights, w13, w2 = inputs(tokens, top_k)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    out = layer(leaves[0], idx, *leaves[1:])
    grad = torch.randn(tokens, H, device="cuda").to(bf16)
    out.backward(grad)
    check_against_reference(out, leaves, idx, grad)


def test_moe_layer_cuda_graph_replay_with_new_tokens_and_routing():
    torch.manual_seed(1)
    tokens, top_k = 500, 4
    x, idx, weights, w13, w2 = inputs(tokens, top_k)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    grad = torch.randn(tokens, H, device="cuda").to(bf16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles / loads the kernels outside the capture
        for _ in range(2):
            for leaf in leaves:
                leaf.grad = None
            layer(leaves[0], idx, *leaves[1:]).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(leaves[0], idx, *leaves[1:])
        out.backward(grad)
    new_idx, new_weights = routing(tokens, top_k)
    with torch.no_grad():
        leaves[0].copy_(torch.randn(tokens, H, device="cuda").to(bf16))
        leaves[1].copy_(new_weights)
    idx.copy_(new_idx)
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(out, leaves, idx, grad)


def test_moe_layer_torch_compile_fullgraph_forward_backward():
    torch.manual_seed(2)
    tokens, top_k = 333, 2
    x, idx, weights, w13, w2 = inputs(tokens, top_k)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    out = torch.compile(layer, fullgraph=True)(leaves[0], idx, *leaves[1:])
    grad = torch.randn(tokens, H, device="cuda").to(bf16)
    out.backward(grad)
    check_against_reference(out, leaves, idx, grad)


def test_moe_layer_under_bf16_autocast():
    torch.manual_seed(3)
    tokens, top_k = 130, 3
    x, idx, weights, w13, w2 = inputs(tokens, top_k)
    fp32_leaves = [t.float().requires_grad_(True) for t in (x, w13, w2)]
    with torch.autocast("cuda", dtype=bf16):
        out = layer(fp32_leaves[0], idx, weights, fp32_leaves[1], fp32_leaves[2])
    assert out.dtype == bf16
    assert calc_diff(out.detach(), moe_reference(x, idx, weights, w13, w2).detach()) < OUT_DIFF
    out.float().sum().backward()
    assert all(leaf.grad.dtype == torch.float32 and not leaf.grad.isnan().any() for leaf in fp32_leaves)
