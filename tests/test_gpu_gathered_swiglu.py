"""The MoE layer's fused GEMM1 (gathered_swiglu_grouped_mm) on a Hopper GPU, against an FP32 reference
(gather x's rows, GEMM with each expert's w13, SwiGLU in torch): uneven experts including empty ones,
slot counts that are multiples of no tile, dropped slots past the last end (left unwritten: h_out is
NaN-poisoned and must stay so there), I = 2880 (not a multiple of 128 output columns per tile),
H = 264 (not a multiple of the 64-wide K tile), forced tiles and clusters, out-of-range row indices
(clamped, no fault), and a CUDA-graph replay with new row indices and new expert ends."""

import pytest
import torch
import torch.nn.functional as F

from cute_moe.kernels.sm90.config import Sm90Config
from cute_moe.moe_gemms import gathered_swiglu_grouped_mm
from cute_moe.testing import calc_diff

from gathered_support import (FORCED_CONFIGS, config_id, gathered_products, rows_over_four_decades, run_forced_config,
                              sorted_routing)

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
# bf16 outputs of FP32 accumulations against an FP32 reference.
ACT_DIFF, H_DIFF = 2e-4, 1e-4


def make_inputs(tokens: int, experts: int, inter: int, hidden: int, top_k: int, dropped: int = 0):
    """x with row magnitudes over four decades, w13, and a sorted routing: row_index (token of each
    slot), ends (uneven, experts 1 and experts-1 empty), ``dropped`` slots past the last end."""
    x = rows_over_four_decades(tokens, hidden)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden ** 0.5).to(bf16)
    row_index, ends = sorted_routing(tokens, experts, tokens * top_k, dropped)
    return x, w13, row_index, ends


def reference(x, w13, row_index, ends):
    """(act, h) in FP32 for the routed slots [0, ends[-1]) (row indices clamped as the kernel does)."""
    h = gathered_products(x, row_index, ends, w13.transpose(1, 2))
    gate, up = h.chunk(2, dim=1)
    return F.silu(gate) * up, h


def run_and_check(x, w13, row_index, ends, with_h: bool = True):
    h = torch.full((row_index.shape[0], w13.shape[1]), float("nan"), device="cuda", dtype=bf16) if with_h else None
    act = gathered_swiglu_grouped_mm(x, row_index, w13, ends, h)
    torch.cuda.synchronize()
    routed = int(ends[-1])
    act_ref, h_ref = reference(x, w13, row_index, ends)
    assert act.shape == (row_index.shape[0], w13.shape[1] // 2) and act.dtype == bf16
    assert torch.isfinite(act[:routed]).all()
    assert calc_diff(act[:routed], act_ref) < ACT_DIFF
    if with_h:
        assert torch.isfinite(h[:routed]).all()
        assert calc_diff(h[:routed], h_ref) < H_DIFF
        assert torch.isnan(h[routed:]).all()  # dropped slots: never written


@pytest.mark.parametrize("tokens,experts,inter,hidden,top_k,dropped", [
    (301, 8, 768, 2048, 4, 37),     # Qwen3-like I, S = 1204 (no tile multiple), dropped slots
    (150, 6, 2880, 2880, 4, 0),     # gpt-oss-like: 2880 = 22.5 x 128 output columns per 256-wide tile
    (77, 5, 200, 264, 3, 11),       # H = 264: the last K tile is partial (zero-filled)
    (1000, 16, 1024, 2048, 8, 5),   # OLMoE-like I, many tiles per expert (M-clusters)
])
def test_matches_reference(tokens, experts, inter, hidden, top_k, dropped):
    torch.manual_seed(tokens)
    run_and_check(*make_inputs(tokens, experts, inter, hidden, top_k, dropped))


def test_without_h():
    torch.manual_seed(1)
    run_and_check(*make_inputs(200, 8, 768, 2048, 4, 9), with_h=False)


@pytest.mark.parametrize("config", [*FORCED_CONFIGS, Sm90Config(tile_m=128, tile_n=64, cluster_m=2)], ids=config_id)
def test_forced_configs(config):
    run_forced_config(config, make_inputs, lambda inputs: run_and_check(*inputs))


def test_out_of_range_row_indices_are_clamped():
    torch.manual_seed(3)
    x, w13, row_index, ends = make_inputs(120, 4, 256, 512, 2, 0)
    row_index[::7] = -5
    row_index[3::11] = x.shape[0] + 1000
    run_and_check(x, w13, row_index, ends)


def test_cuda_graph_replay_with_new_routing():
    torch.manual_seed(4)
    x, w13, row_index, ends = make_inputs(333, 8, 768, 1024, 4, 21)
    h = torch.full((row_index.shape[0], w13.shape[1]), float("nan"), device="cuda", dtype=bf16)
    gathered_swiglu_grouped_mm(x, row_index, w13, ends, h)  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act = gathered_swiglu_grouped_mm(x, row_index, w13, ends, h)
    x2, _, row_index2, ends2 = make_inputs(333, 8, 768, 1024, 4, 50)
    x.copy_(x2)
    row_index.copy_(row_index2)
    ends.copy_(ends2)
    h.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    routed = int(ends[-1])
    act_ref, h_ref = reference(x, w13, row_index, ends)
    assert calc_diff(act[:routed], act_ref) < ACT_DIFF
    assert calc_diff(h[:routed], h_ref) < H_DIFF
    assert torch.isnan(h[routed:]).all()
