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

# The swap-AB kernel (weights as WGMMA's register-sourced A): every token tile, both weight-row tiles,
# K = 2880 (23 k-blocks: odd, partial last), 32 and 96 (1 k-block), 160 (2: no middle k-blocks, partial
# last) and 4096 (32: an even middle count); every kind it runs (no C).
# Three and four consumer warpgroups (tile_n 192 / 256) at the token tiles their registers allow.
SWAP_VARIANTS = [
    (_spec("masked", pair), KernelConfig(tile_m=token_tile, tile_n=tile_n, swap_ab=1))
    for pair in PAIRS for token_tile, tile_n in ((8, 64), (16, 128), (32, 128), (64, 64), (128, 128), (8, 256),
                                                 (16, 192), (16, 256), (32, 192), (64, 192))
] + [
    (_spec("masked", "bf16xfp4"), KernelConfig(tile_m=token_tile, tile_n=tile_n, swap_ab=1))
    for token_tile, tile_n in ((32, 256), (64, 256))  # BF16 only: no block accumulator
] + [
    (_spec("masked", pair, 512, k, d_dtype="fp32"), KernelConfig(tile_m=16, tile_n=256, swap_ab=1, stages=2))
    for pair in PAIRS for k in (32, 160)
] + [
    (_spec("contiguous", "bf16xfp4", 4096, 7168), KernelConfig(tile_m=128, tile_n=192, swap_ab=1)),
] + [
    (_spec("masked", pair, 512, k, d_dtype="fp32"), KernelConfig(tile_m=16, tile_n=64, swap_ab=1, stages=2))
    for pair in PAIRS for k in (32, 96, 160, 4096)
] + [
    (_spec(kind, pair, 4096, 7168), KernelConfig(tile_m=128, tile_n=128, swap_ab=1))
    for pair in PAIRS for kind in ("contiguous", "psum", "dense")
]


@pytest.mark.parametrize("spec,config", VARIANTS + SWAP_VARIANTS,
                         ids=[f"{s.key()}|{c.key()}" for s, c in VARIANTS + SWAP_VARIANTS])
def test_fp4_variant_compiles(spec, config):
    fn = compile_gemm(spec, config)
    assert fn.__class__.__name__.startswith("TVMFFI")


def _register_count(cubin: bytes) -> int:
    """Registers per thread the launch gives (the kernel's EIATTR_REGCOUNT in the cubin's .nv.info)."""
    import struct

    section_table, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, section_table + i * entry_size) for i in range(count)]
    names = sections[names_index][4]
    for name_offset, _, _, _, offset, size, *_ in sections:
        if cubin[names + name_offset:cubin.index(b"\0", names + name_offset)] != b".nv.info":
            continue
        position = offset
        while position < offset + size:  # attributes: format byte, attribute byte, u16 size, payload
            fmt, attribute = cubin[position], cubin[position + 1]
            length, = struct.unpack_from("<H", cubin, position + 2)
            if fmt == 0x04 and attribute == 0x2F:  # EIATTR_REGCOUNT: (symbol, registers)
                return struct.unpack_from("<II", cubin, position + 4)[1]
            position += 4 + (length if fmt == 0x04 else 0)
    raise AssertionError("no EIATTR_REGCOUNT in the cubin")


@pytest.mark.parametrize("tile_n", [64, 128, 192, 256])
def test_swap_ab_register_split_fits_what_the_launch_gives(tile_n, tmp_path):
    """setmaxnreg.inc blocks until the CTA's pool has the registers: the consumer warpgroups may ask
    only for what the launch gave the CTA (ptxas gives a kernel that moves registers the most its block
    size allows) minus what the producer keeps."""
    from cute_moe.kernels.sm90.fp4_signature import compile_fp4_gemm, fp4_kernel
    from cute_moe.kernels.sm90.fp4_swap_gemm import REGISTER_FILE

    spec, config = _spec("masked", "fp8xfp4", 512, 160), KernelConfig(tile_m=16, tile_n=tile_n, swap_ab=1)
    kernel = fp4_kernel(spec, config)
    producer, consumer = kernel.register_split()
    warpgroups = 1 + tile_n // 64
    fn = compile_fp4_gemm(spec, config, f"--keep-cubin --dump-dir={tmp_path}")
    launch = _register_count(fn.artifacts.CUBIN)
    assert launch * 128 * warpgroups <= REGISTER_FILE
    assert producer + (warpgroups - 1) * consumer <= launch * warpgroups
    assert consumer >= {64: 232, 128: 232, 192: 152, 256: 104}[tile_n]


def test_swap_ab_fragment_layout_is_the_one_the_gather_assumes():
    """The RMEM A fragment of the DSL's WGMMA atoms orders (a0, a1, a2, a3) per instruction as
    kernels/sm90/fp4_fragment_bits.py (and its CPU test) assume: thread t's value v of instruction i
    sits at (row, k) = tests/test_fp4_fragment_bits.expected_position."""
    import cutlass
    import cutlass.cute as cute
    import cutlass.utils.hopper_helpers as sm90_utils

    from test_fp4_fragment_bits import expected_position

    layouts = {}

    @cute.jit
    def trace():
        k_major = cute.nvgpu.OperandMajorMode.K
        for name, dtype in (("fp8", cutlass.Float8E4M3FN), ("bf16", cutlass.BFloat16)):
            mma = sm90_utils.make_trivial_tiled_mma(dtype, dtype, k_major, k_major, cutlass.Float32, (1, 1, 1),
                                                    tiler_mn=(64, 16), a_source=cute.nvgpu.warpgroup.OperandSource.RMEM)
            tv = mma.tv_layout_A  # (thread, value) -> column-major (64 x K) index in the atom
            layouts[name] = [[int(tv((thread, value))) for value in range(cute.size(tv, mode=[1]))]
                             for thread in range(128)]

    cute.compile(trace, options="--gpu-arch sm_90a")
    for name, per_word in (("fp8", 4), ("bf16", 2)):
        for thread, offsets in enumerate(layouts[name]):
            assert len(offsets) == 4 * per_word
            for value, offset in enumerate(offsets):
                row, k = offset % 64, offset // 64
                assert (row, k) == expected_position(thread, value // per_word, value % per_word, name == "fp8")


def test_fp4_specs_belong_to_their_own_kernel_family():
    backend = get_backend("sm_90a")
    assert backend.kernel_family(_spec("masked", "fp8xfp4")) is FP4_GROUPED_GEMM
    assert backend.kernel_family(GemmSpec("masked", 256, 256, arch="sm_90a")) is GROUPED_GEMM
    names = {path.name for path in FP4_GROUPED_GEMM.sources}
    assert {"fp4_grouped_gemm.py", "fp4_signature.py", "grouped_gemm.py", "fp4_swap_gemm.py",
            "fp4_fragment_bits.py", "fp4_widen.py"} <= names


@pytest.mark.parametrize("config,match", [
    (KernelConfig(tile_m=64, tile_n=128, cluster_m=2), "without clusters"),
    (KernelConfig(tile_m=64, tile_n=256), "tile_n"),
    (KernelConfig(tile_m=128, tile_n=256, swap_ab=1), "registers"),
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
