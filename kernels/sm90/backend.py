"""The sm_90a backend: Hopper's kernel config, rules, kernel family, compile and occupancy.

Registered in cute_moe/arch.py. Imports no cutlass at module level; compiling and occupancy queries
import it on first use.
"""

from dataclasses import asdict, fields
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple, Optional

from cute_moe.arch import KernelFamily

from . import fp4_rules, fp8_k_grouped_rules, gathered_swiglu_backward_rules, gathered_swiglu_rules, rules
from .config import MAX_GROUPS, Sm90Config

_KERNELS = Path(__file__).resolve().parent.parent
_PACKAGE = Path(__file__).resolve().parent.parent.parent / "cute_moe"
# The grouped GEMM family: the kernel, its scheduler, its launch signature and the descriptors it reads.
GROUPED_GEMM = KernelFamily("sm90_grouped_gemm", tuple(sorted(
    [_KERNELS / "sm90" / name for name in ("grouped_gemm.py", "signature.py", "config.py")]
    + [_KERNELS / name for name in ("scheduler.py", "grouped_schedulers.py")])))
# The FP4-weight family (B widened on chip) subclasses the grouped GEMM's kernel and reuses its signature helpers.
FP4_GROUPED_GEMM = KernelFamily("sm90_fp4_grouped_gemm", tuple(sorted(
    GROUPED_GEMM.sources + tuple(_KERNELS / "sm90" / name
                                 for name in ("fp4_grouped_gemm.py", "fp4_signature.py", "fp4_widen.py",
                                              "fp4_widen_bits.py", "fp4_swap_gemm.py", "fp4_fragment_bits.py")))))
# The K-grouped FP8 family (1 x 128 scales on both operands) subclasses the grouped GEMM's kernel too.
FP8_K_GROUPED_GEMM = KernelFamily("sm90_fp8_k_grouped_gemm", tuple(sorted(
    GROUPED_GEMM.sources + tuple(_KERNELS / "sm90" / name
                                 for name in ("fp8_k_grouped_gemm.py", "fp8_k_grouped_signature.py")))))
# The MoE layer's GEMM1 (token gather + SwiGLU epilogue) subclasses the grouped GEMM's kernel too.
GATHERED_SWIGLU_GEMM = KernelFamily("sm90_gathered_swiglu_gemm", tuple(sorted(
    GROUPED_GEMM.sources + tuple(_KERNELS / "sm90" / name
                                 for name in ("gathered_swiglu_gemm.py", "gathered_swiglu_signature.py",
                                              "tma_cpasync_pipeline.py")))))
# Its backward dact GEMM (dO gathered, SwiGLU backward epilogue) subclasses GEMM1's kernel.
GATHERED_SWIGLU_BACKWARD_GEMM = KernelFamily("sm90_gathered_swiglu_backward_gemm", tuple(sorted(
    GATHERED_SWIGLU_GEMM.sources + tuple(_KERNELS / "sm90" / name
                                         for name in ("gathered_swiglu_backward_gemm.py",
                                                      "gathered_swiglu_backward_signature.py")))))


class _Variant(NamedTuple):
    """One kernel family of the backend: which problems it serves, its rules module, its sources and
    its compile helper (signature module, function)."""

    serves: Optional[Callable]
    rules: ModuleType
    family: KernelFamily
    compiler: tuple[str, str]


# The families that subclass the grouped GEMM, tried in order; a problem none serves is the grouped GEMM's.
_VARIANTS = (
    _Variant(fp4_rules.is_fp4, fp4_rules, FP4_GROUPED_GEMM, ("fp4_signature", "compile_fp4_gemm")),
    _Variant(gathered_swiglu_rules.is_gathered_swiglu, gathered_swiglu_rules, GATHERED_SWIGLU_GEMM,
             ("gathered_swiglu_signature", "compile_gathered_swiglu_gemm")),
    _Variant(gathered_swiglu_backward_rules.is_gathered_swiglu_backward, gathered_swiglu_backward_rules,
             GATHERED_SWIGLU_BACKWARD_GEMM,
             ("gathered_swiglu_backward_signature", "compile_gathered_swiglu_backward_gemm")),
    _Variant(fp8_k_grouped_rules.is_fp8_k_grouped, fp8_k_grouped_rules, FP8_K_GROUPED_GEMM,
             ("fp8_k_grouped_signature", "compile_fp8_k_grouped_gemm")),
)
_GROUPED = _Variant(None, rules, GROUPED_GEMM, ("signature", "compile_grouped_gemm"))


