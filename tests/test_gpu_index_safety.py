"""Index tensors can never fault the GPU or make a kernel write outside its output (Hopper GPU).

Every op gets out-of-range values in its index tensor: expert ids >= G or < -1, negative, huge and
decreasing ends, negative and oversized masked_m. The output lives inside a larger buffer whose
guard rows hold a sentinel; after the launch the device must still work, the guard rows must be
untouched, and the rows the documented rule assigns to a group must be correct. CUTE_MOE_DEBUG
turns the same values into ValueErrors naming the argument and the first bad position.
"""

import contextlib

import pytest
import torch

import cute_moe
from cute_moe import launcher
from cute_moe.layouts.alignment import align
from cute_moe.testing import calc_diff

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
N, K = 256, 256
GUARD = 64  # sentinel rows before and after each output
SENTINEL = 12345.0
INT32_MAX = 2**31 - 1


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(bf16)


def guarded(rows: int, *lead: int, dtype=bf16):
    """(output view of shape [*lead, rows, N] inside a buffer, the whole buffer); NaN inside, sentinel around."""
    count = 1
    for extent in lead:
        count *= extent
    buffer = torch.full((GUARD + count * rows + GUARD, N), SENTINEL, device="cuda", dtype=dtype)
    buffer[GUARD:GUARD + count * rows] = float("nan")
    return buffer[GUARD:GUARD + count * rows].view(*lead, rows, N), buffer


def assert_guards_intact(buffer):
    torch.cuda.synchronize()  # a fault would surface here
    assert (buffer[:GUARD] == SENTINEL).all() and (buffer[-GUARD:] == SENTINEL).all(), "write outside the output"


def quantize(a, w):
    a_q, sfa = cute_moe.per_token_cast_to_fp8(a.reshape(-1, K))
    sfa = cute_moe.get_mn_major_tma_aligned_tensor(sfa.view(*a.shape[:-1], -1))
    return (a_q.view(a.shape), sfa), cute_moe.per_block_cast_to_fp8(w)


def reference_rows(a, w, g, rows):
    return a[rows].float() @ w[g].float().T


# An M-cluster of two 128-row tiles over 128-row segments: its CTAs may hold different experts.
MIXED_EXPERT_CLUSTERS = cute_moe.KernelConfig(tile_m=128, tile_n=128, cluster_m=2)


@pytest.mark.parametrize("config", [None, MIXED_EXPERT_CLUSTERS], ids=["dispatched", "mixed-clusters"])
@pytest.mark.parametrize("fp8", [False, True])
def test_contiguous_ids_outside_the_experts_skip_their_tiles(fp8, config):
    g, seg = 4, cute_moe.get_mk_alignment_for_contiguous_layout()
    # One segment each; an odd count leaves the last cluster's second tile outside the rows.
    ids = [0, g, 1, -5, g + 100, INT32_MAX, 2, -1, -1, 3, 1, 1, 3]
    m = seg * len(ids)
    a, w = randn(m, K), randn(g, N, K)
    layout = torch.tensor(ids, device="cuda", dtype=torch.int32).repeat_interleave(seg)
    d, buffer = guarded(m)
    with (cute_moe.dispatch.force_config(config) if config else contextlib.nullcontext()):
        if fp8:
            cute_moe.m_grouped_fp8_gemm_nt_contiguous(*quantize(a, w), d, layout)
        else:
            cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, layout)
    assert_guards_intact(buffer)
    for s, expert in enumerate(ids):
        rows = slice(s * seg, (s + 1) * seg)
        if 0 <= expert < g:
            assert calc_diff(d[rows], reference_rows(a, w, expert, rows)) < (1e-3 if fp8 else 1e-5)
        else:
            assert d[rows].isnan().all(), f"segment {s} with id {expert} was written"


@pytest.mark.parametrize("fp8", [False, True])
def test_masked_counts_are_clamped_to_zero_and_max_m(fp8):
    g, max_m = 5, 96
    counts = [-7, max_m + 1000, 17, INT32_MAX, -(2**31)]
    a, w = randn(g, max_m, K), randn(g, N, K)
    masked_m = torch.tensor(counts, device="cuda", dtype=torch.int32)
    d, buffer = guarded(max_m, g)
    if fp8:
        cute_moe.m_grouped_fp8_gemm_nt_masked(*quantize(a, w), d, masked_m, 32)
    else:
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, masked_m, 32)
    assert_guards_intact(buffer)
    for group, count in enumerate(counts):
        rows = max(0, min(count, max_m))
        if rows:
            assert calc_diff(d[group, :rows], a[group, :rows].float() @ w[group].float().T) < (1e-3 if fp8 else 1e-5)
        assert d[group, rows:].isnan().all()


