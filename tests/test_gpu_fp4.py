"""MXFP4-weight kernels (BF16 x FP4, FP8 x FP4) on a Hopper GPU.

References are FP64 products of the dequantized operands (the FP4 weights as ``per_token_dequant_fp4``
gives them, FP8 activations times their scales), so a wrong nibble, scale index or fold shows up far
above the thresholds: calc_diff <= 1e-5. Weights get a different power-of-two magnitude per 32-block.
FP8 x FP4 folds the four exponents of a 128-K block into E4M3 weights: exact while they lie within 8
binades of the block's largest (checked here against the dequantized weights); wider spreads are
checked against an emulation of the documented rounding and the bound of docs/fp4.md.
Outputs are NaN-poisoned: rows a kernel must not write stay NaN. Two kernels serve these ops: the
rules send masked, contiguous and psum launches to the swap-AB kernel (kernels/sm90/fp4_swap_gemm.py)
and dense ones to the widen-in-shared-memory kernel; tests marked BOTH_KERNELS also force the latter.
"""

import contextlib

import pytest
import torch

import cute_moe
from cute_moe.dispatch import force_config
from cute_moe.kernels.sm90 import fp4_rules
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.layouts.alignment import align
from cute_moe.testing import calc_diff

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
N, K = 320, 352  # N ends mid 128-tile; K = 11 MXFP4 blocks: not a multiple of 64 or 128
MX = 32
THRESHOLD = 1e-5
FOLD_EXACT_SPREAD = (-2, 3)  # per-32-block magnitudes 2^-2..2^3: exponent gaps <= 8 inside a 128-K block
WIDE_SPREAD = (-14, 14)


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32)


