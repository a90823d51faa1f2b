"""Every FP4-weight (FP8 x FP4, BF16 x FP4) SM90 kernel variant compiles for sm_90a without a GPU."""

import pytest

from cute_moe.arch import get_backend
from cute_moe.compile import compile_gemm
from cute_moe.kernels.sm90.backend import FP4_GROUPED_GEMM, GROUPED_GEMM
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.operands import PRECISIONS
from cute_moe.specs import GemmSpec

PAIRS = {name: dict(a=PRECISIONS[name][0], b=PRECISIONS[name][1]) for name in ("fp8xfp4", "bf16xfp4")}


def _spec(kind: str, pair: str, n: int = 2880, k: int = 2880, **extra) -> GemmSpec:
    return GemmSpec(kind, n, k, **PAIRS[pair], alignment=128 if kind == "psum" else 0, arch="sm_90a", **extra)


# K = 2880 (gpt-oss) is a multiple of 32 but not of 64 or 128: partial last k-blocks everywhere.
VARIANTS = [
    (_spec(kind, pair), KernelConfig(tile_m=64, tile_n=128))
    for pair in PAIRS for kind in ("dense", "contiguous", "psum", "masked")
] + [
    (_spec("masked", pair, 7168, 2048, d_dtype="fp32"), KernelConfig(tile_m=128, tile_n=64)) for pair in PAIRS
] + [
    (_spec("contiguous", pair, 4096, 7168), KernelConfig(tile_m=128, tile_n=128)) for pair in PAIRS
] + [
    (_spec("dense", pair, 384, 320, d_dtype=d, has_c=True), KernelConfig(tile_m=64, tile_n=64))
    for pair in PAIRS for d in ("bf16", "fp32")
] + [
    (_spec("masked", pair, 512, 96), KernelConfig(tile_m=64, tile_n=64, stages=2, panel=4)) for pair in PAIRS
]  # K = 96: a single k-block (the FP8 mainloop's widen-ahead loop runs zero times)


@pytest.mark.parametrize("spec,config", VARIANTS, ids=[f"{s.key()}|{c.key()}" for s, c in VARIANTS])
def test_fp4_variant_compiles(spec, config):
    fn = compile_gemm(spec, config)
    assert fn.__class__.__name__.startswith("TVMFFI")


def test_fp4_specs_belong_to_their_own_kernel_family():
    backend = get_backend("sm_90a")
    assert backend.kernel_family(_spec("masked", "fp8xfp4")) is FP4_GROUPED_GEMM
    assert backend.kernel_family(GemmSpec("masked", 256, 256, arch="sm_90a")) is GROUPED_GEMM
    names = {path.name for path in FP4_GROUPED_GEMM.sources}
    assert {"fp4_grouped_gemm.py", "fp4_signature.py", "grouped_gemm.py"} <= names


@pytest.mark.parametrize("config,match", [
    (KernelConfig(tile_m=64, tile_n=128, cluster_m=2), "without clusters"),
    (KernelConfig(tile_m=64, tile_n=256), "tile_n"),
])
def test_fp4_configs_the_kernel_cannot_run_are_refused_before_compiling(config, match):
    with pytest.raises(ValueError, match=match):
        compile_gemm(_spec("masked", "bf16xfp4"), config)


def test_fp4_k_must_be_whole_mx_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        compile_gemm(_spec("masked", "bf16xfp4", 256, 264), KernelConfig(tile_m=64, tile_n=64))


def test_fp4_ragged_is_refused():
    with pytest.raises(ValueError, match="kind"):
        compile_gemm(_spec("ragged", "bf16xfp4"), KernelConfig(tile_m=64, tile_n=64))