def ragged_spans(ends, total, alignment=1):
    """The documented rule: group g spans [align(max(0, ends[<g])), min(ends[g], total))."""
    spans, before = [], 0
    for end in ends:
        start = align(max(before, 0), alignment)
        spans.append((start, max(start, min(end, total))))
        before = max(before, end)
    return spans


@pytest.mark.parametrize("ends", [[100, 50, 300, 200, 900], [-5, 40, 40, 2**30, 10], [0, 0, 0, 0, INT32_MAX]])
def test_ragged_ends_never_overlap_or_overflow(ends):
    g, m = len(ends), 700
    a, w = randn(m, K), randn(g, N, K)
    offs = torch.tensor(ends, device="cuda", dtype=torch.int32)
    out = cute_moe.grouped_mm(a, w.transpose(1, 2), offs)
    torch.cuda.synchronize()
    for group, (start, end) in enumerate(ragged_spans(ends, m)):
        if end > start:
            assert calc_diff(out[start:end], reference_rows(a, w, group, slice(start, end))) < 1e-5


@pytest.mark.parametrize("fp8", [False, True])
def test_psum_ends_never_overlap_or_overflow(fp8):
    alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
    ends = [300, 100, 700, 650, INT32_MAX, -3]
    g, m = len(ends), align(700, alignment) + alignment
    a, w = randn(m, K), randn(g, N, K)
    d, buffer = guarded(m)
    psum = torch.tensor(ends, device="cuda", dtype=torch.int32)
    if fp8:
        cute_moe.m_grouped_fp8_gemm_nt_contiguous(*quantize(a, w), d, psum, use_psum_layout=True)
    else:
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, psum, use_psum_layout=True)
    assert_guards_intact(buffer)
    written = torch.zeros(m, dtype=torch.bool)
    for group, (start, end) in enumerate(ragged_spans(ends, m, alignment)):
        if end > start:
            assert calc_diff(d[start:end], reference_rows(a, w, group, slice(start, end))) < (1e-3 if fp8 else 1e-5)
            written[start:end] = True
    assert d[~written.cuda()].isnan().all()


@pytest.fixture
def debug_mode():
    launcher.set_debug(True)
    yield
    launcher.set_debug(False)


def test_debug_mode_names_the_argument_and_the_first_bad_position(debug_mode):
    g, seg = 3, cute_moe.get_mk_alignment_for_contiguous_layout()
    a, w = randn(seg * 2, K), randn(g, N, K)
    d = torch.empty(seg * 2, N, device="cuda", dtype=bf16)
    layout = torch.zeros(seg * 2, device="cuda", dtype=torch.int32)
    layout[seg + 5] = g
    with pytest.raises(ValueError, match=rf"^grouped_layout: expected expert ids in \[-1, 3\), got 3 at position {seg + 5}"):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, layout)
    with pytest.raises(ValueError, match=r"^grouped_layout: expected non-decreasing cumulative ends, got 10 after 200 "
                                         r"at position 1"):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, torch.tensor([200, 10, 256], device="cuda",
                                                                         dtype=torch.int32), use_psum_layout=True)
    with pytest.raises(ValueError, match=r"^offs: expected cumulative ends in \[0, 256\], got 300 at position 2"):
        cute_moe.grouped_mm(a, w.transpose(1, 2), torch.tensor([1, 2, 300], device="cuda", dtype=torch.int32))
    x = randn(g, 8, K)
    with pytest.raises(ValueError, match=r"^masked_m: expected row counts in \[0, 8\], got -1 at position 1"):
        cute_moe.m_grouped_bf16_gemm_nt_masked(x, w, torch.empty(g, 8, N, device="cuda", dtype=bf16),
                                               torch.tensor([1, -1, 9], device="cuda", dtype=torch.int32), 4)
    (a_q, sfa), b_q = quantize(a, w)
    with pytest.raises(ValueError, match=r"^grouped_layout: expected expert ids in \[-1, 3\)"):
        cute_moe.m_grouped_fp8_gemm_nt_contiguous((a_q, sfa), b_q, d, layout)
    layout[seg + 5] = 2
    cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, layout)  # valid ids pass in debug mode
    torch.cuda.synchronize()