def poisoned(*shape, dtype=bf16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def mx_weights(*shape, spread=(-4, 4)):
    """Random [.., N, K] weights, each 32-block scaled by its own power of two, quantized to MXFP4.

    Returns (packed int8, kernel-layout UE8M0 exponents, plain exponents uint8, dequantized float32)."""
    *lead, n, k = shape
    w = randn(*shape).view(*lead, n, k // MX, MX)
    w = (w * torch.exp2(torch.randint(*spread, (*lead, n, k // MX, 1), device="cuda").float())).view(shape)
    packed, sf = cute_moe.per_token_cast_to_fp4(w)
    exponents = cute_moe.float_to_ue8m0(sf)
    groups = lead[0] if lead else None
    sfb = cute_moe.transform_sf_into_required_layout(exponents, n, k, (1, MX), groups)
    return packed, sfb, exponents, cute_moe.per_token_dequant_fp4(packed, sf)


def folded_fp8_weights(packed, exponents):
    """The FP8 x FP4 kernel's weights, emulated: per 128-K block and row, e_max = the largest exponent,
    E4M3(value * 2^(e - e_max)) * 2^(e_max - 127) (torch rounds to nearest even, as cvt.rn does)."""
    *lead, n, blocks = exponents.shape
    values = cute_moe.per_token_dequant_fp4(packed, torch.ones(*lead, n, blocks, device="cuda"))
    e = exponents.int()
    padded = torch.nn.functional.pad(e, (0, (-blocks) % 4))
    e_max = padded.view(*lead, n, -1, 4).amax(-1).repeat_interleave(4, dim=-1)[..., :blocks]
    rel = torch.exp2((e - e_max).float()).repeat_interleave(MX, dim=-1)
    widened = (values * rel).to(torch.float8_e4m3fn).float()
    return widened * torch.exp2((e_max - 127).float()).repeat_interleave(MX, dim=-1)


def fp8_activations(x):
    """Per-token 1x128 FP8 cast of [.., M, K]: ((e4m3, sfa), dequantized float32)."""
    q, sf = cute_moe.per_token_cast_to_fp8(x)
    return (q, sf), cute_moe.per_token_dequant(q, sf)


def reference(a, w):
    return (a.double() @ w.double().transpose(-1, -2)).float()


def assert_rows(out, ref, what=""):
    assert not out.isnan().any(), f"{what}: unwritten (NaN) elements where the kernel must write"
    diff = calc_diff(out, ref)
    assert diff <= THRESHOLD, f"{what}: calc_diff {diff:.3g} > {THRESHOLD}"


def masked_counts(g, max_m):
    counts = torch.randint(0, max_m + 1, (g,), dtype=torch.int32)
    counts[0], counts[-1] = 0, max_m
    return counts


def check_masked(d, ref, counts):
    for i, rows in enumerate(counts.tolist()):
        if rows:
            assert_rows(d[i, :rows], ref[i, :rows], f"group {i}")
        assert d[i, rows:].isnan().all(), f"group {i}: rows >= masked_m were written"


def run_masked(pair, x, weights, d, counts, expected_m):
    """Launch the pair's masked op on float32 activations ``x``; returns the activations the reference
    multiplies (BF16 values, or the FP8 cast's dequantization)."""
    if pair == "bf16xfp4":
        a = x.to(bf16)
        cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, weights, d, counts, expected_m)
        return a.float()
    a8, a = fp8_activations(x)
    cute_moe.m_grouped_fp8_fp4_gemm_nt_masked(a8, weights, d, counts, expected_m)
    return a


def check_masked_op(pair, counts, max_m, k=K, out_dtype=torch.float32, expected_m=16, n=N):
    """Launch the pair's masked op (rules, or the forced config) on G = len(counts) groups of ``max_m``
    rows with weights in the FP8 exact-fold range (checked), and check the rows below masked_m against
    the reference and the rows past it still NaN."""
    g = len(counts)
    x = randn(g, max_m, k)
    packed, sfb, exponents, w = mx_weights(g, n, k, spread=FOLD_EXACT_SPREAD)
    if pair == "fp8xfp4":
        assert torch.equal(folded_fp8_weights(packed, exponents), w), "the fold is exact in this exponent range"
    d = poisoned(g, max_m, n, dtype=out_dtype)
    a = run_masked(pair, x, (packed, sfb), d, counts.cuda(), expected_m)
    check_masked(d, reference(a, w), counts)


# Both kernels: None = the rules (masked, contiguous, psum: the swap-AB kernel when
# on, the default; the widen-in-shared-memory one with CUTE_MOE_FP4_SWAP_AB=0), and the latter forced.
BOTH_KERNELS = pytest.mark.parametrize("config", [None, KernelConfig(tile_m=64, tile_n=128)],
                                       ids=["rules", "shared-widen"])


def maybe_forced(config):
    return contextlib.nullcontext() if config is None else force_config(config)


# ------------------------------------------------------------------ BF16 x FP4
@pytest.mark.parametrize("max_m,expected_m", [(8, 8), (64, 16), (200, 128)])
@pytest.mark.parametrize("pair,out_dtype", [("bf16xfp4", bf16), ("bf16xfp4", torch.float32),
                                            ("fp8xfp4", torch.float32)])
def test_fp4_masked(pair, out_dtype, max_m, expected_m):
    """Through the rules: odd G, an empty first group and a full last one, the other counts random."""
    check_masked_op(pair, masked_counts(5, max_m), max_m, out_dtype=out_dtype, expected_m=expected_m)


def contiguous_problem(g, counts):
    """Aligned expert segments, then one aligned segment of rows whose id is g (outside [0, g)) and
    one of padding rows (-1): a kernel must leave both untouched (psum: rows past the last end).
    Returns (total rows, segment starts, grouped_layout, psum ends, first row past the experts)."""
    alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
    starts, start = [], 0
    for cnt in counts:
        starts.append(start)
        start += align(cnt, alignment)
    experts_end = start
    total = experts_end + 2 * alignment
    layout = torch.full((total,), -1, dtype=torch.int32)
    for e, (s, cnt) in enumerate(zip(starts, counts)):
        layout[s:s + cnt] = e
    layout[experts_end:experts_end + alignment] = g
    ends = torch.tensor([s + cnt for s, cnt in zip(starts, counts)], dtype=torch.int32)
    return total, starts, layout, ends, experts_end


def check_contiguous_untouched(d, starts, counts, experts_end, use_psum_layout):
    """Rows past the experts (bad ids, -1 padding, past the last psum end) stay NaN. Padding rows
    inside an expert's last tile are unspecified with grouped_layout (the tile takes its expert from
    its first row and writes all its rows, as DeepGEMM) and unwritten with psum."""
    assert d[experts_end:].isnan().all(), "rows of tiles with an expert id outside [0, G) were written"
    if use_psum_layout:
        for e, (s, cnt) in enumerate(zip(starts, counts)):
            assert d[s + cnt:align(s + cnt, 128)].isnan().all(), f"expert {e}: psum padding rows were written"


def check_contiguous_op(pair, counts, use_psum_layout, k=K):
    """Launch the pair's contiguous op (rules, or the forced config) on aligned expert segments of
    ``counts`` rows (``contiguous_problem``) and check every expert's rows and the rows left alone."""
    total, starts, layout, ends, experts_end = contiguous_problem(len(counts), counts)
    x = randn(total, k)
    packed, sfb, _, w = mx_weights(len(counts), N, k, spread=FOLD_EXACT_SPREAD if pair == "fp8xfp4" else (-4, 4))
    d = poisoned(total, N)
    groups = (ends if use_psum_layout else layout).cuda()
    if pair == "bf16xfp4":
        a = x.to(bf16)
        cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a, (packed, sfb), d, groups, use_psum_layout=use_psum_layout)
        a = a.float()
    else:
        a8, a = fp8_activations(x)
        cute_moe.m_grouped_fp8_fp4_gemm_nt_contiguous(a8, (packed, sfb), d, groups, use_psum_layout=use_psum_layout)
    for e, (s, cnt) in enumerate(zip(starts, counts)):
        if cnt:
            assert_rows(d[s:s + cnt], reference(a[s:s + cnt], w[e]), f"expert {e}")
    check_contiguous_untouched(d, starts, counts, experts_end, use_psum_layout)


def contiguous_counts(g):
    """Random segment sizes of G experts, one empty and one of exactly one alignment."""
    counts = torch.randint(1, 400, (g,)).tolist()
    counts[1], counts[-2] = 0, cute_moe.get_mk_alignment_for_contiguous_layout()
    return counts


@BOTH_KERNELS
@pytest.mark.parametrize("use_psum_layout", [False, True])
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_fp4_contiguous(pair, use_psum_layout, config):
    with maybe_forced(config):
        check_contiguous_op(pair, contiguous_counts(7 if pair == "bf16xfp4" else 5), use_psum_layout)


@BOTH_KERNELS
def test_bf16_fp4_extreme_block_exponents_are_exact(config):
    """Exponents from 2^-40 to 2^40 in one row: BF16 keeps FP32's range, so the widening stays exact."""
    g, max_m = 3, 16
    a = randn(g, max_m, K).to(bf16)
    packed, sfb, _, w = mx_weights(g, N, K, spread=(-40, 40))
    counts = torch.tensor([16, 5, 9], dtype=torch.int32)
    d = poisoned(g, max_m, N, dtype=torch.float32)
    with maybe_forced(config):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, (packed, sfb), d, counts.cuda(), 16)
    check_masked(d, reference(a.float(), w), counts)


@BOTH_KERNELS
@pytest.mark.parametrize("exponents,max_magnitude,a_scale", [
    ((0, 1, 2, 3, 4), 7, 2.0 ** 120),  # 0 and 1: subnormal BF16 weights (the exact FP32 path)
    ((250, 251, 252, 253, 254), 3, 2.0 ** -120),  # 253, 254: past the byte-permute path's range
])
def test_bf16_fp4_edge_exponents_take_the_exact_path(exponents, max_magnitude, a_scale, config):
    """UE8M0 exponents at both ends of the range, mixed with fast-path ones in every row (the kernel
    widens them on its exact FP32 path); codes up to ``max_magnitude`` keep the weights finite."""
    g, max_m = 3, 16
    a = (randn(g, max_m, K) * a_scale).to(bf16)
    codes = torch.randint(0, max_magnitude + 1, (g, N, K), device="cuda", dtype=torch.uint8)
    codes |= torch.randint(0, 2, codes.shape, device="cuda", dtype=torch.uint8) << 3  # signs
    packed = cute_moe.pack_e2m1(codes)
    choice = torch.tensor(exponents, dtype=torch.uint8, device="cuda")
    plain = choice[torch.randint(0, len(exponents), (g, N, K // MX), device="cuda")]
    w = cute_moe.per_token_dequant_fp4(packed, cute_moe.ue8m0_to_float(plain))
    assert w.isfinite().all()
    sfb = cute_moe.transform_sf_into_required_layout(plain, N, K, (1, MX), g)
    counts = torch.tensor([16, 7, 11], dtype=torch.int32)
    d = poisoned(g, max_m, N, dtype=torch.float32)
    with maybe_forced(config):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, (packed, sfb), d, counts.cuda(), 16)
    check_masked(d, reference(a.float(), w), counts)


# ------------------------------------------------------------------ FP8 x FP4
@pytest.mark.parametrize("config,k", [(None, K), (KernelConfig(tile_m=32, tile_n=128, swap_ab=1), 2880)],
                         ids=["rules", "swap-ab-forced"])
def test_fp8_fp4_wide_exponent_spread_follows_the_documented_rounding(config, k):
    g, max_m = 3, 32
    x = randn(g, max_m, k)
    packed, sfb, exponents, w = mx_weights(g, N, k, spread=WIDE_SPREAD)
    folded = folded_fp8_weights(packed, exponents)
    assert not torch.equal(folded, w), "the spread must be wide enough to exercise the rounding"
    # The documented bound: |folded - w| <= 2^-10 * 2^(e_max - 127) per weight (half E4M3's smallest step).
    e = exponents.int()
    e_max = torch.nn.functional.pad(e, (0, (-e.shape[-1]) % 4)).view(g, N, -1, 4).amax(-1)
    bound = torch.exp2((e_max - 127 - 10).float()).repeat_interleave(128, dim=-1)[..., :k]
    assert ((folded - w).abs() <= bound).all()
    counts = torch.tensor([32, 7, 19], dtype=torch.int32)
    d = poisoned(g, max_m, N, dtype=torch.float32)
    with maybe_forced(config):
        a = run_masked("fp8xfp4", x, (packed, sfb), d, counts.cuda(), 32)
    check_masked(d, reference(a, folded), counts)
    check_masked(d, reference(a, w), counts)  # and still within the threshold of the dequantized operands


def test_fp8_fp4_dense_with_c():
    m = 77
    (a_q, sfa), a = fp8_activations(randn(m, K))
    packed, sfb, _, w = mx_weights(N, K, spread=FOLD_EXACT_SPREAD)
    c = randn(m, N)
    d = poisoned(m, N, dtype=torch.float32)
    cute_moe.fp8_fp4_gemm_nt((a_q, sfa), (packed, sfb), d, c=c, recipe_a=(1, 128), recipe_b=(1, 32))
    assert_rows(d, c + reference(a, w), "dense")


@pytest.mark.parametrize("tile_m,tile_n", [(64, 128), (64, 64), (128, 128)])
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_masked_every_tile_shape(pair, tile_m, tile_n):
    """The rules pick 128-row tiles; 64-row tiles (one consumer warpgroup widens alone) and both N tiles
    are forced here."""
    with force_config(KernelConfig(tile_m=tile_m, tile_n=tile_n)):
        check_masked_op(pair, torch.tensor([24, 0, 13], dtype=torch.int32), 24)


# ------------------------------------------------------------------ CUDA graphs
@BOTH_KERNELS
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_masked_cuda_graph_replays_follow_masked_m(pair, config):
    g, max_m = 3, 64
    x = randn(g, max_m, K)
    packed, sfb, _, w = mx_weights(g, N, K, spread=FOLD_EXACT_SPREAD)
    if pair == "bf16xfp4":
        a_arg = x.to(bf16)
        a_ref = a_arg.float()

        def op(out, counts):
            cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a_arg, (packed, sfb), out, counts, 16)
    else:
        (a_q, sfa), a_ref = fp8_activations(x)
        sfa = cute_moe.get_mn_major_tma_aligned_tensor(sfa)  # captured tensors must not be re-laid out per call

        def op(out, counts):
            cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a_q, sfa), (packed, sfb), out, counts, 16)
    masked_m = torch.tensor([5, 0, 64], dtype=torch.int32, device="cuda")
    d = poisoned(g, max_m, N, dtype=torch.float32)
    with maybe_forced(config):
        op(d, masked_m)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            op(d, masked_m)
    ref = reference(a_ref, w)
    for new_counts in ([64, 1, 0], [0, 33, 17], [8, 8, 8]):
        masked_m.copy_(torch.tensor(new_counts, dtype=torch.int32))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_masked(d, ref, torch.tensor(new_counts))


# ------------------------------------------------------------------ bad inputs
def _masked_args():
    g, max_m = 2, 16
    a = randn(g, max_m, K).to(bf16)
    packed, sfb, _, _ = mx_weights(g, N, K)
    return a, packed, sfb, poisoned(g, max_m, N), torch.tensor([3, 4], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a, p, s: (a, p[:, :, :-16].contiguous(), s), ValueError, r"^a: expected K=320"),
    (lambda a, p, s: (a[..., :-8].contiguous(), p[..., :-4].contiguous(), s), ValueError, r"^b: expected packed K/2"),
    (lambda a, p, s: (a, p.float(), s), TypeError, r"^b: expected dtype int8 or uint8"),
    (lambda a, p, s: (a, p[:1], s), ValueError, r"^b: expected shape"),
    (lambda a, p, s: (a, p, s[..., :-1]), ValueError, r"^sfb: expected shape \(2, 320, 11\)"),
    (lambda a, p, s: (a, p, s.float()), TypeError, r"^sfb: expected dtype uint8 .*float_to_ue8m0"),
    (lambda a, p, s: (a, p, s.to(torch.int32)), TypeError, r"^sfb: expected dtype uint8"),
    (lambda a, p, s: (a, p, s[0]), ValueError, r"^sfb: expected 3 dimensions"),
    (lambda a, p, s: (a, p, s.cpu()), ValueError, r"^sfb: expected device cuda"),
    (lambda a, p, s: (a.float(), p, s), TypeError, r"^a: expected dtype bfloat16"),
    (lambda a, p, s: (a, p.transpose(1, 2), s), ValueError, r"^b: "),
])
def test_bad_inputs_are_refused_naming_the_argument(mutate, error, match):
    a, packed, sfb, d, masked_m = _masked_args()
    a, packed, sfb = mutate(a, packed, sfb)
    with pytest.raises(error, match=match):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, (packed, sfb), d, masked_m, 16)
    assert d.isnan().all(), "nothing may be written when the call is refused"


