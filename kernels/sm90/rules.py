"""SM90 dispatch: what the kernel can implement, the written-down rules and the tuning candidates.

Pure functions of a dispatch ``Problem`` (cute_moe.dispatch); documented in docs/dispatch.md.
No cutlass import.
"""

import itertools
import math
from dataclasses import replace

from cute_moe.specs import C_KINDS

from .config import CLUSTERS, MAX_GROUPS, TILE_MS, TILE_NS, Sm90Config

# Operand descriptors (dtype, major, scale) the kernel implements, as (A, B) pairs.
# BF16 operands may be K- or MN-major (WGMMA reads both from shared memory); FP8 WGMMA takes
# K-major operands only.
SUPPORTED_OPERANDS = {
    (("bf16", a_major, "none"), ("bf16", b_major, "none")) for a_major in ("k", "mn") for b_major in ("k", "mn")
} | {
    (("fp8_e4m3", "k", "fp32_1x128"), ("fp8_e4m3", "k", "fp32_128x128")),
}
# Kinds the FP8 path implements (ragged and k_grouped are BF16 only).
FP8_KINDS = ("dense", "contiguous", "psum", "masked")
# Kinds whose A may be MN-major (the row-grouped kinds read A's rows by TMA boxes of whole rows).
MN_MAJOR_A_KINDS = ("dense", "k_grouped")


def _descriptor(operand) -> tuple[str, str, str]:
    return operand.dtype, operand.major, operand.scale


def is_fp8(problem) -> bool:
    return problem.a.dtype == "fp8_e4m3"


def check_spec(problem) -> None:
    """Refuse a problem no SM90 config implements: operand types, majors and scale recipes, kinds,
    group counts."""
    pair = (_descriptor(problem.a), _descriptor(problem.b))
    if pair not in SUPPORTED_OPERANDS:
        raise ValueError(f"operands: the sm_90a kernels implement {sorted(SUPPORTED_OPERANDS)}, "
                         f"got A={pair[0]}, B={pair[1]}")
    if is_fp8(problem) and problem.kind not in FP8_KINDS:
        raise ValueError(f"kind: FP8 supports {FP8_KINDS}, got {problem.kind!r}")
    if problem.has_c and problem.kind not in C_KINDS:
        raise ValueError(f"has_c: C is supported for the kinds {C_KINDS} only, got kind={problem.kind!r}")
    if problem.a.major == "mn" and problem.kind not in MN_MAJOR_A_KINDS:
        raise ValueError(f"operands: an MN-major A is supported for the kinds {MN_MAJOR_A_KINDS}, "
                         f"got kind={problem.kind!r}")
    if not 1 <= problem.num_groups <= MAX_GROUPS:
        raise ValueError(f"groups: expected between 1 and {MAX_GROUPS} groups, got {problem.num_groups}")





def can_implement(problem, config: Sm90Config) -> None:
    """Raise ValueError when ``config`` would compile wrongly or compute a wrong answer for ``problem``.

    contiguous: a tile must stay inside one aligned segment
    (alignment 0 = unknown, not checked); an M-cluster may span two segments (the kernel then shares B
    only between CTAs of one expert). psum: each group is tiled from its aligned start, so a tile must
    divide the alignment.
    """
    check_spec(problem)
    alignment = problem.alignment
    if problem.kind == "contiguous" and alignment and alignment % config.tile_m != 0:
        raise ValueError(f"config: contiguous layout aligned to {alignment} rows needs tile_m to divide it, "
                         f"got tile_m={config.tile_m}")
    if problem.kind == "psum" and alignment % config.tile_m != 0:
        raise ValueError(f"config: psum layout aligned to {alignment} rows needs tile_m to divide it, "
                         f"got tile_m={config.tile_m}")


