"""Argument validation of the public ops (runs on CPU: errors come before any launch)."""

import pytest
import torch

import cute_moe

bf16 = torch.bfloat16


def test_dense_rejects_wrong_dtype():
    a = torch.zeros(8, 64, dtype=torch.float16)
    b = torch.zeros(64, 64, dtype=bf16)
    d = torch.zeros(8, 64, dtype=bf16)
    with pytest.raises(TypeError, match=r"^a: expected dtype bfloat16, got float16"):
        cute_moe.bf16_gemm_nt(a, b, d)


def test_dense_k_mismatch_names_a_and_both_shapes():
    a = torch.zeros(8, 64, dtype=bf16)
    b = torch.zeros(32, 48, dtype=bf16)
    d = torch.zeros(8, 32, dtype=bf16)
    with pytest.raises(ValueError, match=r"^a: expected K=48 \(from b of shape \(32, 48\)\), got a of shape \(8, 64\)"):
        cute_moe.bf16_gemm_nt(a, b, d)


def test_dense_rejects_wrong_output_shape():
    a = torch.zeros(8, 64, dtype=bf16)
    b = torch.zeros(32, 64, dtype=bf16)
    d = torch.zeros(8, 16, dtype=bf16)
    with pytest.raises(ValueError, match=r"^d: expected shape \(8, 32\)"):
        cute_moe.bf16_gemm_nt(a, b, d)


def test_dense_rejects_unaligned_k():
    a = torch.zeros(8, 60, dtype=bf16)
    b = torch.zeros(32, 60, dtype=bf16)
    d = torch.zeros(8, 32, dtype=bf16)
    with pytest.raises(ValueError, match=r"^b: expected K to be a multiple of 8, got 60"):
        cute_moe.bf16_gemm_nt(a, b, d)


def test_dense_rejects_non_contiguous():
    a = torch.zeros(64, 8, dtype=bf16).t()
    b = torch.zeros(32, 64, dtype=bf16)
    d = torch.zeros(8, 32, dtype=bf16)
    with pytest.raises(ValueError, match=r"^a: expected a contiguous row-major tensor"):
        cute_moe.bf16_gemm_nt(a, b, d)


def test_dense_rejects_cpu_tensors():
    a = torch.zeros(8, 64, dtype=bf16)
    b = torch.zeros(32, 64, dtype=bf16)
    d = torch.zeros(8, 32, dtype=bf16)
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor, got device cpu"):
        cute_moe.bf16_gemm_nt(a, b, d)


def test_dense_rejects_c_of_other_dtype():
    a = torch.zeros(8, 64, dtype=bf16)
    b = torch.zeros(32, 64, dtype=bf16)
    d = torch.zeros(8, 32, dtype=bf16)
    c = torch.zeros(8, 32, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"^c: expected dtype bfloat16, got float32"):
        cute_moe.bf16_gemm_nt(a, b, d, c=c)


def test_contiguous_rejects_layout_dtype_and_length():
    a = torch.zeros(256, 64, dtype=bf16)
    b = torch.zeros(4, 32, 64, dtype=bf16)
    d = torch.zeros(256, 32, dtype=bf16)
    with pytest.raises(TypeError, match=r"^grouped_layout: expected dtype int32, got int64"):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, torch.zeros(256, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^grouped_layout: expected shape \(256,\), got \(255,\)"):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, torch.zeros(255, dtype=torch.int32))


def test_contiguous_rejects_unaligned_rows():
    a = torch.zeros(200, 64, dtype=bf16)
    b = torch.zeros(4, 32, 64, dtype=bf16)
    d = torch.zeros(200, 32, dtype=bf16)
    with pytest.raises(ValueError, match=r"^a: expected the row count .* multiple of 128, got 200"):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, torch.zeros(200, dtype=torch.int32))


