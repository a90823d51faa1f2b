"""The MoE layer's fused backward dact GEMM (gathered_swiglu_backward_mm) on the CPU: its kernel compiles
for sm_90a at the configs the rules pick (I = 768 / 2880, H = 2048 / 7168 / 264) and at forced ones,
the rules refuse what the kernel cannot do, bad arguments are refused naming them, the fake
implementation propagates shapes (opcheck with a CPU stand-in of the kernel), the debug index checks
name their tensors, and the epilogue's layout premises hold for the kernel's own tiled MMA."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cute_moe.compile import compile_gemm
from cute_moe.dispatch import problem_of, resolve, spec_of
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.kernels.sm90.gathered_swiglu_backward_rules import MIN_TILE_N, can_implement
from cute_moe.moe_backward_gemms import W2_OPERAND, gathered_swiglu_backward_mm
from cute_moe.operands import BF16
from cute_moe.specs import GemmSpec

from gathered_support import accumulator_coords, cpu_backward

bf16 = torch.bfloat16
SMS = 132
KIND = "gathered_swiglu_backward"


def _problem(inter: int, hidden: int, experts: int = 128, b=W2_OPERAND):
    return problem_of(KIND, inter, hidden, experts, 0, 0, b=b, num_sms=SMS)


@pytest.mark.parametrize("inter", [768, 2880])
@pytest.mark.parametrize("hidden", [2048, 7168, 264])
def test_rule_config_compiles(inter, hidden):
    problem = _problem(inter, hidden)
    config = resolve(problem)
    assert config.cluster_n == 1 and config.tile_n >= MIN_TILE_N
    assert compile_gemm(spec_of(problem), config).__class__.__name__.startswith("TVMFFI")


FORCED = [
    (2880, 2880, KernelConfig(tile_m=64, tile_n=128)),                     # 2880 = 22.5 x 128 columns
    (768, 264, KernelConfig(tile_m=128, tile_n=128, cluster_m=2)),         # partial K tile
    (200, 7168, KernelConfig(tile_m=64, tile_n=256, cluster_m=2, stages=2)),  # I < one N tile
]


@pytest.mark.parametrize("inter,hidden,config", FORCED, ids=[f"I{i}-H{h}-{c.key()}" for i, h, c in FORCED])
def test_forced_configs_compile(inter, hidden, config):
    spec = GemmSpec(KIND, inter, hidden, b=W2_OPERAND)
    assert compile_gemm(spec, config).__class__.__name__.startswith("TVMFFI")


@pytest.mark.parametrize("config,match", [
    (KernelConfig(cluster_m=1, cluster_n=2), "cluster_n"),
    (KernelConfig(tile_m=64, swap_ab=1), "swap_ab"),
    (KernelConfig(tile_m=64, tile_n=64), "tile_n >= 128"),
])
def test_rules_refuse_configs(config, match):
    with pytest.raises(ValueError, match=match):
        can_implement(_problem(768, 2048), config)


def test_rules_refuse_a_k_major_w2():
    with pytest.raises(ValueError, match="operands"):
        resolve(_problem(768, 2048, b=BF16))


def _args(tokens=6, slots=10, experts=3, inter=16, hidden=64):
    return dict(grad_out=torch.zeros(tokens, hidden, dtype=bf16), row_index=torch.zeros(slots, dtype=torch.int32),
                w2=torch.zeros(experts, hidden, inter, dtype=bf16),
                ends=torch.tensor([3, 7, 10][:experts], dtype=torch.int32),
                h=torch.zeros(slots, 2 * inter, dtype=bf16), weight=torch.zeros(slots))


@pytest.mark.parametrize("change,error,match", [
    (dict(grad_out=torch.zeros(6, 64)), TypeError, "grad_out: expected dtype bfloat16"),
    (dict(row_index=torch.zeros(10, dtype=torch.int64)), TypeError, "row_index: expected dtype int32"),
    (dict(row_index=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "row_index: expected 1 dimensions"),
    (dict(w2=torch.zeros(3, 48, 16, dtype=bf16)), ValueError, r"w2: expected \[E, 64, I\]"),
    (dict(w2=torch.zeros(3, 64, 12, dtype=bf16), h=torch.zeros(10, 24, dtype=bf16)), ValueError,
     "w2: expected I to be a positive multiple of 8"),
    (dict(grad_out=torch.zeros(6, 60, dtype=bf16), w2=torch.zeros(3, 60, 16, dtype=bf16)), ValueError,
     "grad_out: expected H to be a positive multiple of 8"),
    (dict(ends=torch.tensor([3, 10], dtype=torch.int32)), ValueError, r"ends: expected shape \(3,\)"),
    (dict(ends=torch.tensor([3, 7, 10], dtype=torch.int64)), TypeError, "ends: expected dtype int32"),
    (dict(h=torch.zeros(10, 16, dtype=bf16)), ValueError, r"h: expected shape \(10, 32\)"),
    (dict(h=torch.zeros(10, 32)), TypeError, "h: expected dtype bfloat16"),
    (dict(h=torch.zeros(32, 10, dtype=bf16).t()), ValueError, "h: expected a contiguous"),
    (dict(weight=torch.zeros(10, dtype=bf16)), TypeError, "weight: expected dtype float32"),
    (dict(weight=torch.zeros(9)), ValueError, r"weight: expected shape \(10,\)"),
    (dict(grad_out=torch.zeros(0, 64, dtype=bf16)), ValueError, "grad_out: expected at least one token row"),
    (dict(grad_out=torch.zeros(64, 12, dtype=bf16).t()[:6]), ValueError, "grad_out: expected a contiguous"),
    (dict(w2=torch.zeros(3, 16, 64, dtype=bf16).transpose(1, 2)), ValueError, "w2: expected a contiguous"),
    ({}, ValueError, "grad_out: expected a CUDA tensor"),
])
def test_bad_arguments_are_refused_naming_them(change, error, match):
    with pytest.raises(error, match=match):
        gathered_swiglu_backward_mm(**{**_args(), **change})


def test_no_slots_is_validated_too():
    with pytest.raises(ValueError, match="CUDA"):
        gathered_swiglu_backward_mm(**_args(slots=0))


def test_fake_propagates_shapes_and_dtypes():
    with FakeTensorMode():
        grad_out = torch.empty(100, 64, dtype=bf16, device="cuda")
        row_index = torch.empty(300, dtype=torch.int32, device="cuda")
        w2 = torch.empty(8, 64, 24, dtype=bf16, device="cuda")
        ends = torch.empty(8, dtype=torch.int32, device="cuda")
        h = torch.empty(300, 48, dtype=bf16, device="cuda")
        weight = torch.empty(300, device="cuda")
        dh, d_weight = torch.ops.cute_moe.gathered_swiglu_backward_mm(grad_out, row_index, w2, ends, h, weight)
        assert (dh.shape, dh.dtype, dh.device.type) == ((300, 48), bf16, "cuda")
        assert (d_weight.shape, d_weight.dtype) == ((300,), torch.float32)


def test_opcheck(monkeypatch):
    from cute_moe import moe_backward_gemms

    monkeypatch.setattr(moe_backward_gemms, "GATHERED_SWIGLU_BACKWARD", cpu_backward)
    torch.manual_seed(0)
    grad_out, w2 = torch.randn(6, 16).to(bf16), torch.randn(3, 16, 8).to(bf16)
    row_index, ends = torch.randint(0, 6, (10,), dtype=torch.int32), torch.tensor([4, 4, 10], dtype=torch.int32)
    h, weight = torch.randn(10, 16).to(bf16), torch.rand(10)
    torch.library.opcheck(torch.ops.cute_moe.gathered_swiglu_backward_mm, (grad_out, row_index, w2, ends, h, weight),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_debug_mode_checks_the_index_tensors():
    """CUTE_MOE_DEBUG: a bad row index or end is refused on the host, naming it and its position."""
    from cute_moe.moe_backward_gemms import GATHERED_SWIGLU_BACKWARD

    args = _args()
    bad_rows = {**args, "row_index": torch.tensor([0, 1, 2, 6, 0, 0, 0, 0, 0, 0], dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"row_index: expected row indices in \[0, 6\), got 6 at position 3"):
        GATHERED_SWIGLU_BACKWARD.check_indices(*bad_rows.values(), None, None)
    bad_ends = {**args, "ends": torch.tensor([3, 11, 10], dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"ends: expected cumulative ends in \[0, 10\], got 11 at position 1"):
        GATHERED_SWIGLU_BACKWARD.check_indices(*bad_ends.values(), None, None)
    GATHERED_SWIGLU_BACKWARD.check_indices(*args.values(), None, None)  # valid ones pass


@pytest.mark.parametrize("tile_m,tile_n", [(128, 256), (64, 128), (128, 128)])
def test_accumulator_rows_and_quads(tile_m, tile_n):
    """The epilogue's premises, traced from the kernel's own tiled MMA for every consumer thread:
    accumulator value i sits on row r0 + 8 * ((i // 2) % 2) (r0 = the row of value 0), values 2j and
    2j + 1 on adjacent columns (the first one even); values
    [0, P) of the first half lie in columns [0, tile_n / 2) and values [P, 2P) are the same rows
    tile_n / 2 columns right (the two column halves stored apart); and the 4 threads of a quad
    (consumer thread ids 4q .. 4q + 3) hold the same two rows and, together, every column of them."""
    from cute_moe.kernels.sm90.gathered_swiglu_backward_gemm import Sm90GatheredSwigluBackwardGemm

    kernel = Sm90GatheredSwigluBackwardGemm(tile_m, tile_n, 1, 0, 8, 768, 2048)
    coords = accumulator_coords(kernel, tile_m, tile_n)
    assert len(coords) == kernel.num_consumer_threads
    half = tile_n // 2
    covered = set()
    for values in coords.values():
        r0 = values[0][0]
        part = len(values) // 2
        assert all(row == r0 + 8 * ((i // 2) % 2) for i, (row, _) in enumerate(values))
        # values 2j and 2j + 1: columns c and c + 1 of one row, c even (the epilogue's 4-byte h loads)
        assert all(values[i + 1] == (row, col + 1) and col % 2 == 0 for i, (row, col) in list(enumerate(values))[::2])
        assert all(col < half for _, col in values[:part])
        assert [(row, col + half) for row, col in values[:part]] == values[part:]
        covered.update(values)
    assert len(covered) == tile_m * tile_n
    for quad in range(kernel.num_consumer_threads // 4):
        members = [coords[4 * quad + lane] for lane in range(4)]
        rows = {values[0][0] for values in members}
        assert len(rows) == 1
        r0 = rows.pop()
        cells = {cell for values in members for cell in values}
        assert cells == {(row, col) for row in (r0, r0 + 8) for col in range(tile_n)}


def test_own_kernel_family_includes_gemm1_sources():
    """Editing GEMM1's kernel (the shared body and producer) invalidates this kernel's cache entries."""
    from cute_moe.kernels.sm90.backend import BACKEND, GATHERED_SWIGLU_GEMM

    family = BACKEND.kernel_family(GemmSpec(KIND, 768, 2048, b=W2_OPERAND))
    names = {path.name for path in family.sources}
    assert family.name == "sm90_gathered_swiglu_backward_gemm"
    assert {"gathered_swiglu_backward_gemm.py", "gathered_swiglu_backward_signature.py"} <= names
    assert set(GATHERED_SWIGLU_GEMM.sources) <= set(family.sources)
