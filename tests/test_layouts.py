"""CPU tests of cute_moe.layouts against plain-loop references (one GPU test checks sync-freedom)."""

import math

import pytest
import torch

from cute_moe.layouts import (
    FP8_E4M3_MAX,
    align,
    build_contiguous_layout,
    build_masked_layout,
    ceil_to_ue8m0,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
    layout_masked_to_psum,
    masked_m_to_psum,
    per_block_cast_to_fp8,
    per_block_dequant,
    per_channel_cast_to_fp8,
    per_channel_dequant,
    per_token_cast_to_fp8,
    per_token_dequant,
    permute_tokens,
    psum_to_grouped_layout,
    set_mk_alignment_for_contiguous_layout,
    transform_sf_into_required_layout,
    unpermute_and_reduce,
)

CASTS = {
    "token": (per_token_cast_to_fp8, per_token_dequant, lambda g: (1, g)),
    "block": (per_block_cast_to_fp8, per_block_dequant, lambda g: (g, g)),
    "channel": (per_channel_cast_to_fp8, per_channel_dequant, lambda g: (g, 1)),
}


def ue8m0_reference(value: float) -> float:
    return 2.0 ** math.ceil(math.log2(value))


def exponent_reference(value: float) -> int:
    """Biased UE8M0 exponent of a power of two."""
    return int(math.log2(value)) + 127


def cast_reference(x: torch.Tensor, block_rows: int, block_cols: int, use_ue8m0: bool):
    """Loop over every block of a 2-D x: scale from its amax, then quantize its elements."""
    rows, cols = x.shape
    sf = torch.empty(math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sf.size(0)):
        for j in range(sf.size(1)):
            r, c = slice(i * block_rows, (i + 1) * block_rows), slice(j * block_cols, (j + 1) * block_cols)
            block = x[r, c].float()
            scale = torch.tensor(max(block.abs().max().item(), 1e-4), dtype=torch.float32) / 448.0
            if use_ue8m0:
                scale = torch.tensor(ue8m0_reference(scale.item()), dtype=torch.float32)
            sf[i, j] = scale
            q[r, c] = (block * (1.0 / scale)).to(torch.float8_e4m3fn)
    return q, sf


def rows_of_varied_scale(rows: int, cols: int, dtype=torch.bfloat16) -> torch.Tensor:
    magnitudes = 10.0 ** torch.empty(rows, 1).uniform_(-3, 3)
    return (torch.randn(rows, cols) * magnitudes).to(dtype)


# ---------------------------------------------------------------- quantization

def test_ceil_to_ue8m0_matches_log2_reference():
    torch.manual_seed(0)
    values = torch.cat([10.0 ** torch.empty(200).uniform_(-30, 30), torch.tensor([1.0, 0.5, 2.0 ** -100, 3.0])])
    rounded = ceil_to_ue8m0(values)
    expected = torch.tensor([ue8m0_reference(v) for v in values.tolist()], dtype=torch.float32)
    assert torch.equal(rounded, expected)


@pytest.mark.parametrize("kind", ["token", "block", "channel"])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(7, 256), (130, 200), (200, 131)])
def test_cast_matches_loop_reference(kind, use_ue8m0, shape):
    torch.manual_seed(1)
    cast, _, block = CASTS[kind]
    x = rows_of_varied_scale(*shape)
    x[3] = 0  # an all-zero row exercises the amax clamp
    q, sf = cast(x, use_ue8m0=use_ue8m0)
    ref_q, ref_sf = cast_reference(x, *block(128), use_ue8m0)
    assert sf.dtype == torch.float32 and sf.shape == ref_sf.shape
    assert torch.equal(sf, ref_sf)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("kind", ["token", "block", "channel"])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cast_round_trip_error_bound(kind, use_ue8m0, dtype):
    torch.manual_seed(2)
    cast, dequant, block = CASTS[kind]
    x = rows_of_varied_scale(384, 328, dtype)
    q, sf = cast(x, use_ue8m0=use_ue8m0)
    error = (dequant(q, sf) - x.float()).abs()
    sf_per_element = dequant(torch.ones_like(q), sf)
    # E4M3 keeps 3 mantissa bits: rounding costs <= 2^-4 relative for normals, <= 2^-10 * sf for subnormals.
    bound = 2.0 ** -4 * x.float().abs() * (1 + 1e-6) + 2.0 ** -10 * sf_per_element
    assert bool((error <= bound).all())
    assert error.max() > 0  # the bound is not vacuous: FP8 does lose precision here
    # Each group's largest element maps to 448 exactly, or (rounded) into [224, 448] with power-of-two scales.
    rows, cols = block(128)
    group_max = torch.nn.functional.max_pool2d(
        q.float().abs()[None], (rows, cols), ceil_mode=True)[0]
    if use_ue8m0:
        assert bool(((group_max >= FP8_E4M3_MAX / 2) & (group_max <= FP8_E4M3_MAX)).all())
    else:
        assert bool((group_max == FP8_E4M3_MAX).all())


