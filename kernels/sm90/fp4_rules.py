"""SM90 dispatch of the FP4-weight family (``fp4_grouped_gemm.py``): what it implements, its rules
and its tuning candidates. Pure functions of a dispatch ``Problem``; no cutlass import.

The family serves the operand pairs whose B is MXFP4 (``fp4_e2m1`` with ``ue8m0_1x32`` exponents):
A BF16, or A FP8 E4M3 with FP32 scales per row per 128 K. Clusters are 1x1 (the widened weights are
private to their CTA). Two kernels: ``swap_ab=0`` (``fp4_grouped_gemm.py``, B widened in shared
memory; tiles 64 or 128 rows by 64 or 128 columns) and ``swap_ab=1`` (``fp4_swap_gemm.py``, weights
widened in registers as WGMMA's A operand; tile_m = 8 .. 128 tokens, tile_n = 64 .. 256 weight rows,
one consumer warpgroup per 64, as the token tile's registers allow; no C). The rules and the tuning
candidates use the swap-AB kernel unless ``CUTE_MOE_FP4_SWAP_AB=0`` (read at each call; its GPU tests
pass on an H200); a forced config runs either kernel whatever the switch says.
"""

import itertools
import math
import os

from .config import MAX_GROUPS, SWAP_AB_TILE_MS, SWAP_AB_TILE_NS, TILE_MS, Sm90Config
from .rules import admitted

FP4_WEIGHTS = ("fp4_e2m1", "k", "ue8m0_1x32")
SUPPORTED_A = {("bf16", "k", "none"), ("fp8_e4m3", "k", "fp32_1x128")}
FP4_KINDS = ("dense", "contiguous", "psum", "masked")
FP4_TILE_NS = (64, 128)  # the widen-in-shared-memory kernel (swap_ab=0)
# Swap-AB: the widest weight-row tile per token tile whose consumer threads fit their registers
# without spilling in the k-loop (fp4_swap_gemm.register_split: 232 registers per consumer thread with
# up to two consumer warpgroups, 152 with three, 104 with four; accumulators grow with the token tile,
# FP8 keeps a second, per-128-K block accumulator). Checked in the SASS (ptxas of CUDA 13.0).
SWAP_AB_MAX_TILE_N = {"fp8": {8: 256, 16: 256, 32: 192, 64: 192, 128: 128},
                      "bf16": {8: 256, 16: 256, 32: 256, 64: 256, 128: 192}}


def swap_max_tile_n(problem, token_tile: int) -> int:
    """The widest swap-AB weight-row tile for ``token_tile`` tokens with the problem's A operand."""
    return SWAP_AB_MAX_TILE_N["fp8" if problem.a.dtype == "fp8_e4m3" else "bf16"][token_tile]
MX_BLOCK = 32  # K elements per UE8M0 exponent: K must be whole blocks


def _descriptor(operand) -> tuple[str, str, str]:
    return operand.dtype, operand.major, operand.scale


def is_fp4(problem) -> bool:
    """Whether a problem (or spec) belongs to this family: B is an FP4 operand."""
    return problem.b.dtype == "fp4_e2m1"


def check_spec(problem) -> None:
    """Refuse a problem the FP4 family cannot implement: operands, kinds, K, C, group counts."""
    a, b = _descriptor(problem.a), _descriptor(problem.b)
    if b != FP4_WEIGHTS or a not in SUPPORTED_A:
        raise ValueError(f"operands: the sm_90a FP4 kernels implement A in {sorted(SUPPORTED_A)} with "
                         f"B={FP4_WEIGHTS}, got A={a}, B={b}")
    if problem.kind not in FP4_KINDS:
        raise ValueError(f"kind: FP4 weights support {FP4_KINDS}, got {problem.kind!r}")
    if problem.k % MX_BLOCK != 0:
        raise ValueError(f"k: FP4 weights need K a multiple of {MX_BLOCK} (whole MXFP4 blocks), got {problem.k}")
    if problem.has_c and problem.kind != "dense":
        raise ValueError(f"has_c: C is supported for the dense kind only, got kind={problem.kind!r}")
    if not 1 <= problem.num_groups <= MAX_GROUPS:
        raise ValueError(f"groups: expected between 1 and {MAX_GROUPS} groups, got {problem.num_groups}")