def test_fp8_fp4_bad_scales_and_recipes_are_refused():
    g, max_m = 2, 16
    (a_q, sfa), _ = fp8_activations(randn(g, max_m, K))
    packed, sfb, _, _ = mx_weights(g, N, K)
    d, masked_m = poisoned(g, max_m, N), torch.tensor([1, 2], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"^sfa: expected shape"):
        cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a_q, sfa[..., :1]), (packed, sfb), d, masked_m, 16)
    with pytest.raises(ValueError, match=r"^recipe: .*per-32 activation scales"):
        cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a_q, sfa), (packed, sfb), d, masked_m, 16, recipe=(1, 1, 32))
    with pytest.raises(ValueError, match=r"^recipe_b: expected None or \(1, 32\)"):
        cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a_q, sfa), (packed, sfb), d, masked_m, 16, recipe_b=(1, 128))
    with pytest.raises(TypeError, match=r"^b: expected a \(tensor, scale_factors\) pair"):
        cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a_q, sfa), packed, d, masked_m, 16)
    assert d.isnan().all()


def test_unaligned_exponent_rows_are_re_laid_out():
    """sfb rows of 11 bytes (not 16-byte strides) are copied into the kernel's layout, same result."""
    g, max_m = 2, 8
    a = randn(g, max_m, K).to(bf16)
    packed, _, exponents, w = mx_weights(g, N, K)
    counts = torch.tensor([8, 3], dtype=torch.int32)
    d = poisoned(g, max_m, N, dtype=torch.float32)
    assert exponents.stride(-2) % 16 != 0
    cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, (packed, exponents), d, counts.cuda(), 8)
    check_masked(d, reference(a.float(), w), counts)


