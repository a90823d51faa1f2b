"""SM90 dispatch of the K-grouped FP8 family (``fp8_k_grouped_gemm.py``): what it implements, its
rules and tuning candidates. Pure functions of a dispatch ``Problem``; no cutlass import.

The family serves the ``k_grouped`` kind with FP8 operands: A and B E4M3, K-major, each with FP32
scales per row per 128 K (DeepGEMM's (1, 1, 128) wgrad recipe), D FP32 (C optional). Tiles and
clusters are those of the grouped GEMM (same rules: the kernel shares its scheduler and epilogue).
"""

from .config import Sm90Config
from .family_rules import check_group_count, descriptor, every_tile_and_cluster, refuse_swap_ab
from .rules import rule_config as grouped_rule_config

FP8_ROWS = ("fp8_e4m3", "k", "fp32_1x128")  # each operand: E4M3, K-major, 1 x 128 FP32 scales


def is_fp8_k_grouped(problem) -> bool:
    """Whether a problem (or spec) belongs to this family: the K-grouped kind with an FP8 A."""
    return problem.kind == "k_grouped" and problem.a.dtype == "fp8_e4m3"


def check_spec(problem) -> None:
    """Refuse what the family cannot implement: operands, output type, group counts."""
    a, b = descriptor(problem.a), descriptor(problem.b)
    if a != FP8_ROWS or b != FP8_ROWS:
        raise ValueError(f"operands: the sm_90a K-grouped FP8 kernel implements A=B={FP8_ROWS}, got A={a}, B={b}")
    if problem.d_dtype != "fp32":
        raise ValueError(f"d_dtype: the K-grouped FP8 kernel writes fp32, got {problem.d_dtype!r}")
    check_group_count(problem)


def can_implement(problem, config: Sm90Config) -> None:
    """Every tile and cluster of the grouped GEMM suits a problem this family accepts (not the
    FP4 family's swap-AB kernel)."""
    check_spec(problem)
    refuse_swap_ab(config, "K-grouped FP8")


def rule_config(problem) -> Sm90Config:
    """The grouped GEMM's rules (rules.rule_config): 128 x 256 tiles (two 128-wide N parts, as the
    FP8 M-grouped kernel) with an M-cluster of 2 when a group holds more than one M tile."""
    return grouped_rule_config(problem)


def candidate_configs(problem) -> list[Sm90Config]:
    """The tuning search space: every tile and cluster; stages and panel default."""
    return every_tile_and_cluster(problem, can_implement)
