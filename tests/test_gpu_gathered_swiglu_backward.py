"""The MoE layer's fused backward dact GEMM (gathered_swiglu_backward_mm) on a Hopper GPU, against an
FP32 reference of its formulas on the same bf16 inputs (gather dO's rows, GEMM with each expert's w2,
the SwiGLU backward and the routing-weight gradient in torch): uneven experts including empty ones,
slot counts that are multiples of no tile, rows past the last end (dh NaN-poisoned and left so,
d_weight 0), I = 2880 (a partial last N tile), H = 264 (a partial K tile), H = 7168, forced tiles and
clusters, out-of-range row indices (clamped, no fault), zero weights, bitwise determinism, and a
CUDA-graph replay with new row indices, ends, h and weights.

Thresholds (calc_diff against FP32 of the same bf16 inputs): dh < 1e-5 (one bf16 rounding of an FP32
value: ~1e-6 expected), d_weight < 1e-6 (FP32 throughout)."""

import pytest
import torch

from cute_moe.kernels.sm90.config import Sm90Config
from cute_moe.moe_backward_gemms import GATHERED_SWIGLU_BACKWARD, gathered_swiglu_backward_mm
from cute_moe.testing import calc_diff

from gathered_support import (FORCED_CONFIGS, config_id, gathered_products, rows_over_four_decades, run_forced_config,
                              sorted_routing, swiglu_backward)

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
DH_DIFF, D_WEIGHT_DIFF = 1e-5, 1e-6


def make_inputs(tokens: int, experts: int, inter: int, hidden: int, top_k: int, dropped: int = 0):
    """dO with row magnitudes over four decades, w2, h (gate values on both sides of the sigmoid),
    routing weights (some 0), and a sorted routing: row_index (token of each slot) and uneven ends
    (experts 1 and experts-1 empty) ``dropped`` slots short of S."""
    grad_out = rows_over_four_decades(tokens, hidden)
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / hidden ** 0.5).to(bf16)
    slots = tokens * top_k
    h = torch.cat([torch.randn(slots, inter, device="cuda") * 3, torch.randn(slots, inter, device="cuda")], 1).to(bf16)
    weight = torch.rand(slots, device="cuda")
    weight[::13] = 0.0
    row_index, ends = sorted_routing(tokens, experts, slots, dropped)
    return grad_out, row_index, w2, ends, h, weight


def reference(grad_out, row_index, w2, ends, h, weight):
    """(dh, d_weight) in FP32 for the routed slots [0, ends[-1]) (row indices clamped as the kernel does)."""
    return swiglu_backward(gathered_products(grad_out, row_index, ends, w2), h, weight)


def check(dh, d_weight, inputs):
    routed = int(inputs[3][-1])
    dh_ref, d_weight_ref = reference(*inputs)
    assert torch.isfinite(dh[:routed]).all()
    assert calc_diff(dh[:routed], dh_ref) < DH_DIFF
    assert calc_diff(d_weight[:routed], d_weight_ref) < D_WEIGHT_DIFF
    assert (d_weight[routed:] == 0).all()
    zero_weight = inputs[5][:routed] == 0
    assert (dh[:routed][zero_weight] == 0).all()


def run_poisoned(inputs):
    """The op with dh NaN-poisoned: every routed row must be written, the rows past the last end not."""
    grad_out, row_index, w2 = inputs[:3]
    dh = torch.full((row_index.shape[0], 2 * w2.shape[2]), float("nan"), device="cuda", dtype=bf16)
    dh_returned, d_weight = GATHERED_SWIGLU_BACKWARD(*inputs, dh_out=dh)
    torch.cuda.synchronize()
    assert dh_returned is dh and d_weight.shape == (row_index.shape[0],) and d_weight.dtype == torch.float32
    assert torch.isnan(dh[int(inputs[3][-1]):]).all()
    check(dh, d_weight, inputs)
    return dh, d_weight


@pytest.mark.parametrize("tokens,experts,inter,hidden,top_k,dropped", [
    (301, 8, 768, 2048, 4, 37),     # Qwen3-like I, S = 1204 (no tile multiple), rows past the last end
    (150, 6, 2880, 2880, 4, 0),     # gpt-oss-like: 2880 = 11.25 x 256 columns (partial last N tile)
    (77, 5, 200, 264, 3, 11),       # H = 264: partial K tile; I = 200 < one N tile
    (1000, 16, 1024, 2048, 8, 5),   # OLMoE-like I, many tiles per expert (M-clusters)
    (90, 4, 256, 7168, 8, 3),       # DeepSeek-like H
])
def test_matches_reference(tokens, experts, inter, hidden, top_k, dropped):
    torch.manual_seed(tokens)
    run_poisoned(make_inputs(tokens, experts, inter, hidden, top_k, dropped))


def test_public_function_and_determinism():
    torch.manual_seed(1)
    inputs = make_inputs(200, 8, 768, 2048, 4, 0)
    dh, d_weight = gathered_swiglu_backward_mm(*inputs)
    torch.cuda.synchronize()
    check(dh, d_weight, inputs)
    dh2, d_weight2 = gathered_swiglu_backward_mm(*inputs)
    assert torch.equal(dh, dh2) and torch.equal(d_weight, d_weight2)  # no atomics: bitwise identical


@pytest.mark.parametrize("config", [*FORCED_CONFIGS, Sm90Config(tile_m=128, tile_n=128, cluster_m=2)], ids=config_id)
def test_forced_configs(config):
    run_forced_config(config, make_inputs, run_poisoned)


def test_out_of_range_row_indices_are_clamped():
    torch.manual_seed(3)
    inputs = make_inputs(120, 4, 256, 512, 2, 0)
    row_index = inputs[1]
    row_index[::7] = -5
    row_index[3::11] = inputs[0].shape[0] + 1000
    run_poisoned(inputs)


def test_cuda_graph_replay_with_new_routing():
    torch.manual_seed(4)
    inputs = make_inputs(333, 8, 768, 1024, 4, 21)
    gathered_swiglu_backward_mm(*inputs)  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dh, d_weight = gathered_swiglu_backward_mm(*inputs)
    fresh = make_inputs(333, 8, 768, 1024, 4, 50)
    for old, new in zip(inputs, fresh):
        old.copy_(new)
    dh.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(dh, d_weight, inputs)