def test_masked_rejects_bad_arguments():
    a = torch.zeros(4, 64, 64, dtype=bf16)
    b = torch.zeros(4, 32, 64, dtype=bf16)
    d = torch.zeros(4, 64, 32, dtype=bf16)
    masked_m = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^masked_m: expected shape \(4,\), got \(3,\)"):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m[:3], 16)
    with pytest.raises(TypeError, match=r"^expected_m: expected int, got float"):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 16.0)
    with pytest.raises(ValueError, match=r"^d: expected shape \(4, 64, 32\)"):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d[:, :32], masked_m, 16)


def test_masked_rejects_too_many_groups():
    g = 1025
    a = torch.zeros(g, 1, 64, dtype=bf16)
    b = torch.zeros(g, 8, 64, dtype=bf16)
    d = torch.zeros(g, 1, 8, dtype=bf16)
    with pytest.raises(ValueError, match=r"^a: expected between 1 and 1024 groups, got 1025"):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, torch.zeros(g, dtype=torch.int32), 1)


def test_grouped_mm_rejects_strided_weights_and_bad_offs():
    a = torch.zeros(64, 64, dtype=bf16)
    w_strided = torch.zeros(4, 64, 64, dtype=bf16)[:, :, :32]  # [G, K, N], neither K nor N contiguous
    with pytest.raises(ValueError, match=r"^b: expected K-contiguous"):
        cute_moe.grouped_mm(a, w_strided, torch.zeros(4, dtype=torch.int32))
    w = torch.zeros(4, 32, 64, dtype=bf16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"^offs: expected shape \(4,\), got \(5,\)"):
        cute_moe.grouped_mm(a, w, torch.zeros(5, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^out_dtype"):
        cute_moe.grouped_mm(a, w, torch.zeros(4, dtype=torch.int32), out_dtype=torch.float16)


def test_non_tensor_arguments_raise_type_error_naming_them():
    b = torch.zeros(4, 32, 64, dtype=bf16)
    d = torch.zeros(4, 64, 32, dtype=bf16)
    with pytest.raises(TypeError, match=r"^a: expected a torch.Tensor, got NoneType"):
        cute_moe.m_grouped_bf16_gemm_nt_masked(None, b, d, torch.zeros(4, dtype=torch.int32), 16)
    with pytest.raises(TypeError, match=r"^b: expected a torch.Tensor, got list"):
        cute_moe.grouped_mm(torch.zeros(8, 64, dtype=bf16), [1, 2], torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^a: expected a \(tensor, scale_factors\) pair, got Tensor"):
        cute_moe.fp8_gemm_nt(torch.zeros(8, 64), (torch.zeros(8, 64), torch.zeros(1)), torch.zeros(8, 8))


def test_fp8_scale_factors_must_be_tensors():
    a = (torch.zeros(8, 64, dtype=torch.float8_e4m3fn), None)
    b = (torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.zeros(1, 1))
    with pytest.raises(TypeError, match=r"^sfa: expected a torch.Tensor, got NoneType"):
        cute_moe.fp8_gemm_nt(a, b, torch.zeros(8, 32, dtype=bf16))


def test_grouped_mm_says_it_wants_g_k_n_when_given_a_g_n_k_weight():
    a = torch.zeros(64, 64, dtype=bf16)
    w = torch.zeros(4, 32, 64, dtype=bf16)  # [G, N, K] as the contiguous ops take it
    with pytest.raises(ValueError, match=r"^b: grouped_mm expects b as \[G, K, N\] with K = a.shape\[1\] = 64, "
                                         r"got shape \(4, 32, 64\) \(b looks like a \[G, N, K\] weight"):
        cute_moe.grouped_mm(a, w, torch.zeros(4, dtype=torch.int32))


def test_use_psum_layout_must_be_a_bool():
    a = torch.zeros(128, 64, dtype=bf16)
    b = torch.zeros(4, 32, 64, dtype=bf16)
    d = torch.zeros(128, 32, dtype=bf16)
    with pytest.raises(TypeError, match=r"^use_psum_layout: expected bool, got int"):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, torch.zeros(4, dtype=torch.int32), 1)