@pytest.mark.parametrize("kind", ["token", "block", "channel"])
def test_ue8m0_scales_are_covering_powers_of_two(kind):
    torch.manual_seed(3)
    cast, _, _ = CASTS[kind]
    x = rows_of_varied_scale(256, 384)
    sf = cast(x, use_ue8m0=True)[1]
    plain_sf = cast(x, use_ue8m0=False)[1]
    assert bool(((sf.view(torch.int32) & 0x7FFFFF) == 0).all())
    assert bool((sf >= plain_sf).all()) and bool((sf < 2 * plain_sf).all())


@pytest.mark.parametrize("kind", ["token", "block", "channel"])
def test_cast_of_3d_tensor_equals_per_slice_casts(kind):
    torch.manual_seed(4)
    cast, dequant, _ = CASTS[kind]
    x = torch.randn(3, 200, 300, dtype=torch.bfloat16)
    q, sf = cast(x, use_ue8m0=True)
    for g in range(3):
        q_g, sf_g = cast(x[g], use_ue8m0=True)
        assert torch.equal(q[g].view(torch.uint8), q_g.view(torch.uint8))
        assert torch.equal(sf[g], sf_g)
    assert torch.equal(dequant(q, sf)[1], dequant(q[1], sf[1]))


def test_cast_scale_shapes_for_k_not_multiple_of_128():
    x = torch.randn(5, 129)
    assert per_token_cast_to_fp8(x)[1].shape == (5, 2)
    assert per_block_cast_to_fp8(x)[1].shape == (1, 2)
    assert per_channel_cast_to_fp8(x)[1].shape == (1, 129)
    assert per_token_cast_to_fp8(x, gran_k=32)[1].shape == (5, 5)


