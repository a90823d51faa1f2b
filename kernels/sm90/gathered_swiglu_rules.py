"""SM90 dispatch of the gathered-SwiGLU GEMM1 family (``gathered_swiglu_gemm.py``): what it implements,
its rules and tuning candidates. Pure functions of a dispatch ``Problem``; no cutlass import.

The family serves the ``gathered_swiglu`` / ``gathered_swiglu_h`` kinds: A (x, gathered by a row
index) and B (w13 [E, 2I, H]) BF16 K-major, D (act [S, I], h [S, 2I]) bf16; n = 2I, k = H.
"""

from dataclasses import replace

from .config import Sm90Config
from .family_rules import check_group_count, descriptor, every_tile_and_cluster, refuse_a_multicast, refuse_swap_ab
from .rules import b_multicast_config

GATHERED_KINDS = ("gathered_swiglu", "gathered_swiglu_h")
BF16_K = ("bf16", "k", "none")
KERNEL = "gathered-SwiGLU"  # the kernel's name in errors


def is_gathered_swiglu(problem) -> bool:
    """Whether a problem (or spec) belongs to this family."""
    return problem.kind in GATHERED_KINDS


def check_spec(problem) -> None:
    """Refuse what the family cannot implement: operands, output type, C, group counts, odd 2I."""
    a, b = descriptor(problem.a), descriptor(problem.b)
    if a != BF16_K or b != BF16_K:
        raise ValueError(f"operands: the sm_90a gathered-SwiGLU kernel implements A=B={BF16_K}, got A={a}, B={b}")
    if problem.d_dtype != "bf16":
        raise ValueError(f"d_dtype: the gathered-SwiGLU kernel writes bf16, got {problem.d_dtype!r}")
    if problem.has_c:
        raise ValueError("has_c: the gathered-SwiGLU kernel adds no C")
    if problem.n % 16 != 0:
        raise ValueError(f"n: expected 2I with I a multiple of 8, got n={problem.n}")
    check_group_count(problem)


def can_implement(problem, config: Sm90Config) -> None:
    """A is gathered per CTA by cp.async (no A multicast: cluster_n must be 1); the grouped GEMM's
    tiles, and B multicast along M, otherwise."""
    check_spec(problem)
    refuse_swap_ab(config, KERNEL)
    refuse_a_multicast(config, KERNEL)


def rule_config(problem) -> Sm90Config:
    """The grouped GEMM's B-multicast rules for the same ragged problem (N = 2I accumulator columns per row):
    128 x 256 tiles (128 output columns) with B shared by an M-cluster of 2 unless an expert holds
    a single M tile."""
    return b_multicast_config(replace(problem, kind="ragged"))


def candidate_configs(problem) -> list[Sm90Config]:
    """The tuning search space: every tile, clusters along M only; stages and panel default."""
    return every_tile_and_cluster(problem, can_implement)