def rule_config(p) -> Sm90Config:
    """The SM90 rules (see docs/dispatch.md).

    1. tile_m: 64 rows (one consumer warpgroup) when a group holds at most 64 rows, or when the
       segment alignment of the contiguous layouts is not a multiple of 128; otherwise 128.
    2. tile_n: the widest the kernel offers (256; FP8 runs it as two 128-wide parts, one weight
       scale block each: 1.06-1.13x faster than 128-wide FP8 tiles on the H200), or 128 when N <= 1024 is not a
       multiple of it (the last N block would be mostly padding) or when the widest tiles would
       leave SMs idle (known rows only).
    3. cluster: none when each group is a single M tile (every weight block is read once, there is
       nothing to share); ragged (the rules ignore its hint): A multicast over an N-cluster of 2 when N
       has two tiles or more, else none; otherwise B multicast over an M-cluster of 2 (contiguous
       segments aligned to fewer rows than the cluster tile included: the kernel multicasts B only to
       CTAs of the same expert; measured on the H200 with uneven experts of ~256 rows, 1.00-1.19x the
       time of the A-multicast N-cluster and up to 1.24x the time of no cluster, never slower).
    4. stages: as many as fit in shared memory; panel: 8 M blocks.
    5. dense with at most 256 rows: see small_m_dense_config.
    """
    if p.kind == "dense" and 0 < p.expected_m <= 256:
        return small_m_dense_config(p)
    if p.kind == "ragged":
        # The hint of a ragged launch is the mean of uneven counts; the busiest experts hold 2-3x it.
        # Measured on the H200 over every preset (uneven routing), the choices the hint would make
        # (64-row tiles at <= 64 rows, no cluster at one M tile, 128-wide tiles when few) lost up to 15%
        # to the hint-free choice; tuned entries refine it per bucket.
        p = replace(p, expected_m=0)
    config = b_multicast_config(p)
    if p.kind == "ragged" and config.cluster_m > 1:
        # A ragged group is cut into whole cluster tiles: an M-cluster idles one CTA of every group's
        # last cluster tile (half the CTAs at <= 128 rows per group). Measured on the H200 over every
        # preset's shapes, uniform rows: 128x256 c2x1 took 1.13-1.35x the time of the best neighbour.
        cluster_n = 2 if math.ceil(p.n / config.tile_n) >= 2 else 1
        return replace(config, cluster_m=1, cluster_n=cluster_n)
    return config


def b_multicast_config(p) -> Sm90Config:
    """Rules 1-3 with B (weights) shared by an M-cluster of 2 whenever a group spans several M tiles."""
    m = p.expected_m
    aligned_kind = p.kind in ("contiguous", "psum")
    tile_m = 64 if 0 < m <= 64 or (aligned_kind and p.alignment % 128 != 0) else 128
    widest = max(TILE_NS)
    tile_n = widest if p.n % widest == 0 or p.n > 1024 else 128
    m_tiles = math.ceil(m / tile_m) if m else 0
    if tile_n > 128 and m and p.num_groups * m_tiles * math.ceil(p.n / tile_n) < p.num_sms:
        tile_n = 128
    if m_tiles == 1:
        return Sm90Config(tile_m=tile_m, tile_n=tile_n)
    return Sm90Config(tile_m=tile_m, tile_n=tile_n, cluster_m=2)


def small_m_dense_config(p) -> Sm90Config:
    """Dense GEMM with few rows (<= 256) is bound by streaming B once: 64-row tiles, pairs of M blocks
    sharing each B block through an M-cluster, and the widest N tile that still gives at least 3/4 of
    the SMs a tile (measured on the H200: M=128, N=4096 -> 64x64 c2x1; N=7168 -> 64x128 c2x1)."""
    m_blocks = math.ceil(p.expected_m / 64)
    cluster_m = 2 if m_blocks > 1 else 1
    tile_n = 64
    for candidate in (256, 128):
        if m_blocks * math.ceil(p.n / candidate) * 4 >= 3 * p.num_sms:
            tile_n = candidate
            break
    return Sm90Config(tile_m=64, tile_n=tile_n, cluster_m=cluster_m)


def candidate_configs(p) -> list[Sm90Config]:
    """The tuning search space: tiles and clusters the problem admits; stages and panel default."""
    return admitted(p, (Sm90Config(tile_m=tile_m, tile_n=tile_n, cluster_m=cluster[0], cluster_n=cluster[1])
                        for tile_m, tile_n, cluster in itertools.product(TILE_MS, TILE_NS, CLUSTERS)), can_implement)


def admitted(problem, configs, check) -> list[Sm90Config]:
    """The configs that ``check(problem, config)`` (a family's ``can_implement``) accepts, in order."""
    accepted = []
    for config in configs:
        try:
            check(problem, config)
        except ValueError:
            continue
        accepted.append(config)
    return accepted
