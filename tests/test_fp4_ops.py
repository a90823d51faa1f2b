"""FP4-weight ops and dispatch on the CPU: argument checks (errors name the argument), recipes, the
FP4 family's rules, the tools' --dtype names. Launches are GPU tests (tests/test_gpu_fp4.py)."""

import pytest
import torch

import cute_moe
from cute_moe.dispatch import problem_of
from cute_moe.kernels.sm90 import fp4_rules
from cute_moe.kernels.sm90.config import Sm90Config
from cute_moe.models import FP4_WEIGHT_MODELS, PRESETS
from cute_moe.operands import PRECISIONS

N, K, G, MMAX = 256, 320, 3, 16
bf16 = torch.bfloat16


def weights(g=G, n=N, k=K):
    packed, sf = cute_moe.per_token_cast_to_fp4(torch.randn(g, n, k))
    sfb = cute_moe.transform_sf_into_required_layout(cute_moe.float_to_ue8m0(sf), n, k, (1, 32), g)
    return packed, sfb


def masked_call(a=None, b=None, d=None, masked_m=None, expected_m=8):
    a = torch.randn(G, MMAX, K).to(bf16) if a is None else a
    b = weights() if b is None else b
    d = torch.empty(G, MMAX, N, dtype=bf16) if d is None else d
    masked_m = torch.zeros(G, dtype=torch.int32) if masked_m is None else masked_m
    cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, b, d, masked_m, expected_m)


def test_valid_cpu_arguments_reach_the_placement_check():
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        masked_call()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(b=(weights()[0][..., :-16].contiguous(), weights()[1])), ValueError, r"^a: expected K=288"),
    (dict(b=(weights()[0][..., :-4].contiguous(), weights()[1])), ValueError, r"^b: expected packed K/2 .*K=312"),
    (dict(b=(weights()[0].float(), weights()[1])), TypeError, r"^b: expected dtype int8 or uint8, got float32"),
    (dict(b=(weights()[0].transpose(1, 2), weights()[1])), ValueError, r"^b: expected a contiguous"),
    (dict(b=weights()[0]), TypeError, r"^b: expected a \(tensor, scale_factors\) pair"),
    (dict(b=(weights()[0], weights()[1][..., :-1])), ValueError, r"^sfb: expected shape \(3, 256, 10\)"),
    (dict(b=(weights()[0], weights()[1][:, :-8])), ValueError, r"^sfb: expected shape"),
    (dict(b=(weights()[0], weights()[1].float())), TypeError, r"^sfb: expected dtype uint8 .*float_to_ue8m0"),
    (dict(b=(weights()[0], weights()[1].to(torch.int32))), TypeError, r"^sfb: expected dtype uint8, got int32"),
    (dict(b=(weights()[0], weights()[1][0])), ValueError, r"^sfb: expected 3 dimensions"),
    (dict(b=weights(g=2)), ValueError, r"^b: expected shape \(3, 256, 160\)"),
    (dict(a=torch.randn(G, MMAX, K)), TypeError, r"^a: expected dtype bfloat16"),
    (dict(d=torch.empty(G, MMAX, N + 8, dtype=bf16)), ValueError, r"^d: expected shape"),
    (dict(d=torch.empty(G, MMAX, N, dtype=torch.float16)), TypeError, r"^d: expected dtype"),
    (dict(masked_m=torch.zeros(G, dtype=torch.int64)), TypeError, r"^masked_m: expected dtype int32"),
    (dict(masked_m=torch.zeros(G + 1, dtype=torch.int32)), ValueError, r"^masked_m: expected shape"),
    (dict(expected_m=1.5), TypeError, r"^expected_m: expected int"),
])
def test_masked_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        masked_call(**kwargs)


def test_contiguous_and_dense_checks():
    packed, sfb = weights()
    a, d = torch.randn(256, K).to(bf16), torch.empty(256, N, dtype=bf16)
    with pytest.raises(ValueError, match=r"^grouped_layout: expected shape \(3,\)"):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a, (packed, sfb), d, torch.zeros(256, dtype=torch.int32),
                                                       use_psum_layout=True)
    with pytest.raises(TypeError, match=r"^use_psum_layout: expected bool"):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a, (packed, sfb), d, torch.zeros(256, dtype=torch.int32),
                                                       use_psum_layout=1)
    with pytest.raises(ValueError, match=r"^a: expected the row count .* multiple of 128"):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a[:200], (packed, sfb), d[:200],
                                                       torch.zeros(200, dtype=torch.int32))
    a8, sfa = cute_moe.per_token_cast_to_fp8(torch.randn(64, K))
    with pytest.raises(ValueError, match=r"^sfa: expected shape \(64, 3\)"):
        cute_moe.fp8_fp4_gemm_nt((a8, sfa[:, :2]), (packed[0], sfb[0]), torch.empty(64, N, dtype=bf16))
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.fp8_fp4_gemm_nt((a8, sfa), (packed[0], sfb[0]), torch.empty(64, N, dtype=bf16))