def _variant_for(problem) -> _Variant:
    """The family that serves ``problem`` (or spec): FP4 weights, the gathered-SwiGLU GEMM1 or its
    backward, K-grouped FP8, or the grouped GEMM."""
    return next((variant for variant in _VARIANTS if variant.serves(problem)), _GROUPED)


def _rules_for(problem):
    """The rules module of the family that serves ``problem`` (or spec)."""
    return _variant_for(problem).rules


class Sm90Backend:
    """Hopper (H100/H200): one persistent warp-specialized TMA + WGMMA kernel family."""

    arch = "sm_90a"
    config_type = Sm90Config
    max_groups = MAX_GROUPS
    default_num_sms = 132  # H100/H200 SXM; the dispatcher's assumption when no GPU is present

    @staticmethod
    def check_spec(problem) -> None:
        _rules_for(problem).check_spec(problem)

    @staticmethod
    def can_implement(problem, config: Sm90Config) -> None:
        if config.swap_ab and not fp4_rules.is_fp4(problem):
            raise ValueError(f"config: swap_ab=1 selects the FP4-weight swap-AB kernel; B is "
                             f"{problem.b.dtype}, not fp4_e2m1")
        _rules_for(problem).can_implement(problem, config)

    @staticmethod
    def rule_config(problem) -> Sm90Config:
        return _rules_for(problem).rule_config(problem)

    @staticmethod
    def candidate_configs(problem) -> list[Sm90Config]:
        return _rules_for(problem).candidate_configs(problem)

    def __init__(self) -> None:
        self._clusters: dict[tuple[int, int], int] = {}
        self._sms: dict[int, int] = {}

    @staticmethod
    def parse_config(text: str) -> Sm90Config:
        """``"tile_m=64,tile_n=128,cluster_m=2"`` -> Sm90Config (fields not named keep their defaults)."""
        names = [f.name for f in fields(Sm90Config)]
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name not in names or not value.isdigit():
                raise ValueError(f"expected comma-separated field=int among {names}, got {item!r}")
            values[name] = int(value)
        return Sm90Config(**values)

    @staticmethod
    def format_config(config: Sm90Config) -> str:
        """Tile, cluster, then the other fields that differ from their defaults: ``128x256 c2x1``,
        ``64x128 c1x1 stages=4``."""
        default = Sm90Config()
        others = [f"{name}={value}" for name, value in asdict(config).items()
                  if name not in ("tile_m", "tile_n", "cluster_m", "cluster_n") and value != getattr(default, name)]
        return " ".join([f"{config.tile_m}x{config.tile_n} c{config.cluster_m}x{config.cluster_n}", *others])

    @staticmethod
    def kernel_family(spec) -> KernelFamily:
        return _variant_for(spec).family

    @staticmethod
    def compile(spec, config: Sm90Config) -> Callable:
        module, function = _variant_for(spec).compiler
        return getattr(import_module(f".{module}", __package__), function)(spec, config)

    def num_sms(self, device_index: int) -> int:
        """SMs of the device (the rules' ``num_sms``), from cutlass's hardware info; cached."""
        count = self._sms.get(device_index)
        if count is None:
            from ..occupancy import multiprocessor_count

            count = self._sms[device_index] = multiprocessor_count(device_index)
        return count

    def max_active_clusters(self, device_index: int, config: Sm90Config) -> int:
        """Clusters of ``config.cluster_size`` CTAs resident at once (one CTA per SM), from cutlass's
        hardware info; cached per device and cluster size."""
        key = (device_index, config.cluster_size)
        count = self._clusters.get(key)
        if count is None:
            from ..occupancy import max_active_clusters

            count = self._clusters[key] = max_active_clusters(device_index, config.cluster_size)
        return count


BACKEND = Sm90Backend()
