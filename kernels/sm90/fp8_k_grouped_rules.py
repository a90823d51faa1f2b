"""SM90 dispatch of the K-grouped FP8 family (``fp8_k_grouped_gemm.py``): what it implements, its
rules and tuning candidates. Pure functions of a dispatch ``Problem``; no cutlass import.

The family serves the ``k_grouped`` kind with FP8 operands: A and B E4M3, K-major, each with FP32
scales per row per 128 K (DeepGEMM's (1, 1, 128) wgrad recipe), D FP32 (C optional). Tiles and
clusters are those of the grouped GEMM (same rules: the kernel shares its scheduler and epilogue).
"""

import itertools

from .config import CLUSTERS, MAX_GROUPS, TILE_MS, TILE_NS, Sm90Config
from .rules import admitted
from .rules import rule_config as grouped_rule_config

FP8_ROWS = ("fp8_e4m3", "k", "fp32_1x128")  # each operand: E4M3, K-major, 1 x 128 FP32 scales


def _descriptor(operand) -> tuple[str, str, str]:
    return operand.dtype, operand.major, operand.scale


def is_fp8_k_grouped(problem) -> bool:
    """Whether a problem (or spec) belongs to this family: the K-grouped kind with an FP8 A."""
    return problem.kind == "k_grouped" and problem.a.dtype == "fp8_e4m3"


def check_spec(problem) -> None:
    """Refuse what the family cannot implement: operands, output type, group counts."""
    a, b = _descriptor(problem.a), _descriptor(problem.b)
    if a != FP8_ROWS or b != FP8_ROWS:
        raise ValueError(f"operands: the sm_90a K-grouped FP8 kernel implements A=B={FP8_ROWS}, got A={a}, B={b}")
    if problem.d_dtype != "fp32":
        raise ValueError(f"d_dtype: the K-grouped FP8 kernel writes fp32, got {problem.d_dtype!r}")
    if not 1 <= problem.num_groups <= MAX_GROUPS:
        raise ValueError(f"groups: expected between 1 and {MAX_GROUPS} groups, got {problem.num_groups}")


def can_implement(problem, config: Sm90Config) -> None:
    """Every tile and cluster of the grouped GEMM suits a problem this family accepts (not the
    FP4 family's swap-AB kernel)."""
    check_spec(problem)
    if getattr(config, "swap_ab", 0):
        raise ValueError("config: swap_ab is an FP4-weight kernel; the K-grouped FP8 kernel takes swap_ab=0")


def rule_config(problem) -> Sm90Config:
    """The grouped GEMM's rules (rules.rule_config): 128 x 256 tiles (two 128-wide N parts, as the
    FP8 M-grouped kernel) with an M-cluster of 2 when a group holds more than one M tile."""
    return grouped_rule_config(problem)


def candidate_configs(problem) -> list[Sm90Config]:
    """The tuning search space: every tile and cluster; stages and panel default."""
    return admitted(problem, (Sm90Config(tile_m=tile_m, tile_n=tile_n, cluster_m=cluster[0], cluster_n=cluster[1])
                              for tile_m, tile_n, cluster in itertools.product(TILE_MS, TILE_NS, CLUSTERS)),
                    can_implement)