# ------------------------------------------------------------------ swap-AB kernel (weights: register-sourced A)
SWAP_K = 2880  # gpt-oss: 90 MXFP4 blocks, not a multiple of 128 (FP8: 23 k-blocks, the last half full)
# (tokens, weight rows) per tile: one to four consumer warpgroups (64 weight rows each); with N = 320 a
# 192-row tile ends inside its third warpgroup and a 256-row tile leaves three warpgroups past N.
SWAP_TILES = [(8, 64), (16, 128), (32, 64), (64, 128), (128, 128), (8, 256), (16, 192), (16, 256), (32, 192),
              (64, 192)]


def swap_config(token_tile, tile_n):
    return KernelConfig(tile_m=token_tile, tile_n=tile_n, swap_ab=1)


def test_rules_route_to_the_swap_ab_kernel_as_the_switch_says():
    """By default the tests marked BOTH_KERNELS "rules" run the swap-AB kernel, with
    CUTE_MOE_FP4_SWAP_AB=0 the other one (tests/test_fp4_ops.py pins the rule itself)."""
    from cute_moe.dispatch import choose_config
    from cute_moe.operands import PRECISIONS

    for pair in ("bf16xfp4", "fp8xfp4"):
        a, b = PRECISIONS[pair]
        for m in (1, 16, 64):
            config = choose_config("masked", N, SWAP_K, 5, m, 0, a=a, b=b)
            assert config.swap_ab == int(fp4_rules.swap_ab_enabled())


