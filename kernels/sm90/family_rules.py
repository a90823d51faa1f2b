"""Checks and the tuning search space shared by the rules of the kernel families that subclass the
grouped GEMM (K-grouped FP8, gathered SwiGLU GEMM1 and its backward). Pure functions; no cutlass import."""

import itertools

from .config import CLUSTERS, MAX_GROUPS, TILE_MS, TILE_NS, Sm90Config
from .rules import admitted


def descriptor(operand) -> tuple[str, str, str]:
    """(dtype, major, scale recipe) of an operand descriptor."""
    return operand.dtype, operand.major, operand.scale


def check_group_count(problem) -> None:
    """Refuse a group count outside ``[1, MAX_GROUPS]`` (the scheduler's shared-memory table)."""
    if not 1 <= problem.num_groups <= MAX_GROUPS:
        raise ValueError(f"groups: expected between 1 and {MAX_GROUPS} groups, got {problem.num_groups}")


def refuse_swap_ab(config: Sm90Config, kernel: str) -> None:
    """``swap_ab`` selects the FP4-weight swap-AB kernel: refuse it for ``kernel`` (its name in errors)."""
    if getattr(config, "swap_ab", 0):
        raise ValueError(f"config: swap_ab is an FP4-weight kernel; the {kernel} kernel takes swap_ab=0")


def refuse_a_multicast(config: Sm90Config, kernel: str) -> None:
    """A kernel that loads A per CTA (gathered rows, cp.async) cannot multicast it: cluster_n must be 1."""
    if config.cluster_n != 1:
        raise ValueError(f"config: the {kernel} kernel loads A per CTA (cluster_n=1), got cluster_n={config.cluster_n}")


def every_tile_and_cluster(problem, can_implement) -> list[Sm90Config]:
    """The tuning search space: every tile and cluster that ``can_implement`` admits for ``problem``;
    stages and panel default."""
    return admitted(problem, (Sm90Config(tile_m=tile_m, tile_n=tile_n, cluster_m=cluster[0], cluster_n=cluster[1])
                              for tile_m, tile_n, cluster in itertools.product(TILE_MS, TILE_NS, CLUSTERS)),
                    can_implement)
