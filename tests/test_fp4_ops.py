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


def test_rules_pick_decode_and_prefill_tiles():
    decode = fp4_rules.rule_config(_problem(m=8))
    assert (decode.tile_m, decode.cluster_size) == (64, 1)  # one WGMMA M extent covers the tokens
    assert fp4_rules.rule_config(_problem(m=65)).tile_m == 128
    assert fp4_rules.rule_config(_problem("contiguous", m=0, alignment=64)).tile_m == 64
    assert fp4_rules.rule_config(_problem(m=8, n=256, groups=2)).tile_n == 64  # too few tiles for 132 SMs
    prefill = fp4_rules.rule_config(_problem("contiguous", "fp8xfp4", m=0, alignment=128))
    assert (prefill.tile_m, prefill.tile_n) == (128, 128)
    for p in (_problem(m=8), _problem("psum", "fp8xfp4", m=0, alignment=128)):
        fp4_rules.can_implement(p, fp4_rules.rule_config(p))


def test_rules_refuse_what_the_kernel_cannot_do():
    with pytest.raises(ValueError, match="kind"):
        fp4_rules.check_spec(_problem("ragged"))
    with pytest.raises(ValueError, match="multiple of 32"):
        fp4_rules.check_spec(_problem(k=2888))
    with pytest.raises(ValueError, match="tile_m to divide"):
        fp4_rules.can_implement(_problem("contiguous", m=0, alignment=64), Sm90Config(tile_m=128, tile_n=128))
    assert all(c.cluster_size == 1 and c.tile_n <= 128 for c in fp4_rules.candidate_configs(_problem()))


def test_tools_and_presets_know_the_fp4_precisions():
    from cute_moe.tools.precompile import PRECISIONS as TOOL_PRECISIONS

    assert {"fp8xfp4", "bf16xfp4"} <= set(TOOL_PRECISIONS)
    assert set(FP4_WEIGHT_MODELS) <= set(PRESETS)


@pytest.mark.parametrize("argv,message", [
    (["--ep", "3"], "--ep: expected a divisor of gpt-oss-120b's 128 experts"),
    (["--models", "nope"], "unknown model 'nope'"),
])
def test_bench_fp4_refuses_bad_arguments_in_one_line(argv, message, capsys):
    from cute_moe.tools import bench_fp4

    with pytest.raises(SystemExit) as exit_info:
        bench_fp4.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