def swap_rule_config(monkeypatch, kind, pair, g, expected_m, alignment=0):
    """The config the "swap-AB" rule picks for this problem (whatever the switch says in this process)."""
    from cute_moe.dispatch import problem_of
    from cute_moe.operands import PRECISIONS

    monkeypatch.setenv(fp4_rules.SWAP_AB_ENV, "1")
    a, b = PRECISIONS[pair]
    config = fp4_rules.rule_config(problem_of(kind, N, SWAP_K, g, expected_m, alignment, a=a, b=b))
    assert config.swap_ab == 1
    return config


@pytest.mark.parametrize("expected_m", [1, 8, 16, 40, 64])
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_swap_ab_masked_decode(pair, expected_m, monkeypatch):
    """Decode with the swap-AB rule's tiles (token tile 16 / 64): odd G with an empty first expert,
    K = 2880, N = 320 (ends mid 128-row tile), masked_m up to twice expected_m (several token tiles)."""
    g, max_m = 5, 2 * expected_m
    with force_config(swap_rule_config(monkeypatch, "masked", pair, g, expected_m)):
        check_masked_op(pair, masked_counts(g, max_m), max_m, SWAP_K, expected_m=expected_m)


@pytest.mark.parametrize("use_psum_layout", [False, True])
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_swap_ab_contiguous_rule_tiles(pair, use_psum_layout, monkeypatch):
    """Contiguous / psum with the swap-AB rule's tiles (128 tokens x 128 weight rows, two consumer
    warpgroups), K = 2880; empty and full-alignment experts, bad-id and padding rows left NaN."""
    kind = "psum" if use_psum_layout else "contiguous"
    alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
    with force_config(swap_rule_config(monkeypatch, kind, pair, 5, 0, alignment)):
        check_contiguous_op(pair, contiguous_counts(5), use_psum_layout, SWAP_K)


