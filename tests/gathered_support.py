"""Test support shared by the gathered GEMMs' tests (GEMM1 and its backward dact GEMM), CPU and GPU:
routed inputs, FP32 references of the gathered per-expert products, the kernels' accumulator
coordinates traced on the CPU, config ids and the forced-config runs."""

from typing import Callable

import torch
import torch.nn.functional as F

from cute_moe.dispatch import force_config
from cute_moe.kernels.sm90.config import Sm90Config

bf16 = torch.bfloat16


def rows_over_four_decades(tokens: int, hidden: int) -> torch.Tensor:
    """bf16 [tokens, hidden] on the GPU, each row scaled by 10^u, u uniform in [-2, 2]."""
    scale = 10.0 ** torch.empty(tokens, 1, device="cuda").uniform_(-2, 2)
    return (torch.randn(tokens, hidden, device="cuda") * scale).to(bf16)


def sorted_routing(tokens: int, experts: int, slots: int, dropped: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_index, ends) on the GPU: the token of each of ``slots`` sorted slots, and uneven cumulative
    expert ends (experts 1 and experts-1 empty) ``dropped`` slots short of ``slots``."""
    probs = torch.rand(experts, device="cuda") ** 2
    probs[1] = probs[-1] = 0.0
    counts = torch.distributions.Multinomial(slots - dropped, probs=probs / probs.sum()).sample().to(torch.int32)
    ends = counts.cumsum(0, dtype=torch.int32)
    row_index = torch.randint(0, tokens, (slots,), device="cuda", dtype=torch.int32)
    return row_index, ends


def gathered_products(source: torch.Tensor, row_index: torch.Tensor, ends: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """FP32 [ends[-1], N]: row r of expert e's segment is source[row_index[r]] . weights[e] (weights
    [E, K, N]); row indices clamped into the source as the kernels do."""
    rows = row_index.long().clamp(0, source.shape[0] - 1)
    out = torch.empty(int(ends[-1]), weights.shape[2], device=source.device)
    start = 0
    for e, end in enumerate(ends.tolist()):
        out[start:end] = source[rows[start:end]].float() @ weights[e].float()
        start = end
    return out


def swiglu_backward(a: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, d_weight) in FP32 of the backward dact GEMM's epilogue from its products ``a`` [R, I], h's
    first R rows [R, 2I] (gate half first) and the routing weights' first R."""
    rows = a.shape[0]
    gate, up = h[:rows].float().chunk(2, dim=1)
    dact = a * weight[:rows, None]
    dh = torch.cat([torch.ops.aten.silu_backward(dact * up, gate), dact * F.silu(gate)], dim=1)
    return dh, (a * F.silu(gate) * up).sum(1)


def cpu_backward(grad_out, row_index, w2, ends, h, weight):
    """CPU stand-in of the backward dact kernel (same formulas in FP32; rows past the last end: dh 0,
    d_weight 0)."""
    dh = torch.zeros(row_index.shape[0], h.shape[1], dtype=bf16)
    d_weight = torch.zeros(row_index.shape[0])
    routed_dh, routed_d_weight = swiglu_backward(gathered_products(grad_out, row_index, ends, w2), h, weight)
    dh[:routed_dh.shape[0]] = routed_dh.to(bf16)
    d_weight[:routed_d_weight.shape[0]] = routed_d_weight
    return dh, d_weight


def accumulator_coords(kernel, tile_m: int, tile_n: int) -> dict[int, list[tuple[int, int]]]:
    """(row, column) of every accumulator value of every consumer thread of ``kernel``'s tiled MMA on
    a tile_m x tile_n tile, traced on the CPU (compiled for sm_90a)."""
    import cutlass
    import cutlass.cute as cute

    coords = {}

    @cute.jit
    def trace():
        kernel._setup(cutlass.BFloat16)
        identity = cute.make_identity_tensor((tile_m, tile_n))
        parts = [kernel.tiled_mma.get_slice(t).partition_C(identity) for t in range(kernel.num_consumer_threads)]
        coords.update({t: [c[v] for v in range(cute.size(c))] for t, c in enumerate(parts)})

    cute.compile(trace, options="--gpu-arch sm_90a")
    return coords


def config_id(config) -> str:
    """Test id of a forced config: tile, cluster_m and stages."""
    return f"{config.tile_m}x{config.tile_n}c{config.cluster_m}s{config.stages}"


# Tiles, clusters and a 2-stage ring that both gathered GEMMs' GPU tests force (each adds one of its own).
FORCED_CONFIGS = (
    Sm90Config(tile_m=128, tile_n=256, cluster_m=2),
    Sm90Config(tile_m=64, tile_n=128),
    Sm90Config(tile_m=64, tile_n=256, cluster_m=2, stages=2),
)


def run_forced_config(config: Sm90Config, make_inputs: Callable[..., tuple], run: Callable[[tuple], None]) -> None:
    """``run(inputs)`` with ``config`` forced, on fresh seeded inputs of the forced-config shape: 257
    tokens, 7 experts, I = 2880, H = 1024, top-2, 13 dropped slots."""
    torch.manual_seed(2)
    inputs = make_inputs(257, 7, 2880, 1024, 2, 13)
    with force_config(config):
        run(inputs)