def test_cast_argument_validation():
    with pytest.raises(TypeError, match="x: expected dtype"):
        per_token_cast_to_fp8(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x: expected a 2 or 3-D tensor, got shape \(128,\)"):
        per_block_cast_to_fp8(torch.ones(128))
    with pytest.raises(ValueError, match="gran_k: expected an int >= 1, got 0"):
        per_token_cast_to_fp8(torch.ones(4, 128), gran_k=0)
    with pytest.raises(TypeError, match="use_ue8m0: expected bool"):
        per_channel_cast_to_fp8(torch.ones(128, 4), use_ue8m0="yes")
    with pytest.raises(TypeError, match="x: expected dtype"):
        ceil_to_ue8m0(torch.ones(3, dtype=torch.float64))
    q, sf = per_token_cast_to_fp8(torch.ones(4, 256))
    with pytest.raises(ValueError, match=r"sf: expected shape \(4, 2\), got \(4, 3\)"):
        per_token_dequant(q, torch.ones(4, 3))
    with pytest.raises(TypeError, match="x_fp8: expected dtype"):
        per_token_dequant(q.float(), sf)


# ---------------------------------------------------------------- scale-factor layouts

@pytest.mark.parametrize("x, element_size, expected",
                         [(0, 4, 0), (1, 4, 4), (4, 4, 4), (5, 4, 8), (4097, 4, 4100), (17, 1, 32), (3, 2, 8)])
def test_get_tma_aligned_size(x, element_size, expected):
    assert get_tma_aligned_size(x, element_size) == expected


def test_get_tma_aligned_size_rejects_element_size_not_dividing_16():
    with pytest.raises(ValueError, match="element_size: expected a divisor of 16, got 3"):
        get_tma_aligned_size(8, 3)


def _sf_inputs(num_groups, mn, sf_k, transposed):
    sf = torch.rand(num_groups, mn, sf_k) + 0.5
    if transposed:
        sf = sf.mT.contiguous().mT
    return sf if num_groups > 1 else sf[0]


@pytest.mark.parametrize("num_groups", [1, 3])
@pytest.mark.parametrize("mn", [1, 4, 5, 127])
@pytest.mark.parametrize("sf_k", [1, 3, 56])
@pytest.mark.parametrize("transposed", [False, True])
def test_mn_major_tma_aligned_tensor_layout(num_groups, mn, sf_k, transposed):
    torch.manual_seed(5)
    sf = _sf_inputs(num_groups, mn, sf_k, transposed)
    out = get_mn_major_tma_aligned_tensor(sf)
    aligned_mn = align(mn, 4)
    assert out.shape == sf.shape and out.dtype == torch.float32
    assert out.stride()[-2:] == (1, aligned_mn)
    if num_groups > 1:
        assert out.stride(0) == aligned_mn * sf_k
    assert torch.equal(out, sf)
    assert get_mn_major_tma_aligned_tensor(out) is out


def unpack_reference(packed: torch.Tensor, sf_k: int) -> list:
    """Split each int32 into its 4 little-endian bytes, K-ordered, and keep the first sf_k."""
    out = []
    for word_row in packed.tolist():
        row = []
        for word in word_row:
            row += [(word >> (8 * b)) & 0xFF for b in range(4)]
        out.append(row)
    return out


@pytest.mark.parametrize("num_groups", [1, 2])
@pytest.mark.parametrize("mn", [3, 8, 129])
@pytest.mark.parametrize("sf_k", [1, 4, 7])
@pytest.mark.parametrize("transposed", [False, True])
def test_packed_ue8m0_round_trip(num_groups, mn, sf_k, transposed):
    torch.manual_seed(6)
    exponents = torch.randint(1, 255, (num_groups, mn, sf_k))
    sf = torch.pow(2.0, (exponents - 127).double()).float()
    if transposed:
        sf = sf.mT.contiguous().mT
    packed = get_mn_major_tma_aligned_packed_ue8m0_tensor(sf if num_groups > 1 else sf[0])
    packed_k, aligned_mn = math.ceil(sf_k / 4), align(mn, 4)
    assert packed.dtype == torch.int32 and packed.dim() == (3 if num_groups > 1 else 2)
    assert packed.stride() == ((packed_k * aligned_mn, 1, aligned_mn) if num_groups > 1 else (1, aligned_mn))
    packed = packed if num_groups > 1 else packed[None]
    assert packed.shape == (num_groups, mn, packed_k)
    for g in range(num_groups):
        unpacked = unpack_reference(packed[g], sf_k)
        expected = [[exponent_reference(v) for v in row] + [0] * (4 * packed_k - sf_k) for row in sf[g].tolist()]
        assert unpacked == expected


def test_packed_ue8m0_with_psum_layout_zeroes_gap_rows():
    sf = torch.full((300, 2), 4.0)
    psum = torch.tensor([3, 130, 130, 260], dtype=torch.int32)  # segments [0,3) [128,130) [256,260)
    packed = get_mn_major_tma_aligned_packed_ue8m0_tensor(sf, psum_layout=psum)
    word = 129 | 129 << 8
    expected = torch.zeros(300, dtype=torch.int32)
    for lo, hi in [(0, 3), (128, 130), (256, 260)]:
        expected[lo:hi] = word
    assert torch.equal(packed[:, 0], expected)
    with pytest.raises(ValueError, match="sf: expected a 2-D tensor with psum_layout"):
        get_mn_major_tma_aligned_packed_ue8m0_tensor(sf[None], psum_layout=psum)


def test_transform_sm90_sfa_is_mn_major_tma_aligned():
    torch.manual_seed(7)
    sf = per_token_cast_to_fp8(torch.randn(2, 37, 300))[1]
    out = transform_sf_into_required_layout(sf, 37, 300, (1, 128, 128), num_groups=2, is_sfa=True)
    assert torch.equal(out, sf) and out.stride() == (40 * 3, 1, 40)
    out2d = transform_sf_into_required_layout(sf[0], 37, 300, (1, 128))
    assert torch.equal(out2d, sf[0]) and out2d.stride() == (1, 40)


def test_transform_sm90_sfb_is_checked_and_kept():
    sf = per_block_cast_to_fp8(torch.randn(3, 300, 256))[1]
    assert transform_sf_into_required_layout(sf, 300, 256, (1, 128, 128), num_groups=3, is_sfa=False) is sf
    mn_major = sf.mT.contiguous().mT
    assert transform_sf_into_required_layout(mn_major, 300, 256, (128, 128), num_groups=3) is mn_major
    strided = torch.rand(3, 3, 4)[:, :, ::2]
    with pytest.raises(ValueError, match="sf: expected K-major or MN-major dense strides"):
        transform_sf_into_required_layout(strided, 300, 256, (128, 128), num_groups=3)


def test_transform_sm100_broadcasts_block_scales_and_packs():
    torch.manual_seed(8)
    sf = per_block_cast_to_fp8(torch.randn(2, 300, 640), use_ue8m0=True)[1]
    out = transform_sf_into_required_layout(sf, 300, 640, (1, 128, 128), num_groups=2, is_sfa=False, arch="sm_100a")
    per_row = sf.repeat_interleave(128, dim=1)[:, :300]
    assert torch.equal(out, get_mn_major_tma_aligned_packed_ue8m0_tensor(per_row))
    assert out.shape == (2, 300, 2) and out.stride() == (2 * 300, 1, 300)
    assert transform_sf_into_required_layout(out, 300, 640, (1, 128), num_groups=2, arch="sm_100a") is out


def test_transform_sm100_sfa_with_gran_k_32():
    sf = per_token_cast_to_fp8(torch.randn(10, 256), use_ue8m0=True, gran_k=32)[1]
    out = transform_sf_into_required_layout(sf, 10, 256, (1, 1, 32), is_sfa=True, arch="sm_100a")
    assert torch.equal(out, get_mn_major_tma_aligned_packed_ue8m0_tensor(sf))
    assert out.shape == (10, 2) and out.stride() == (1, 12)


def test_transform_argument_validation():
    sf = torch.rand(10, 2)
    with pytest.raises(ValueError, match="is_sfa: expected a bool with a 3-element recipe"):
        transform_sf_into_required_layout(sf, 10, 256, (1, 128, 128))
    with pytest.raises(ValueError, match="is_sfa: expected None with a 2-element recipe"):
        transform_sf_into_required_layout(sf, 10, 256, (1, 128), is_sfa=True)
    with pytest.raises(ValueError, match="recipe: expected a tuple of 2 or 3 positive ints"):
        transform_sf_into_required_layout(sf, 10, 256, (1, 128, 128, 1))
    with pytest.raises(ValueError, match=r"sf: expected shape \(10, 3\)"):
        transform_sf_into_required_layout(sf, 10, 300, (1, 128))
    with pytest.raises(ValueError, match=r"sf: expected a 3-D tensor"):
        transform_sf_into_required_layout(sf, 10, 256, (1, 128), num_groups=1)
    with pytest.raises(TypeError, match="sf: expected dtype"):
        transform_sf_into_required_layout(sf.double(), 10, 256, (1, 128))
    with pytest.raises(ValueError, match="arch: expected an SM90 or SM100 name"):
        transform_sf_into_required_layout(sf, 10, 256, (1, 128), arch="sm_80")
    with pytest.raises(ValueError, match="recipe: no sm_90a layout"):
        transform_sf_into_required_layout(torch.rand(10, 8), 10, 256, (1, 32))
    with pytest.raises(ValueError, match="disable_ue8m0_cast: expected False"):
        transform_sf_into_required_layout(torch.rand(10, 8), 10, 256, (1, 32), disable_ue8m0_cast=True,
                                          arch="sm_100a")
    with pytest.raises(ValueError, match="sf: expected MN-major strides with MN stride 12"):
        transform_sf_into_required_layout(torch.zeros(10, 1, dtype=torch.int32), 10, 256, (1, 128), arch="sm_100a")


# ---------------------------------------------------------------- token layouts

def random_routing(num_tokens, top_k, num_experts, unused_experts, drop_prob, seed, dtype=torch.int64):
    """Distinct experts per token drawn from the used ones; some slots dropped (-1)."""
    gen = torch.Generator().manual_seed(seed)
    used = torch.tensor([e for e in range(num_experts) if e not in unused_experts])
    idx = torch.stack([used[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(num_tokens)])
    idx[torch.rand(num_tokens, top_k, generator=gen) < drop_prob] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return idx.to(dtype), weights


def contiguous_reference(topk_idx, num_experts, alignment):
    """Walk tokens then slots, append to each expert's list, lay the lists out at aligned starts."""
    idx = topk_idx.tolist()
    rows_of = [[] for _ in range(num_experts)]
    for t, slots in enumerate(idx):
        for s, e in enumerate(slots):
            if e >= 0:
                rows_of[e].append((t, s))
    permuted, grouped, psum = [], [], []
    inverse = [[-1] * len(slots) for slots in idx]
    for e, rows in enumerate(rows_of):
        start = len(permuted)
        for i, (t, s) in enumerate(rows):
            permuted.append(t)
            grouped.append(e)
            inverse[t][s] = start + i
        psum.append(len(permuted))
        pad = align(len(rows), alignment) - len(rows)
        permuted += [-1] * pad
        grouped += [-1] * pad
    return dict(permuted=permuted, grouped=grouped, inverse=inverse, counts=[len(r) for r in rows_of], psum=psum)


@pytest.mark.parametrize("alignment", [64, 128])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("seed", [0, 1])
def test_contiguous_layout_matches_loop_reference(alignment, idx_dtype, seed):
    topk_idx, _ = random_routing(150, 4, 9, unused_experts={3, 8}, drop_prob=0.2, seed=seed, dtype=idx_dtype)
    layout = build_contiguous_layout(topk_idx, 9, alignment)
    ref = contiguous_reference(topk_idx, 9, alignment)
    assert layout.permuted_rows.dtype == torch.int64 and layout.permuted_rows.tolist() == ref["permuted"]
    assert layout.grouped_layout.dtype == torch.int32 and layout.grouped_layout.tolist() == ref["grouped"]
    assert layout.inverse_map.dtype == torch.int64 and layout.inverse_map.tolist() == ref["inverse"]
    assert layout.expert_counts.dtype == torch.int32 and layout.expert_counts.tolist() == ref["counts"]
    assert layout.psum.dtype == torch.int32 and layout.psum.tolist() == ref["psum"]
    assert layout.num_rows == len(ref["permuted"]) and layout.num_rows % alignment == 0
    assert layout.alignment == alignment
    assert ref["counts"][3] == 0 and ref["counts"][8] == 0


def test_contiguous_layout_defaults_to_global_alignment():
    topk_idx, _ = random_routing(20, 2, 4, unused_experts=set(), drop_prob=0.0, seed=2)
    previous = get_mk_alignment_for_contiguous_layout()
    try:
        set_mk_alignment_for_contiguous_layout(192)
        layout = build_contiguous_layout(topk_idx, 4)
    finally:
        set_mk_alignment_for_contiguous_layout(previous)
    assert layout.alignment == 192
    assert layout.grouped_layout.tolist() == contiguous_reference(topk_idx, 4, 192)["grouped"]


def test_contiguous_layout_with_every_slot_dropped():
    layout = build_contiguous_layout(torch.full((3, 2), -1), 4, 64)
    assert layout.num_rows == 0 and layout.permuted_rows.shape == (0,)
    assert layout.inverse_map.tolist() == [[-1, -1]] * 3 and layout.psum.tolist() == [0, 0, 0, 0]
    out = unpermute_and_reduce(torch.zeros(0, 5), layout, torch.ones(3, 2))
    assert torch.equal(out, torch.zeros(3, 5))


def test_psum_to_grouped_layout_inverts_contiguous_psum():
    topk_idx, _ = random_routing(90, 3, 7, unused_experts={0, 6}, drop_prob=0.1, seed=3)
    layout = build_contiguous_layout(topk_idx, 7, 64)
    assert torch.equal(psum_to_grouped_layout(layout.psum, layout.num_rows, 64), layout.grouped_layout)
    assert torch.equal(masked_m_to_psum(layout.expert_counts, 64), layout.psum)


def test_masked_m_to_psum_matches_generator_formula():
    masked_m = torch.tensor([3, 0, 130, 128, 0, 5], dtype=torch.int32)
    psum = []
    for j, m in enumerate(masked_m.tolist()):
        psum.append((0 if j == 0 else align(psum[-1], 128)) + m)
    assert masked_m_to_psum(masked_m, 128).tolist() == psum == [3, 128, 258, 512, 512, 517]


def test_permute_tokens_gathers_rows_and_zeroes_padding():
    torch.manual_seed(9)
    topk_idx, _ = random_routing(50, 3, 6, unused_experts={2}, drop_prob=0.2, seed=4)
    layout = build_contiguous_layout(topk_idx, 6, 64)
    x = torch.randn(50, 16, dtype=torch.bfloat16)
    x_fp8, sf = per_token_cast_to_fp8(x, gran_k=8)
    for source in (x, x_fp8, sf):
        permuted = permute_tokens(source, layout)
        assert permuted.dtype == source.dtype and permuted.shape == (layout.num_rows, source.size(1))
        for row, token in enumerate(layout.permuted_rows.tolist()):
            expected = source[token] if token >= 0 else torch.zeros_like(source[0])
            assert torch.equal(permuted[row].view(torch.uint8), expected.view(torch.uint8))


def loop_unpermute(y_rows, inverse, weights):
    out = torch.zeros(len(inverse), y_rows.size(-1), dtype=torch.float64)
    for t, rows in enumerate(inverse.tolist()):
        for s, row in enumerate(rows):
            if row >= 0:
                out[t] += weights[t, s].double() * y_rows[row].double()
    return out


def test_unpermute_and_reduce_matches_loop_reference():
    torch.manual_seed(10)
    topk_idx, weights = random_routing(60, 4, 8, unused_experts={5}, drop_prob=0.25, seed=5)
    layout = build_contiguous_layout(topk_idx, 8, 128)
    y = torch.randn(layout.num_rows, 24)
    y[layout.permuted_rows < 0] = float("nan")  # padding rows must never leak into the sum
    out = unpermute_and_reduce(y, layout, weights)
    assert out.dtype == torch.float32 and out.shape == (60, 24)
    torch.testing.assert_close(out.double(), loop_unpermute(y, layout.inverse_map, weights), rtol=1e-5, atol=1e-5)
    out_bf16 = unpermute_and_reduce(y.bfloat16(), layout, weights)
    assert out_bf16.dtype == torch.bfloat16
    expected_bf16 = loop_unpermute(y.bfloat16(), layout.inverse_map, weights)
    torch.testing.assert_close(out_bf16.double(), expected_bf16, rtol=1e-2, atol=1e-2)


def test_permute_then_unpermute_scales_tokens_by_kept_weights():
    torch.manual_seed(11)
    topk_idx, weights = random_routing(40, 4, 6, unused_experts=set(), drop_prob=0.3, seed=6)
    x = torch.randn(40, 8)
    for layout in (build_contiguous_layout(topk_idx, 6, 64), build_masked_layout(topk_idx, 6, 64)):
        out = unpermute_and_reduce(permute_tokens(x, layout), layout, weights)
        kept = torch.where(topk_idx >= 0, weights, 0.0).sum(1, keepdim=True)
        torch.testing.assert_close(out, x * kept)


def masked_reference(topk_idx, num_experts, max_m):
    idx = topk_idx.tolist()
    rows_of = [[] for _ in range(num_experts)]
    inverse = [[-1] * len(slots) for slots in idx]
    for t, slots in enumerate(idx):
        for s, e in enumerate(slots):
            if e >= 0:
                if len(rows_of[e]) < max_m:
                    inverse[t][s] = e * max_m + len(rows_of[e])
                rows_of[e].append(t)
    permuted = [(rows + [-1] * max_m)[:max_m] for rows in rows_of]
    return dict(permuted=permuted, inverse=inverse, counts=[len(r) for r in rows_of],
                masked_m=[min(len(r), max_m) for r in rows_of])


@pytest.mark.parametrize("max_m", [5, 40])
def test_masked_layout_matches_loop_reference(max_m):
    # Expert 0 unused: flat row 0, where dropped slots point before masking, is a NaN row below.
    topk_idx, weights = random_routing(30, 3, 6, unused_experts={0}, drop_prob=0.2, seed=7)
    layout = build_masked_layout(topk_idx, 6, max_m)
    ref = masked_reference(topk_idx, 6, max_m)
    assert layout.permuted_rows.tolist() == ref["permuted"]
    assert layout.inverse_map.tolist() == ref["inverse"]
    assert layout.masked_m.dtype == torch.int32 and layout.masked_m.tolist() == ref["masked_m"]
    assert layout.expert_counts.tolist() == ref["counts"]
    overflowing = max(ref["counts"]) > max_m
    assert bool(layout.overflow) == overflowing and overflowing == (max_m == 5)

    y = torch.randn(6, max_m, 10)
    y[layout.permuted_rows < 0] = float("nan")
    out = unpermute_and_reduce(y, layout, weights)
    expected = loop_unpermute(y.view(-1, 10), layout.inverse_map, weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    permuted = permute_tokens(torch.arange(30.0)[:, None], layout)
    assert permuted.shape == (6, max_m, 1)
    assert permuted[..., 0].tolist() == [[max(t, 0) for t in rows] for rows in ref["permuted"]]


def test_masked_layout_check_raises_on_overflow():
    topk_idx = torch.tensor([[0, 1], [0, 2], [0, -1]])
    with pytest.raises(ValueError, match=r"max_m: expected >= rows per expert, got 2 but experts \{0: 3\}"):
        build_masked_layout(topk_idx, 3, 2, check=True)
    assert build_masked_layout(topk_idx, 3, 3, check=True).masked_m.tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[-1, 3\), got 3 at position \(0, 1\)"):
        build_masked_layout(torch.tensor([[0, 3]]), 3, 4, check=True)
    unchecked = build_masked_layout(torch.tensor([[0, 3]]), 3, 4)
    assert unchecked.inverse_map.tolist() == [[0, -1]]


def test_layout_masked_to_psum_matches_loop_reference():
    torch.manual_seed(12)
    masked_m = torch.tensor([5, 0, 64, 70], dtype=torch.int32)
    x = torch.randn(4, 70, 3)
    psum = masked_m_to_psum(masked_m, 64)
    out = layout_masked_to_psum(x, psum, 64)
    expected = torch.zeros(4 * 128, 3)
    start = 0
    for g, m in enumerate(masked_m.tolist()):
        expected[start:start + m] = x[g, :m]
        start = align(start + m, 64)
    assert torch.equal(out, expected)
    # A psum claiming more rows than max_m copies only the max_m rows x has.
    clipped = layout_masked_to_psum(x[:, :4], psum, 64)
    assert clipped.shape == (4 * 64, 3) and psum.tolist() == [5, 64, 128, 198]
    for g, start, end in [(0, 0, 64), (2, 64, 128), (3, 128, 256)]:
        assert torch.equal(clipped[start:start + 4], x[g, :4]) and not clipped[start + 4:end].any()


def test_token_layout_argument_validation():
    topk_idx, weights = random_routing(4, 2, 3, unused_experts=set(), drop_prob=0.0, seed=8)
    layout = build_contiguous_layout(topk_idx, 3, 64)
    with pytest.raises(TypeError, match="topk_idx: expected dtype"):
        build_contiguous_layout(topk_idx.float(), 3)
    with pytest.raises(ValueError, match=r"topk_idx: expected a 2-D tensor, got shape \(8,\)"):
        build_masked_layout(topk_idx.view(-1), 3, 8)
    with pytest.raises(ValueError, match="num_experts: expected an int >= 1, got 0"):
        build_contiguous_layout(topk_idx, 0)
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[-1, 2\), got 2 at position"):
        build_contiguous_layout(topk_idx, 2)
    with pytest.raises(TypeError, match="alignment: expected int"):
        build_contiguous_layout(topk_idx, 3, 64.0)
    with pytest.raises(ValueError, match=r"x: expected 4 rows \(tokens of the layout\), got shape \(5, 8\)"):
        permute_tokens(torch.zeros(5, 8), layout)
    with pytest.raises(TypeError, match="layout: expected ContiguousLayout or MaskedLayout"):
        permute_tokens(torch.zeros(4, 8), (layout.permuted_rows, layout.inverse_map))
    y = torch.zeros(layout.num_rows, 8)
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \(4, 2\), got \(4, 3\)"):
        unpermute_and_reduce(y, layout, torch.ones(4, 3))
    with pytest.raises(TypeError, match="topk_weights: expected dtype"):
        unpermute_and_reduce(y, layout, torch.ones(4, 2, dtype=torch.int64))
    rows = layout.num_rows
    with pytest.raises(ValueError, match=rf"y: expected shape \({rows}, 8\), got \({rows - 1}, 8\)"):
        unpermute_and_reduce(y[1:], layout, weights)
    with pytest.raises(ValueError, match="psum: expected at least one group"):
        psum_to_grouped_layout(torch.zeros(0, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"psum_m: expected shape \(2,\), got \(3,\)"):
        layout_masked_to_psum(torch.zeros(2, 4, 1), torch.zeros(3, dtype=torch.int32))


# ---------------------------------------------------------------- GPU: device-agnostic and sync-free

@pytest.mark.gpu
def test_sync_free_functions_match_cpu_on_cuda():
    torch.manual_seed(13)
    x = torch.randn(96, 300, dtype=torch.bfloat16)
    w = torch.randn(2, 200, 256, dtype=torch.bfloat16)
    topk_idx, weights = random_routing(96, 4, 8, unused_experts={1}, drop_prob=0.2, seed=9)
    contiguous = build_contiguous_layout(topk_idx, 8, 64)
    x_cuda, w_cuda, idx_cuda, weights_cuda = (t.cuda() for t in (x, w, topk_idx, weights))
    contiguous_cuda = build_contiguous_layout(idx_cuda, 8, 64)  # syncs once, outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q, sfa = per_token_cast_to_fp8(x_cuda, use_ue8m0=True)
        w_q, sfb = per_block_cast_to_fp8(w_cuda, use_ue8m0=True)
        sfa_t = transform_sf_into_required_layout(sfa, 96, 300, (1, 128, 128), is_sfa=True, arch="sm_100a")
        sfb_t = transform_sf_into_required_layout(sfb, 200, 256, (1, 128, 128), 2, False, arch="sm_100a")
        sfa_90 = transform_sf_into_required_layout(sfa, 96, 300, (1, 128, 128), is_sfa=True)
        masked = build_masked_layout(idx_cuda, 8, 64)
        permuted = permute_tokens(x_cuda, contiguous_cuda)
        reduced = unpermute_and_reduce(permuted.float(), contiguous_cuda, weights_cuda)
        reduced_masked = unpermute_and_reduce(permute_tokens(x_cuda, masked).float(), masked, weights_cuda)
        psum = masked_m_to_psum(masked.masked_m, 64)
        grouped = psum_to_grouped_layout(contiguous_cuda.psum, contiguous_cuda.num_rows, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    q_cpu, sfa_cpu = per_token_cast_to_fp8(x, use_ue8m0=True)
    assert torch.equal(q.cpu().view(torch.uint8), q_cpu.view(torch.uint8)) and torch.equal(sfa.cpu(), sfa_cpu)
    assert torch.equal(w_q.cpu().view(torch.uint8), per_block_cast_to_fp8(w, use_ue8m0=True)[0].view(torch.uint8))
    assert torch.equal(sfa_t.cpu(), get_mn_major_tma_aligned_packed_ue8m0_tensor(sfa_cpu))
    assert torch.equal(sfb_t.cpu(), transform_sf_into_required_layout(
        sfb.cpu(), 200, 256, (1, 128, 128), 2, False, arch="sm_100a"))
    assert torch.equal(sfa_90.cpu(), sfa_cpu) and sfa_90.stride() == (1, 96)
    for field in ("permuted_rows", "grouped_layout", "inverse_map", "expert_counts", "psum"):
        assert torch.equal(getattr(contiguous_cuda, field).cpu(), getattr(contiguous, field))
    assert torch.equal(grouped.cpu(), contiguous.grouped_layout)
    assert torch.equal(psum.cpu(), masked_m_to_psum(build_masked_layout(topk_idx, 8, 64).masked_m, 64))
    kept = torch.where(topk_idx >= 0, weights, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(reduced.cpu(), x.float() * kept)
    torch.testing.assert_close(reduced_masked.cpu(), x.float() * kept)


def test_bad_expert_id_errors_name_the_first_bad_value_and_its_position():
    topk_idx = torch.zeros(20, 2, dtype=torch.int64)
    topk_idx[8, 1], topk_idx[12, 0] = 9, -5
    message = r"^topk_idx: expected expert ids in \[-1, 8\), got 9 at position \(8, 1\)$"
    with pytest.raises(ValueError, match=message):
        build_contiguous_layout(topk_idx, 8, 64)
    with pytest.raises(ValueError, match=message):
        build_masked_layout(topk_idx, 8, 64, check=True)
    topk_idx[8, 1] = 0
    with pytest.raises(ValueError, match=r"got -5 at position \(12, 0\)$"):
        build_contiguous_layout(topk_idx.int(), 8, 64)
    assert build_contiguous_layout(torch.zeros(0, 2, dtype=torch.int32), 8, 64).num_rows == 0


@pytest.mark.parametrize("alignment", [100, 0, 32])
def test_layouts_refuse_the_alignments_the_global_setter_refuses(alignment):
    message = r"^alignment: expected a positive multiple of 64, got -?\d+$"
    with pytest.raises(ValueError, match=message):
        set_mk_alignment_for_contiguous_layout(alignment)
    with pytest.raises(ValueError, match=message):
        build_contiguous_layout(torch.zeros(4, 2, dtype=torch.int64), 3, alignment)
    with pytest.raises(ValueError, match=message):
        masked_m_to_psum(torch.tensor([3, 5], dtype=torch.int32), alignment)