@pytest.mark.parametrize("token_tile,tile_n", SWAP_TILES)
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_swap_ab_masked_every_tile(pair, token_tile, tile_n):
    """Every token tile and weight-row tile, forced; bf16 output; groups of 0, 1, a full tile + 3 rows
    and Mmax rows."""
    max_m = 2 * token_tile + 5
    counts = torch.tensor([0, 1, token_tile + 3, max_m], dtype=torch.int32)
    with force_config(swap_config(token_tile, tile_n)):
        check_masked_op(pair, counts, max_m, SWAP_K, out_dtype=bf16, expected_m=token_tile)


@pytest.mark.parametrize("token_tile,tile_n", [(32, 256), (64, 256), (128, 192)])
def test_swap_ab_bf16_wide_tiles(token_tile, tile_n):
    """BF16 x FP4 only (no FP8 block accumulator): four consumer warpgroups up to 64 tokens, three at
    128 tokens (the contiguous rule's tile); groups of 0, 1, a full tile + 3 rows and Mmax rows."""
    max_m = 2 * token_tile + 5
    counts = torch.tensor([0, 1, token_tile + 3, max_m], dtype=torch.int32)
    with force_config(swap_config(token_tile, tile_n)):
        check_masked_op("bf16xfp4", counts, max_m, SWAP_K, out_dtype=bf16, expected_m=token_tile)