@pytest.mark.parametrize("recipes,match", [
    (dict(recipe=(1, 1, 32)), r"^recipe: .*per-32 activation scales are not implemented"),
    (dict(recipe=(1, 128, 128)), r"^recipe: "),
    (dict(recipe_a=(1, 32)), r"^recipe_a: expected None or \(1, 128\)"),
    (dict(recipe_b=(128, 128)), r"^recipe_b: expected None or \(1, 32\)"),
])
def test_unsupported_recipes_are_refused(recipes, match):
    a8, sfa = cute_moe.per_token_cast_to_fp8(torch.randn(G, MMAX, K))
    with pytest.raises(ValueError, match=match):
        cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a8, sfa), weights(), torch.empty(G, MMAX, N, dtype=bf16),
                                                  torch.zeros(G, dtype=torch.int32), 8, **recipes)


def test_supported_recipes_pass_to_the_argument_checks():
    a8, sfa = cute_moe.per_token_cast_to_fp8(torch.randn(G, MMAX, K))
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.m_grouped_fp8_fp4_gemm_nt_masked((a8, sfa), weights(), torch.empty(G, MMAX, N, dtype=bf16),
                                                  torch.zeros(G, dtype=torch.int32), 8, recipe_a=(1, 128),
                                                  recipe_b=(1, 32))


def _problem(kind="masked", pair="bf16xfp4", n=2880, k=2880, groups=16, m=8, alignment=0):
    a, b = PRECISIONS[pair]
    return problem_of(kind, n, k, groups, m, alignment, a=a, b=b, arch="sm_90a", num_sms=132)


def test_the_switch_keeps_the_swap_ab_kernel_out_of_the_rules(monkeypatch):
    monkeypatch.delenv(fp4_rules.SWAP_AB_ENV, raising=False)
    assert fp4_rules.rule_config(_problem(m=8)).swap_ab == 1  # on by default
    monkeypatch.setenv(fp4_rules.SWAP_AB_ENV, "0")
    for p in (_problem(m=8), _problem("contiguous", "fp8xfp4", m=0, alignment=128), _problem(m=4096)):
        assert fp4_rules.rule_config(p).swap_ab == 0
    assert not any(c.swap_ab for c in fp4_rules.candidate_configs(_problem()))
    decode = fp4_rules.rule_config(_problem(m=8))
    assert (decode.tile_m, decode.tile_n) == (64, 128)  # the widen-in-shared-memory kernel's decode tile
    fp4_rules.can_implement(_problem(m=8), Sm90Config(tile_m=16, tile_n=128, swap_ab=1))  # forcing still works


def test_rules_pick_decode_and_prefill_tiles(monkeypatch):
    monkeypatch.setenv(fp4_rules.SWAP_AB_ENV, "1")
    # Masked decode (expected_m <= 64): the swap-AB kernel, token tile = expected_m's bucket (>= 16),
    # as many weight rows per CTA (consumer warpgroups) as the token tile's registers allow when the
    # SMs stay busy.
    for m, token_tile in ((1, 16), (8, 16), (16, 16), (17, 32), (33, 64), (64, 64)):
        for pair in ("bf16xfp4", "fp8xfp4"):
            decode = fp4_rules.rule_config(_problem(pair=pair, m=m))
            assert (decode.swap_ab, decode.tile_m, decode.cluster_size) == (1, token_tile, 1)
            assert 128 < decode.tile_n <= fp4_rules.swap_max_tile_n(_problem(pair=pair), token_tile)
    # gpt-oss gate_up at EP 8 (16 experts, N = 5760): four consumer warpgroups at 16 tokens per tile.
    assert fp4_rules.rule_config(_problem(m=16, n=5760)).tile_n == 256
    assert fp4_rules.rule_config(_problem(m=8, n=256, groups=2)).tile_n == 64  # too few tiles for 132 SMs
    for m in (65, 4096, 0):  # larger and unknown hints: 128-token tiles
        masked_prefill = fp4_rules.rule_config(_problem(m=m))
        assert (masked_prefill.swap_ab, masked_prefill.tile_m) == (1, 128)
    # Contiguous / psum: the swap-AB kernel with the largest token tile that divides the alignment and
    # at most three consumer warpgroups (FP8 at 128 tokens: two, its registers hold a block accumulator).
    for kind, alignment, token_tile in (("contiguous", 128, 128), ("contiguous", 64, 64), ("psum", 256, 128),
                                        ("psum", 64, 64)):
        for pair in ("fp8xfp4", "bf16xfp4"):
            prefill = fp4_rules.rule_config(_problem(kind, pair, m=0, alignment=alignment))
            assert (prefill.swap_ab, prefill.tile_m) == (1, token_tile)
            assert prefill.tile_n == min(192, fp4_rules.swap_max_tile_n(_problem(pair=pair), token_tile))
    assert fp4_rules.rule_config(_problem("contiguous", "fp8xfp4", m=0, alignment=128)).tile_n == 128
    assert fp4_rules.rule_config(_problem("contiguous", "bf16xfp4", m=0, alignment=128)).tile_n == 192
    assert fp4_rules.rule_config(_problem("psum", m=0, alignment=32)).tile_m == 32
    assert fp4_rules.rule_config(_problem("psum", m=0, alignment=12)).swap_ab == 0  # the other kernel
    dense = fp4_rules.rule_config(_problem("dense", m=77, groups=1))
    assert (dense.swap_ab, dense.tile_m) == (0, 128)
    for p in (_problem(m=8), _problem("psum", "fp8xfp4", m=0, alignment=128), _problem("psum", m=0, alignment=32)):
        fp4_rules.can_implement(p, fp4_rules.rule_config(p))


