"""torch.compile(fullgraph=True) (inductor) of the ops registered for issue 11, on a Hopper GPU.

The compiled call goes through the custom op (``torch.ops.cute_moe.<name>``) and must run the same
kernel as the eager call: outputs bit-identical to eager, the same rows written (the others still
NaN), and the written rows against an FP64 reference of the dequantized operands. Weights get a
power of two per 32-block inside the FP8 x FP4 exact-fold range (docs/fp4.md), so the reference
holds for both pairs at calc_diff <= 1e-5.
"""

import pytest
import torch

import cute_moe
from cute_moe.testing import calc_diff

pytestmark = pytest.mark.gpu
bf16, f32 = torch.bfloat16, torch.float32
G, N, K = 3, 320, 352  # N ends mid 128-tile; K = 11 MXFP4 blocks
MX = 32
EXACT_FOLD_SPREAD = (-2, 3)  # per-32-block magnitudes 2^-2..2^2: the FP8 x FP4 fold is exact
FP4_THRESHOLD = 1e-5
PRENORM_THRESHOLD = 1e-9  # BF16 hi + lo split of b: far tighter than TF32
MAX_M, MASKED_M, EXPECTED_M = 64, (5, 0, 64), 16
TILE_ROWS = 128  # contiguous alignment
PSUM_ENDS = (100, 200, 350)  # uneven: rows [0, 100), [128, 200), [256, 350)


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=f32)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def mx_weights(*shape):
    """((packed int8, UE8M0 exponents in the kernel layout), dequantized float32) of [.., N, K] weights."""
    *lead, n, k = shape
    w = randn(*shape).view(*lead, n, k // MX, MX)
    w = (w * torch.exp2(torch.randint(*EXACT_FOLD_SPREAD, (*lead, n, k // MX, 1), device="cuda").float())).view(shape)
    packed, sf = cute_moe.per_token_cast_to_fp4(w)
    exponents = cute_moe.float_to_ue8m0(sf)
    sfb = cute_moe.transform_sf_into_required_layout(exponents, n, k, (1, MX), lead[0] if lead else None)
    return (packed, sfb), cute_moe.per_token_dequant_fp4(packed, sf)


def fp8(x):
    """((e4m3, per-row-per-128 scales), dequantized float32)."""
    q, sf = cute_moe.per_token_cast_to_fp8(x)
    return (q, sf), cute_moe.per_token_dequant(q, sf)


def product(a, w):
    return a.double() @ w.double().transpose(-1, -2)


def rows_mask(shape, rows):
    """Boolean mask of ``shape`` selecting the listed (index tuples of) leading rows."""
    mask = torch.zeros(shape, dtype=torch.bool, device="cuda")
    for index in rows:
        mask[index] = True
    return mask


# Each case: (step(*inputs) -> d, inputs, FP64 reference of d, mask of the elements the op writes).
def dense_fp8_fp4():
    (a, a_ref), (w, w_ref), c = fp8(randn(200, K)), mx_weights(N, K), randn(200, N)

    def step(a, w, c):
        d = poisoned(c.shape, f32)
        cute_moe.fp8_fp4_gemm_nt(a, w, d, c, recipe_a=(1, 128), recipe_b=(1, MX))
        return d
    return step, (a, w, c), c.double() + product(a_ref, w_ref), rows_mask((200, N), [slice(None)])


def contiguous_fp8_fp4_rows():
    """Per-row experts: expert 0, a tile of -1 (left unwritten), expert 2; expert 1 empty."""
    (a, a_ref), (w, w_ref) = fp8(randn(3 * TILE_ROWS, K)), mx_weights(G, N, K)
    layout = torch.full((3 * TILE_ROWS,), -1, dtype=torch.int32, device="cuda")
    layout[:TILE_ROWS], layout[2 * TILE_ROWS:] = 0, 2

    def step(a, w, layout):
        d = poisoned((layout.shape[0], N), bf16)
        cute_moe.m_grouped_fp8_fp4_gemm_nt_contiguous(a, w, d, layout)
        return d
    ref = torch.zeros(3 * TILE_ROWS, N, dtype=torch.float64, device="cuda")
    ref[:TILE_ROWS] = product(a_ref[:TILE_ROWS], w_ref[0])
    ref[2 * TILE_ROWS:] = product(a_ref[2 * TILE_ROWS:], w_ref[2])
    written = rows_mask(ref.shape, [slice(0, TILE_ROWS), slice(2 * TILE_ROWS, None)])
    return step, (a, w, layout), ref, written


def contiguous_bf16_fp4_psum():
    """psum ends, uneven segments: the rows between a segment's end and the next aligned start stay NaN."""
    a, (w, w_ref) = randn(3 * TILE_ROWS, K).to(bf16), mx_weights(G, N, K)
    ends = torch.tensor(PSUM_ENDS, dtype=torch.int32, device="cuda")

    def step(a, w, ends):
        d = poisoned((a.shape[0], N), f32)
        cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a, w, d, ends, use_psum_layout=True)
        return d
    ref = torch.zeros(3 * TILE_ROWS, N, dtype=torch.float64, device="cuda")
    segments, start = [], 0
    for g, end in enumerate(PSUM_ENDS):
        ref[start:end] = product(a[start:end], w_ref[g])
        segments.append(slice(start, end))
        start = -(-end // TILE_ROWS) * TILE_ROWS
    return step, (a, w, ends), ref, rows_mask(ref.shape, segments)


def masked(pair):
    def case():
        x, (w, w_ref) = randn(G, MAX_M, K), mx_weights(G, N, K)
        (a, a_ref) = fp8(x) if pair == "fp8xfp4" else (x.to(bf16), x.to(bf16).float())
        op = (cute_moe.m_grouped_fp8_fp4_gemm_nt_masked if pair == "fp8xfp4"
              else cute_moe.m_grouped_bf16_fp4_gemm_nt_masked)
        masked_m = torch.tensor(MASKED_M, dtype=torch.int32, device="cuda")

        def step(a, w, masked_m):
            d = poisoned((G, MAX_M, N), bf16)
            op(a, w, d, masked_m, EXPECTED_M)
            return d
        written = rows_mask((G, MAX_M, N), [(g, slice(0, m)) for g, m in enumerate(MASKED_M)])
        return step, (a, w, masked_m), product(a_ref, w_ref), written
    return case


FP4_CASES = {
    "fp8_fp4_gemm_nt": dense_fp8_fp4,
    "m_grouped_fp8_fp4_gemm_nt_contiguous": contiguous_fp8_fp4_rows,
    "m_grouped_bf16_fp4_gemm_nt_contiguous-psum": contiguous_bf16_fp4_psum,
    "m_grouped_fp8_fp4_gemm_nt_masked": masked("fp8xfp4"),
    "m_grouped_bf16_fp4_gemm_nt_masked": masked("bf16xfp4"),
}


def check_compiled(step, inputs):
    """(eager outputs, compiled outputs) after asserting they are bit-identical (NaNs in the same places)."""
    eager = step(*inputs)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    torch.cuda.synchronize()
    eager, compiled = (x if isinstance(x, tuple) else (x,) for x in (eager, compiled))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0, equal_nan=True)
    return eager, compiled


@pytest.mark.parametrize("case", list(FP4_CASES))
def test_compiled_fp4_op_matches_eager_and_reference(case):
    torch.manual_seed(0)
    step, inputs, ref, written = FP4_CASES[case]()
    _, (d,) = check_compiled(step, inputs)
    assert not d[written].isnan().any(), "unwritten (NaN) elements where the op must write"
    assert d[~written].isnan().all(), "elements the op must leave alone were written"
    diff = calc_diff(d[written], ref[written])
    assert diff <= FP4_THRESHOLD, f"calc_diff {diff:.3g} > {FP4_THRESHOLD}"


def test_compiled_prenorm_gemm_matches_eager_and_reference():
    """Unsplit (auto split inside the op) and num_splits=4; rows of magnitudes 1e-2..1e2."""
    torch.manual_seed(0)
    m, n, k, splits = 300, 24, 1024, 4
    a = (randn(m, k) * torch.logspace(-2, 2, m, device="cuda").unsqueeze(1)).to(bf16)
    b = randn(n, k)

    def step(a, b):
        d, sqr = poisoned((a.shape[0], n), f32), poisoned((a.shape[0],), f32)
        cute_moe.tf32_hc_prenorm_gemm(a, b, d, sqr)
        split_d, split_sqr = poisoned((splits, a.shape[0], n), f32), poisoned((splits, a.shape[0]), f32)
        cute_moe.tf32_hc_prenorm_gemm(a, b, split_d, split_sqr, num_splits=splits)
        return d, sqr, split_d, split_sqr

    _, (d, sqr, split_d, split_sqr) = check_compiled(step, (a, b))
    ref_d, ref_sqr = a.double() @ b.double().T, a.double().square().sum(-1)
    for name, got, ref in (("d", d, ref_d), ("sqr_sum", sqr, ref_sqr), ("split d", split_d.sum(0), ref_d),
                           ("split sqr_sum", split_sqr.sum(0), ref_sqr)):
        assert not got.isnan().any(), f"{name}: unwritten elements"
        assert calc_diff(got, ref) < PRENORM_THRESHOLD, f"{name}: calc_diff {calc_diff(got, ref):.2e}"