def can_implement(problem, config: Sm90Config) -> None:
    """Raise ValueError when ``config`` does not suit ``problem`` (cluster, tile_n, segment alignment)."""
    check_spec(problem)
    if config.cluster_size != 1:
        raise ValueError(f"config: FP4 kernels run without clusters, got {config.cluster_m}x{config.cluster_n}")
    if config.swap_ab and config.tile_n > swap_max_tile_n(problem, config.tile_m):
        raise ValueError(f"config: the swap-AB kernel with {config.tile_m}-token tiles takes tile_n up to "
                         f"{swap_max_tile_n(problem, config.tile_m)} with A {problem.a.dtype} (registers per "
                         f"consumer thread), got {config.tile_n}")
    if not config.swap_ab and config.tile_n not in FP4_TILE_NS:
        raise ValueError(f"config: FP4 kernels take tile_n in {FP4_TILE_NS}, got {config.tile_n}")
    if config.swap_ab and problem.has_c:
        raise ValueError("config: the swap-AB FP4 kernel does not add C (swap_ab=0 does)")
    alignment = problem.alignment
    if problem.kind in ("contiguous", "psum") and alignment and alignment % config.tile_m != 0:
        raise ValueError(f"config: {problem.kind} layout aligned to {alignment} rows needs tile_m to divide it, "
                         f"got tile_m={config.tile_m}")


DECODE_TILE_M = 64  # one WGMMA M extent: rows past expected_m only cost tensor-core time
SWAP_AB_ENV = "CUTE_MOE_FP4_SWAP_AB"  # "0": the rules and candidates keep the widen-in-shared-memory kernel


def swap_ab_enabled() -> bool:
    """Whether the rules may pick the swap-AB kernel (on unless ``CUTE_MOE_FP4_SWAP_AB=0``)."""
    return os.environ.get(SWAP_AB_ENV, "1") != "0"


SWAP_AB_KINDS = ("masked", "contiguous", "psum")  # kinds the rules route to the swap-AB kernel
SWAP_AB_MIN_TOKEN_TILE = 16  # expected_m buckets start at 16
SWAP_AB_PREFILL_TILE = 128  # contiguous / psum without a stated alignment: 128-token tiles
SWAP_AB_PREFILL_TILE_N = 128  # weight rows per CTA of masked launches with unknown row counts
# Contiguous / psum (rows unknown to the dispatcher, many tiles in prefill): the widest weight-row tile
# the token tile's registers allow, at most three consumer warpgroups (BF16 at 128 tokens: 192; FP8,
# with its block accumulator: 128).
SWAP_AB_PREFILL_MAX_TILE_N = 192
WEIGHT_ROWS_PER_WARPGROUP = 64  # swap-AB: WGMMA's M, one consumer warpgroup (one warp per scheduler)
# Swap-AB: how often one consumer warp issues an instruction per cycle on its own (ncu, gpt-oss
# gate_up masked decode, two consumer warps per scheduler: 45% of issue slots busy = 1 - (1 - 0.26)^2).
WARP_ISSUE_RATE = 0.26


def swap_tile_n(p, token_tile: int) -> int:
    """Weight rows per CTA for a masked swap-AB launch, among the tiles the token tile's registers
    allow: the fewest estimated cycles of the busiest CTA, i.e. its weight rows (``ceil(tiles / SMs)``
    tiles of ``tile_n`` rows) over its issue rate with ``tile_n / 64`` consumer warps per scheduler,
    ``1 - (1 - WARP_ISSUE_RATE)^warps`` (the kernel is latency-bound: each extra warpgroup fills idle
    issue slots). On a tie the widest. 128 when the rows per group are unknown."""
    m = p.expected_m
    if m <= 0:
        return SWAP_AB_PREFILL_TILE_N
    widest_first = [t for t in reversed(SWAP_AB_TILE_NS) if t <= swap_max_tile_n(p, token_tile)]

    def busiest_cycles(tile_n: int) -> float:
        tiles = p.num_groups * math.ceil(m / token_tile) * math.ceil(p.n / tile_n)
        warps_per_scheduler = tile_n // WEIGHT_ROWS_PER_WARPGROUP
        return math.ceil(tiles / p.num_sms) * tile_n / (1 - (1 - WARP_ISSUE_RATE) ** warps_per_scheduler)

    return min(widest_first, key=busiest_cycles)