def test_rules_refuse_what_the_kernel_cannot_do(monkeypatch):
    monkeypatch.setenv(fp4_rules.SWAP_AB_ENV, "1")
    with pytest.raises(ValueError, match="kind"):
        fp4_rules.check_spec(_problem("ragged"))
    with pytest.raises(ValueError, match="multiple of 32"):
        fp4_rules.check_spec(_problem(k=2888))
    with pytest.raises(ValueError, match="tile_m to divide"):
        fp4_rules.can_implement(_problem("contiguous", m=0, alignment=64), Sm90Config(tile_m=128, tile_n=128))
    candidates = fp4_rules.candidate_configs(_problem())
    assert all(c.cluster_size == 1 for c in candidates)
    assert all(c.tile_n <= (fp4_rules.swap_max_tile_n(_problem(), c.tile_m) if c.swap_ab else 128) for c in candidates)
    assert {c.tile_n for c in candidates if c.swap_ab} == {64, 128, 192, 256}
    with pytest.raises(ValueError, match="registers"):
        fp4_rules.can_implement(_problem(pair="fp8xfp4"), Sm90Config(tile_m=32, tile_n=256, swap_ab=1))
    with pytest.raises(ValueError, match="registers"):
        fp4_rules.can_implement(_problem(pair="bf16xfp4"), Sm90Config(tile_m=128, tile_n=256, swap_ab=1))
    fp4_rules.can_implement(_problem(pair="bf16xfp4"), Sm90Config(tile_m=32, tile_n=256, swap_ab=1))
    with pytest.raises(ValueError, match="tile_n"):
        fp4_rules.can_implement(_problem(), Sm90Config(tile_m=64, tile_n=256))
    assert any(c.swap_ab for c in fp4_rules.candidate_configs(_problem()))
    with_c = problem_of("dense", 2880, 2880, 1, 64, 0, a=PRECISIONS["bf16xfp4"][0], b=PRECISIONS["bf16xfp4"][1],
                        arch="sm_90a", num_sms=132, has_c=True)
    with pytest.raises(ValueError, match="does not add C"):
        fp4_rules.can_implement(with_c, Sm90Config(tile_m=16, tile_n=128, swap_ab=1))
    assert not any(c.swap_ab for c in fp4_rules.candidate_configs(with_c))
    with pytest.raises(ValueError, match="tile_m to divide"):
        fp4_rules.can_implement(_problem("psum", m=0, alignment=64), Sm90Config(tile_m=128, tile_n=128, swap_ab=1))


def test_swap_ab_configs_are_refused_for_other_weights():
    from cute_moe.arch import get_backend

    p = problem_of("masked", 2880, 2880, 16, 8, 0, arch="sm_90a", num_sms=132)  # BF16 x BF16
    with pytest.raises(ValueError, match="swap_ab=1 selects the FP4-weight"):
        get_backend("sm_90a").can_implement(p, Sm90Config(tile_m=64, tile_n=128, swap_ab=1))


def test_swap_ab_config_takes_token_tiles():
    assert Sm90Config(tile_m=8, tile_n=64, swap_ab=1).key() != Sm90Config(tile_m=64, tile_n=64).key()
    with pytest.raises(ValueError, match="tile_m"):
        Sm90Config(tile_m=16, tile_n=128)  # token tiles below 64 exist only for the swap-AB kernel
    with pytest.raises(ValueError, match="swap_ab"):
        Sm90Config(tile_m=64, tile_n=128, swap_ab=2)


def test_tools_and_presets_know_the_fp4_precisions():
    from cute_moe.tools.precompile import PRECISIONS as TOOL_PRECISIONS

    assert {"fp8xfp4", "bf16xfp4"} <= set(TOOL_PRECISIONS)
    assert set(FP4_WEIGHT_MODELS) <= set(PRESETS)


@pytest.mark.parametrize("tool,argv,message", [
    ("bench_fp4", ["--ep", "3"], "--ep: expected a divisor of gpt-oss-120b's 128 experts"),
    ("bench_fp4", ["--models", "nope"], "unknown model 'nope'"),
    ("bench_fp4", ["--models", "gpt-oss-120b", "--tile-sweep", "Qwen3-235B-A22B"], "--tile-sweep: expected models among"),
    ("profile_fp4", ["--cases", "masked:x"], "--cases: expected masked:ROWS or contiguous:ROWS"),
    ("profile_fp4", ["--pairs", "fp9"], "--pairs: expected names among"),
])
def test_fp4_tools_refuse_bad_arguments_in_one_line(tool, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"cute_moe.tools.{tool}").main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
