"""Every training (backward) GEMM variant compiles for sm_90a on a CPU: MN-major BF16 operands
(DeepGEMM's nn / tn / tt) and the K-grouped kind; FP8 MN-major operands are refused."""

import pytest

from cute_moe.compile import compile_gemm
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.operands import BF16, FP8_PER_BLOCK, FP8_PER_TOKEN, Operand
from cute_moe.specs import GemmSpec

MN = Operand("bf16", "mn")

VARIANTS = [
    # dense nn / tn / tt, with C and FP32 output, odd sizes, clusters of both kinds
    (GemmSpec("dense", 4096, 7168, a=BF16, b=MN), KernelConfig()),
    (GemmSpec("dense", 384, 320, a=MN, b=BF16), KernelConfig(tile_m=64, tile_n=128, cluster_m=2)),
    (GemmSpec("dense", 384, 320, a=MN, b=MN, d_dtype="fp32", has_c=True), KernelConfig(tile_n=64, cluster_n=2)),
    # M-grouped contiguous nn (dX = dY . W), psum layout, ragged (grouped_mm) with B N-major
    (GemmSpec("contiguous", 7168, 2048, b=MN), KernelConfig(tile_m=128, tile_n=256, cluster_m=2)),
    (GemmSpec("psum", 2048, 7168, b=MN, alignment=128), KernelConfig(tile_m=128, tile_n=128)),
    (GemmSpec("ragged", 384, 320, b=MN), KernelConfig(tile_m=64, tile_n=128, cluster_m=2)),
    # K-grouped: DeepGEMM tn (both MN-major) and torch's 2-D x 2-D (A K-major), with and without C
    (GemmSpec("k_grouped", 7168, 4096, a=MN, b=MN, d_dtype="fp32"), KernelConfig(cluster_m=2)),
    (GemmSpec("k_grouped", 384, 320, a=MN, b=MN, d_dtype="fp32", has_c=True), KernelConfig(tile_m=64, tile_n=128)),
    (GemmSpec("k_grouped", 384, 320, a=MN, b=MN, d_dtype="fp32"), KernelConfig(tile_m=128, tile_n=64, cluster_n=2)),
    (GemmSpec("k_grouped", 7168, 4096, a=BF16, b=MN), KernelConfig(tile_n=128, cluster_m=2)),
]


@pytest.mark.parametrize("spec,config", VARIANTS, ids=[f"{s.key()}|{c.key()}" for s, c in VARIANTS])
def test_training_variant_compiles(spec, config):
    fn = compile_gemm(spec, config)
    assert fn.__class__.__name__.startswith("TVMFFI")


def test_majors_are_part_of_the_spec_key():
    keys = {GemmSpec("dense", 256, 256, a=a, b=b).key() for a in (BF16, MN) for b in (BF16, MN)}
    assert len(keys) == 4


@pytest.mark.parametrize("a,b", [(Operand("fp8_e4m3", "mn", "fp32_1x128"), FP8_PER_BLOCK),
                                 (FP8_PER_TOKEN, Operand("fp8_e4m3", "mn", "fp32_128x128"))])
def test_fp8_mn_major_is_refused(a, b):
    with pytest.raises(ValueError, match="operands"):
        compile_gemm(GemmSpec("dense", 256, 256, a=a, b=b), KernelConfig(tile_n=128))


@pytest.mark.parametrize("kind", ["contiguous", "masked", "ragged"])
def test_mn_major_a_is_refused_for_row_grouped_kinds(kind):
    with pytest.raises(ValueError, match="MN-major A"):
        compile_gemm(GemmSpec(kind, 256, 256, a=MN), KernelConfig())


def test_k_grouped_fp8_is_refused():
    with pytest.raises(ValueError, match="operands|kind"):
        compile_gemm(GemmSpec("k_grouped", 256, 256, a=FP8_PER_TOKEN, b=FP8_PER_BLOCK), KernelConfig(tile_n=128))
