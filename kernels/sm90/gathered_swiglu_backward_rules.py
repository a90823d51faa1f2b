"""SM90 dispatch of the backward dact GEMM (``gathered_swiglu_backward_gemm.py``): what it implements,
its rules and tuning candidates. Pure functions of a dispatch ``Problem``; no cutlass import.

The family serves the ``gathered_swiglu_backward`` kind: A (grad_out, gathered by a row index) BF16
K-major, B (w2 [E, H, I]) BF16 N-major, D (dh [S, 2I]) bf16; n = I, k = H.
"""

from dataclasses import replace

from .config import Sm90Config
from .family_rules import check_group_count, descriptor, every_tile_and_cluster, refuse_a_multicast, refuse_swap_ab
from .rules import b_multicast_config

BACKWARD_KIND = "gathered_swiglu_backward"
A_OPERAND = ("bf16", "k", "none")
B_OPERAND = ("bf16", "mn", "none")
# The epilogue runs on two WGMMA N tiles of tile_n / 2 columns; an N-major B tile must span whole
# 64-column (128-byte) swizzle atoms, so tile_n / 2 >= 64.
MIN_TILE_N = 128
KERNEL = "backward dact"  # the kernel's name in errors


def is_gathered_swiglu_backward(problem) -> bool:
    """Whether a problem (or spec) belongs to this family."""
    return problem.kind == BACKWARD_KIND


def check_spec(problem) -> None:
    """Refuse what the family cannot implement: operands, output type, C, group counts."""
    a, b = descriptor(problem.a), descriptor(problem.b)
    if a != A_OPERAND or b != B_OPERAND:
        raise ValueError(f"operands: the sm_90a backward dact kernel implements A={A_OPERAND}, B={B_OPERAND}, "
                         f"got A={a}, B={b}")
    if problem.d_dtype != "bf16":
        raise ValueError(f"d_dtype: the backward dact kernel writes bf16, got {problem.d_dtype!r}")
    if problem.has_c:
        raise ValueError("has_c: the backward dact kernel adds no C")
    check_group_count(problem)


def can_implement(problem, config: Sm90Config) -> None:
    """A is gathered per CTA by cp.async (cluster_n must be 1), tile_n at least MIN_TILE_N; the
    grouped GEMM's tiles, and B multicast along M, otherwise."""
    check_spec(problem)
    refuse_swap_ab(config, KERNEL)
    refuse_a_multicast(config, KERNEL)
    if config.tile_n < MIN_TILE_N:
        raise ValueError(f"config: the backward dact kernel needs tile_n >= {MIN_TILE_N} (two N-major halves of "
                         f"whole swizzle atoms), got tile_n={config.tile_n}")


def rule_config(problem) -> Sm90Config:
    """The grouped GEMM's B-multicast rules for the same ragged problem (N = I): 128 x 256 tiles with
    B shared by an M-cluster of 2 unless an expert holds a single M tile."""
    config = b_multicast_config(replace(problem, kind="ragged"))
    return replace(config, tile_n=max(config.tile_n, MIN_TILE_N))


def candidate_configs(problem) -> list[Sm90Config]:
    """The tuning search space: every admitted tile, clusters along M only; stages and panel default."""
    return every_tile_and_cluster(problem, can_implement)