@pytest.mark.parametrize("k", [32, 96, 160, 4096])
@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_swap_ab_masked_k_block_counts(pair, k):
    """K = 32 (one partial k-block), 96 (one k-block), 160 (two, the last partial), 4096 (32: an even
    count of middle k-blocks), against K = 2880 elsewhere (23: odd):
    the peeled first / last k-blocks and the pair loop of every parity."""
    with force_config(swap_config(16, 64)):
        check_masked_op(pair, torch.tensor([16, 0, 9], dtype=torch.int32), 16, k)


@pytest.mark.parametrize("pair", ["bf16xfp4", "fp8xfp4"])
def test_swap_ab_masked_decode_at_the_gpt_oss_shape(pair, monkeypatch):
    """gpt-oss-120b gate_up at EP 8 (16 experts, N = 5760, K = 2880), expected_m 16: the rule's tile
    (16 tokens x 256 weight rows: four consumer warpgroups, the benchmark's launch), random masked_m
    up to 16 with an empty and a full expert."""
    g, n, max_m = 16, 5760, 16
    from cute_moe.dispatch import problem_of
    from cute_moe.operands import PRECISIONS

    monkeypatch.setenv(fp4_rules.SWAP_AB_ENV, "1")
    a, b = PRECISIONS[pair]
    config = fp4_rules.rule_config(problem_of("masked", n, SWAP_K, g, max_m, 0, a=a, b=b, num_sms=132))
    assert (config.swap_ab, config.tile_m, config.tile_n) == (1, 16, 256)
    with force_config(config):
        check_masked_op(pair, masked_counts(g, max_m), max_m, SWAP_K, out_dtype=bf16, expected_m=max_m, n=n)


def test_swap_ab_fp8_dense():
    m = 77
    (a_q, sfa), a = fp8_activations(randn(m, SWAP_K))
    packed, sfb, _, w = mx_weights(N, SWAP_K, spread=FOLD_EXACT_SPREAD)
    d = poisoned(m, N, dtype=torch.float32)
    with force_config(swap_config(32, 64)):
        cute_moe.fp8_fp4_gemm_nt((a_q, sfa), (packed, sfb), d)
    assert_rows(d, reference(a, w), "dense")
