"""SM90 dispatch of the backward dact GEMM (``gathered_swiglu_backward_gemm.py``): what it implements,
its rules and tuning candidates. Pure functions of a dispatch ``Problem``; no cutlass import.

The family serves the ``gathered_swiglu_backward`` kind: A (grad_out, gathered by a row index) BF16
K-major, B (w2 [E, H, I]) BF16 N-major, D (dh [S, 2I]) bf16; n = I, k = H.
"""

import itertools
from dataclasses import replace

from .config import CLUSTERS, MAX_GROUPS, TILE_MS, TILE_NS, Sm90Config
from .rules import admitted
from .rules import rule_config as grouped_rule_config

BACKWARD_KIND = "gathered_swiglu_backward"
A_OPERAND = ("bf16", "k", "none")
B_OPERAND = ("bf16", "mn", "none")
# The epilogue runs on two WGMMA N tiles of tile_n / 2 columns; an N-major B tile must span whole
# 64-column (128-byte) swizzle atoms, so tile_n / 2 >= 64.
MIN_TILE_N = 128


def _descriptor(operand) -> tuple[str, str, str]:
    return operand.dtype, operand.major, operand.scale


def is_gathered_swiglu_backward(problem) -> bool:
    """Whether a problem (or spec) belongs to this family."""
    return problem.kind == BACKWARD_KIND


def check_spec(problem) -> None:
    """Refuse what the family cannot implement: operands, output type, C, group counts."""
    a, b = _descriptor(problem.a), _descriptor(problem.b)
    if a != A_OPERAND or b != B_OPERAND:
        raise ValueError(f"operands: the sm_90a backward dact kernel implements A={A_OPERAND}, B={B_OPERAND}, "
                         f"got A={a}, B={b}")
    if problem.d_dtype != "bf16":
        raise ValueError(f"d_dtype: the backward dact kernel writes bf16, got {problem.d_dtype!r}")
    if problem.has_c:
        raise ValueError("has_c: the backward dact kernel adds no C")
    if not 1 <= problem.num_groups <= MAX_GROUPS:
        raise ValueError(f"groups: expected between 1 and {MAX_GROUPS} groups, got {problem.num_groups}")


def can_implement(problem, config: Sm90Config) -> None:
    """A is gathered per CTA by cp.async (cluster_n must be 1), tile_n at least MIN_TILE_N; the
    grouped GEMM's tiles, and B multicast along M, otherwise."""
    check_spec(problem)
    if config.swap_ab:
        raise ValueError("config: swap_ab is an FP4-weight kernel; the backward dact kernel takes swap_ab=0")
    if config.cluster_n != 1:
        raise ValueError(f"config: the backward dact kernel loads A per CTA (cluster_n=1), "
                         f"got cluster_n={config.cluster_n}")
    if config.tile_n < MIN_TILE_N:
        raise ValueError(f"config: the backward dact kernel needs tile_n >= {MIN_TILE_N} (two N-major halves of "
                         f"whole swizzle atoms), got tile_n={config.tile_n}")


def rule_config(problem) -> Sm90Config:
    """The grouped GEMM's rules for the same ragged problem (N = I): 128 x 256 tiles with B shared by
    an M-cluster of 2 unless an expert holds a single M tile."""
    config = grouped_rule_config(replace(problem, kind="ragged"))
    return replace(config, tile_n=max(config.tile_n, MIN_TILE_N))


def candidate_configs(problem) -> list[Sm90Config]:
    """The tuning search space: every admitted tile, clusters along M only; stages and panel default."""
    return admitted(problem, (Sm90Config(tile_m=tile_m, tile_n=tile_n, cluster_m=cluster[0], cluster_n=cluster[1])
                              for tile_m, tile_n, cluster in itertools.product(TILE_MS, TILE_NS, CLUSTERS)),
                    can_implement)
