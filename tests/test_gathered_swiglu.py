"""The MoE layer's fused GEMM1 (gathered_swiglu_grouped_mm) on the CPU: its kernel compiles for sm_90a
at the configs the rules pick and at forced ones (I = 768 / 1024 / 2880, H a multiple of the K tile
or not, with and without h), the rules refuse what the kernel cannot do, bad arguments are refused
naming them, the fake implementation propagates shapes, and the debug index check names row_index."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cute_moe import index_checks
from cute_moe.compile import compile_gemm
from cute_moe.dispatch import problem_of, resolve, spec_of
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.kernels.sm90.gathered_swiglu_rules import can_implement
from cute_moe.moe_gemms import gathered_swiglu_grouped_mm
from cute_moe.operands import FP8_PER_BLOCK, FP8_PER_TOKEN
from cute_moe.specs import GemmSpec

from gathered_support import accumulator_coords, gathered_products

bf16 = torch.bfloat16
SMS = 132


def _problem(kind: str, inter: int, hidden: int, experts: int = 128):
    return problem_of(kind, 2 * inter, hidden, experts, 0, 0, num_sms=SMS)


@pytest.mark.parametrize("kind", ["gathered_swiglu", "gathered_swiglu_h"])
@pytest.mark.parametrize("inter,hidden", [(768, 2048), (2880, 2880), (1024, 2048)])
def test_rule_config_compiles(kind, inter, hidden):
    problem = _problem(kind, inter, hidden)
    config = resolve(problem)
    assert config.cluster_n == 1
    assert compile_gemm(spec_of(problem), config).__class__.__name__.startswith("TVMFFI")


FORCED = [
    # I not a multiple of tile_n / 2 (2880 = 22.5 x 128): the last N block's columns are predicated
    (2880, 2880, KernelConfig(tile_m=128, tile_n=256, cluster_m=2)),
    (2880, 2880, KernelConfig(tile_m=64, tile_n=128)),
    # H not a multiple of the 64-wide K tile: A's last pieces are zero-filled, B's by TMA
    (200, 264, KernelConfig(tile_m=64, tile_n=64, cluster_m=2)),
    (768, 7168, KernelConfig(tile_m=128, tile_n=128, cluster_m=2, stages=3)),
]


@pytest.mark.parametrize("inter,hidden,config", FORCED, ids=[f"I{i}-H{h}-{c.key()}" for i, h, c in FORCED])
def test_forced_configs_compile(inter, hidden, config):
    spec = GemmSpec("gathered_swiglu_h", 2 * inter, hidden)
    assert compile_gemm(spec, config).__class__.__name__.startswith("TVMFFI")


@pytest.mark.parametrize("config,match", [
    (KernelConfig(cluster_m=1, cluster_n=2), "cluster_n"),
    (KernelConfig(tile_m=64, swap_ab=1), "swap_ab"),
])
def test_rules_refuse_configs(config, match):
    with pytest.raises(ValueError, match=match):
        can_implement(_problem("gathered_swiglu", 768, 2048), config)


def test_rules_refuse_fp8_operands():
    problem = problem_of("gathered_swiglu", 1536, 2048, 8, 0, 0, a=FP8_PER_TOKEN, b=FP8_PER_BLOCK, num_sms=SMS)
    with pytest.raises(ValueError, match="operands"):
        resolve(problem)


def _args(tokens=6, slots=10, experts=3, inter=16, hidden=64):
    return dict(x=torch.zeros(tokens, hidden, dtype=bf16), row_index=torch.zeros(slots, dtype=torch.int32),
                w13=torch.zeros(experts, 2 * inter, hidden, dtype=bf16),
                ends=torch.tensor([3, 7, 10][:experts], dtype=torch.int32))


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.zeros(6, 64)), TypeError, "x: expected dtype bfloat16"),
    (dict(row_index=torch.zeros(10, dtype=torch.int64)), TypeError, "row_index: expected dtype int32"),
    (dict(row_index=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "row_index: expected 1 dimensions"),
    (dict(w13=torch.zeros(3, 32, 48, dtype=bf16)), ValueError, r"w13: expected \[E, 2I, 64\]"),
    (dict(w13=torch.zeros(3, 24, 64, dtype=bf16)), ValueError, "w13: expected 2I rows with I a positive multiple"),
    (dict(x=torch.zeros(6, 60, dtype=bf16), w13=torch.zeros(3, 32, 60, dtype=bf16)), ValueError,
     "x: expected H to be a positive multiple of 8"),
    (dict(ends=torch.tensor([3, 10], dtype=torch.int32)), ValueError, r"ends: expected shape \(3,\)"),
    (dict(ends=torch.tensor([3, 7, 10], dtype=torch.int64)), TypeError, "ends: expected dtype int32"),
    (dict(x=torch.zeros(0, 64, dtype=bf16)), ValueError, "x: expected at least one token row"),
    (dict(h_out=torch.zeros(10, 16, dtype=bf16)), ValueError, r"h_out: expected shape \(10, 32\)"),
    (dict(h_out=torch.zeros(10, 32)), TypeError, "h_out: expected dtype bfloat16"),
    (dict(h_out=torch.zeros(32, 10, dtype=bf16).t()), ValueError, "h_out: expected a contiguous"),
    (dict(x=torch.zeros(64, 12, dtype=bf16).t()[:6]), ValueError, "x: expected a contiguous"),
    ({}, ValueError, "x: expected a CUDA tensor"),
])
def test_bad_arguments_are_refused_naming_them(change, error, match):
    with pytest.raises(error, match=match):
        gathered_swiglu_grouped_mm(**{**_args(), **change})


def test_no_slots_returns_an_empty_act_after_validation():
    args = _args(slots=0)
    with pytest.raises(ValueError, match="CUDA"):  # validated even with nothing to compute
        gathered_swiglu_grouped_mm(**args)


def test_fake_propagates_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(100, 64, dtype=bf16, device="cuda")
        row_index = torch.empty(300, dtype=torch.int32, device="cuda")
        w13 = torch.empty(8, 48, 64, dtype=bf16, device="cuda")
        ends = torch.empty(8, dtype=torch.int32, device="cuda")
        h = torch.empty(300, 48, dtype=bf16, device="cuda")
        act = torch.ops.cute_moe.gathered_swiglu_grouped_mm(x, row_index, w13, ends, h)
        assert (act.shape, act.dtype, act.device.type) == ((300, 24), bf16, "cuda")
        assert torch.ops.cute_moe.gathered_swiglu_grouped_mm(x, row_index, w13, ends, None).shape == (300, 24)


@pytest.mark.parametrize("values,match", [([0, 5, -1], r"got -1 at position 2"), ([0, 6, 2], r"got 6 at position 1")])
def test_debug_check_names_bad_row_indices(values, match):
    with pytest.raises(ValueError, match=r"row_index: expected row indices in \[0, 6\), " + match):
        index_checks.check_row_indices("row_index", torch.tensor(values, dtype=torch.int32), 6)
    index_checks.check_row_indices("row_index", torch.tensor([0, 5, 3], dtype=torch.int32), 6)


def _cpu_gathered_swiglu(x, row_index, w13, ends, h_out=None):
    """CPU stand-in of the kernel (same semantics, rows past the last end left as they were)."""
    act = torch.zeros(row_index.shape[0], w13.shape[1] // 2, dtype=bf16)
    h = gathered_products(x, row_index, ends, w13.transpose(1, 2))
    gate, up = h.chunk(2, dim=1)
    act[:h.shape[0]] = (torch.nn.functional.silu(gate) * up).to(bf16)
    if h_out is not None:
        h_out[:h.shape[0]] = h.to(bf16)
    return act


@pytest.mark.parametrize("with_h", [False, True], ids=["act", "act+h"])
def test_opcheck(monkeypatch, with_h):
    from cute_moe import moe_gemms

    monkeypatch.setattr(moe_gemms, "GATHERED_SWIGLU", _cpu_gathered_swiglu)
    torch.manual_seed(0)
    x, w13 = torch.randn(6, 16).to(bf16), torch.randn(3, 16, 16).to(bf16)
    row_index, ends = torch.randint(0, 6, (10,), dtype=torch.int32), torch.tensor([4, 4, 9], dtype=torch.int32)
    h = torch.zeros(10, 16, dtype=bf16) if with_h else None
    torch.library.opcheck(torch.ops.cute_moe.gathered_swiglu_grouped_mm, (x, row_index, w13, ends, h),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("tile_m,tile_n", [(128, 256), (64, 128), (128, 64)])
def test_accumulator_halves_pair_gate_and_up_columns(tile_m, tile_n):
    """The SwiGLU epilogue's premise: in every consumer thread, accumulator value v of the second half
    (the up part) sits on the same row as value v of the first half (the gate part), tile_n / 2 columns
    to its right, and the first half holds the columns below tile_n / 2."""
    from cute_moe.kernels.sm90.gathered_swiglu_gemm import Sm90GatheredSwigluGemm

    kernel = Sm90GatheredSwigluGemm(tile_m, tile_n, 1, 0, 8, 768, 2048, True)
    coords = accumulator_coords(kernel, tile_m, tile_n)
    assert len(coords) == kernel.num_consumer_threads
    half = tile_n // 2
    covered = set()
    for values in coords.values():
        part = len(values) // 2
        for (row, col), (up_row, up_col) in zip(values[:part], values[part:]):
            assert col < half and (up_row, up_col) == (row, col + half)
            covered.add((row, col))
    assert len(covered) == tile_m * half  # the gate parts of all threads tile the whole tile


@pytest.mark.parametrize("tile_m", [64, 128])
def test_gather_copy_covers_the_a_stage_once_with_one_column_per_thread(tile_m):
    """The producer's premise: the 128 loading threads' cp.async pieces cover every 8-value piece of
    the tile_m x 64 A stage exactly once, and each thread's pieces share one column (the kernel
    computes a thread's piece column once, from its first row)."""
    import cutlass
    import cutlass.cute as cute

    from cute_moe.kernels.sm90.gathered_swiglu_gemm import Sm90GatheredSwigluGemm

    kernel = Sm90GatheredSwigluGemm(tile_m, 128, 1, 0, 8, 768, 2048, True)
    pieces = {}

    @cute.jit
    def trace():
        kernel._setup(cutlass.BFloat16)
        identity = cute.make_identity_tensor((tile_m, kernel.tile_shape_mnk[2]))
        parts = [kernel.gather_copy().get_slice(t).partition_S(identity) for t in range(128)]
        pieces.update({t: [c[(0, j, 0)] for j in range(cute.size(c, mode=[1]))] for t, c in enumerate(parts)})

    cute.compile(trace, options="--gpu-arch sm_90a")
    seen = [piece for starts in pieces.values() for piece in starts]
    assert sorted(seen) == [(row, col) for row in range(tile_m) for col in range(0, 64, 8)]
    assert all(len({col for _, col in starts}) == 1 for starts in pieces.values())