def swap_ab_rule(p) -> Sm90Config | None:
    """Rule "swap-AB" (None with ``CUTE_MOE_FP4_SWAP_AB=0``): masked, contiguous and psum
    problems run the swap-AB kernel (weights widened in
    registers as WGMMA's A operand, the tokens as its N). Masked: the token tile is the smallest of
    16, 32, 64, 128 that holds ``expected_m`` (its bucket; 128 above, and for an unknown hint) and
    ``tile_n`` is ``swap_tile_n``'s; contiguous / psum: the largest token tile (128 .. 8) that divides
    the segment alignment (None, i.e. the other kernel, when none does) and the widest weight-row tile
    its registers allow, at most SWAP_AB_PREFILL_MAX_TILE_N."""
    if p.kind not in SWAP_AB_KINDS or not swap_ab_enabled():
        return None
    if p.kind == "masked":
        m = p.expected_m
        token_tile = SWAP_AB_TILE_MS[-1]
        if m > 0:
            token_tile = next((t for t in SWAP_AB_TILE_MS if t >= max(m, SWAP_AB_MIN_TOKEN_TILE)), token_tile)
        return Sm90Config(tile_m=token_tile, tile_n=swap_tile_n(p, token_tile), swap_ab=1)
    alignment = p.alignment or SWAP_AB_PREFILL_TILE
    token_tile = next((t for t in reversed(SWAP_AB_TILE_MS) if alignment % t == 0), None)
    if token_tile is None:
        return None
    return Sm90Config(tile_m=token_tile, tile_n=min(swap_max_tile_n(p, token_tile), SWAP_AB_PREFILL_MAX_TILE_N),
                      swap_ab=1)


def rule_config(p) -> Sm90Config:
    """Rules: ``swap_ab_rule`` when it applies. Otherwise (dense, odd segment alignments) the
    widen-in-shared-memory kernel: 64-row tiles when at most 64 rows per group are expected
    (the tensor cores run 64 x tile_n x K whatever the token count) or the segment alignment is not a
    multiple of 128, 128-row tiles (two consumer warpgroups) otherwise; 128-column tiles, or 64 when
    128 would leave SMs idle (known rows)."""
    swap = swap_ab_rule(p)
    if swap is not None:
        return swap
    m = p.expected_m
    decode = 0 < m <= DECODE_TILE_M
    tile_m = 64 if decode or (p.kind in ("contiguous", "psum") and p.alignment % 128 != 0) else 128
    tile_n = 128
    m_tiles = math.ceil(m / tile_m) if m else 0
    if m and p.num_groups * m_tiles * math.ceil(p.n / tile_n) < p.num_sms:
        tile_n = 64
    return Sm90Config(tile_m=tile_m, tile_n=tile_n)


def candidate_configs(p) -> list[Sm90Config]:
    """The tuning search space: every tile the problem admits, no cluster; the swap-AB kernel's tiles
    too when it is enabled (``swap_ab_enabled``)."""
    shared = (Sm90Config(tile_m=tile_m, tile_n=tile_n) for tile_m, tile_n in itertools.product(TILE_MS, FP4_TILE_NS))
    swap = (Sm90Config(tile_m=tile_m, tile_n=tile_n, swap_ab=1)
            for tile_m, tile_n in itertools.product(SWAP_AB_TILE_MS, SWAP_AB_TILE_NS)
            if swap_ab_enabled() and tile_n <= swap_max_tile_n(p, tile_m))
    return admitted(p, itertools.chain(shared, swap), can_implement)
