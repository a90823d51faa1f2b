"""Problem -> KernelConfig: written-down rules, a tuned table that wins when present, and overrides.

Everything here runs once per shape (``ops`` caches the result per launcher key), never on the warm
path. The rules and their inputs are documented in docs/dispatch.md; the lead tunes the values.
"""

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

from .specs import AB_DTYPES, ARCHS, D_DTYPES, KINDS, KernelConfig

# Upper bounds of the expected-rows buckets; the last bucket is open-ended (everything above 2048).
# Rules and tuned entries see expected_m only through its bucket; bucket 0 means "no hint".
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Kinds whose launches carry a rows-per-group hint: ops.py passes expected_m for these (dense: M,
# masked: the caller's expected_m) and 0 for contiguous and ragged, whose launcher keys must not
# depend on per-call token counts. Precompile enumerates hints for these kinds only.
KINDS_WITH_ROW_HINT = ("dense", "masked")
# Kinds whose groups start on multiples of the contiguous-layout alignment.
ALIGNED_KINDS = ("contiguous", "psum")
# Streaming multiprocessors assumed when the caller does not say (H100/H200 SXM: 132).
DEFAULT_NUM_SMS = {"sm_90a": 132}
TUNED_TABLE_FORMAT = "cute-moe-tuned-table"
TUNED_TABLE_ENV = "CUTE_MOE_TUNED_TABLE"
TABLE_KEY_FIELDS = ("arch", "kind", "ab_dtype", "d_dtype", "n", "k", "expected_m")


def m_bucket(expected_m: int) -> int:
    """Bucket of a rows-per-group hint: 0 for none (<= 0), else the smallest bound of M_BUCKETS >= it."""
    if expected_m <= 0:
        return 0
    for bound in M_BUCKETS:
        if expected_m <= bound:
            return bound
    return M_BUCKETS[-1]


def buckets_between(lo: int, hi: int) -> tuple[int, ...]:
    """Buckets of every hint in [lo, hi] (0 included when lo <= 0)."""
    first, last = m_bucket(lo), m_bucket(hi)
    inner = tuple(b for b in M_BUCKETS if max(first, 1) <= b <= last)
    return ((0,) if first == 0 else ()) + inner


@dataclass(frozen=True)
class Problem:
    """Everything a dispatch decision may depend on. expected_m is already bucketed (see m_bucket)."""

    kind: str
    n: int
    k: int
    num_groups: int
    expected_m: int
    alignment: int
    arch: str
    ab_dtype: str
    d_dtype: str
    num_sms: int

    def __str__(self) -> str:
        return (f"{self.kind} {self.ab_dtype}->{self.d_dtype} n={self.n} k={self.k} groups={self.num_groups} "
                f"m~{self.expected_m or '?'} align={self.alignment} {self.arch} sms={self.num_sms}")

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("arch", ARCHS), ("ab_dtype", AB_DTYPES), ("d_dtype", D_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("n", "k", "num_groups", "num_sms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.expected_m != m_bucket(self.expected_m):
            raise ValueError(f"expected_m: expected a bucket of {M_BUCKETS} or 0, got {self.expected_m}")
        if self.alignment < 0:
            raise ValueError(f"alignment: expected >= 0, got {self.alignment}")


def max_tile_n(ab_dtype: str) -> int:
    """Widest N tile of the SM90 kernel: FP8 B tiles match the 128 x 128 weight scale blocks."""
    return 128 if ab_dtype == "fp8_e4m3" else 256


def rule_config(p: Problem) -> KernelConfig:
    """The SM90 rules (see docs/dispatch.md; values to be tuned on the GPU).

    1. tile_m: 64 rows (one consumer warpgroup) when a group holds at most 64 rows, or when the
       segment alignment of the contiguous layouts is not a multiple of 128; otherwise 128.
    2. tile_n: the widest the kernel offers (BF16 256, FP8 128), or 128 when N <= 1024 is not a
       multiple of it (the last N block would be mostly padding) or when the widest tiles would
       leave SMs idle (known rows only).
    3. cluster: none when each group is a single M tile (every weight block is read once, there is
       nothing to share); B multicast over an M-cluster of 2 when both CTAs of the cluster fall in one
       group (unknown or > tile_m rows; contiguous: the alignment covers 2 * tile_m rows); else A
       multicast over an N-cluster of 2 when the N blocks pair up; else none.
    4. stages: as many as fit in shared memory; panel: 8 M blocks.
    5. dense with at most 256 rows: see small_m_dense_config.
    """
    m = p.expected_m
    if p.kind == "dense" and 0 < m <= 256:
        return small_m_dense_config(p)
    tile_m = 64 if 0 < m <= 64 or (p.kind in ALIGNED_KINDS and p.alignment % 128 != 0) else 128
    widest = max_tile_n(p.ab_dtype)
    tile_n = widest if p.n % widest == 0 or p.n > 1024 else 128
    m_tiles = math.ceil(m / tile_m) if m else 0
    if tile_n > 128 and m and p.num_groups * m_tiles * math.ceil(p.n / tile_n) < p.num_sms:
        tile_n = 128
    if m_tiles == 1:
        return KernelConfig(tile_m=tile_m, tile_n=tile_n)
    if p.kind != "contiguous" or p.alignment % (2 * tile_m) == 0:
        return KernelConfig(tile_m=tile_m, tile_n=tile_n, cluster_m=2)
    if math.ceil(p.n / tile_n) % 2 == 0:
        return KernelConfig(tile_m=tile_m, tile_n=tile_n, cluster_n=2)
    return KernelConfig(tile_m=tile_m, tile_n=tile_n)


def small_m_dense_config(p: Problem) -> KernelConfig:
    """Dense GEMM with few rows (<= 256) is bound by streaming B once: 64-row tiles, pairs of M blocks
    sharing each B block through an M-cluster, and the widest N tile that still gives at least 3/4 of
    the SMs a tile (measured on the H200: M=128, N=4096 -> 64x64 c2x1; N=7168 -> 64x128 c2x1)."""
    m_blocks = math.ceil(p.expected_m / 64)
    cluster_m = 2 if m_blocks > 1 else 1
    tile_n = 64
    for candidate in (256, 128):
        if candidate <= max_tile_n(p.ab_dtype) and m_blocks * math.ceil(p.n / candidate) * 4 >= 3 * p.num_sms:
            tile_n = candidate
            break
    return KernelConfig(tile_m=64, tile_n=tile_n, cluster_m=cluster_m)


def check_config_fits(kind: str, config: KernelConfig, alignment: int) -> None:
    """Reject a (forced or tuned) config that would compute a wrong answer for this problem kind.

    contiguous: a cluster's tiles must stay inside one aligned segment; psum: each group is tiled from
    its aligned start, so a tile must divide the alignment.
    """
    if kind == "contiguous" and alignment % (config.tile_m * config.cluster_m) != 0:
        raise ValueError(f"config: contiguous layout aligned to {alignment} rows needs tile_m * cluster_m "
                         f"to divide it, got tile_m={config.tile_m}, cluster_m={config.cluster_m}")
    if kind == "psum" and alignment % config.tile_m != 0:
        raise ValueError(f"config: psum layout aligned to {alignment} rows needs tile_m to divide it, "
                         f"got tile_m={config.tile_m}")


def format_config(config: KernelConfig) -> str:
    """Short form for tables and logs: tile, cluster, then the other fields that differ from their
    defaults, e.g. ``128x256 c2x1`` or ``64x128 c1x1 stages=4``."""
    default = KernelConfig()
    others = [f"{name}={value}" for name, value in asdict(config).items()
              if name not in ("tile_m", "tile_n", "cluster_m", "cluster_n") and value != getattr(default, name)]
    return " ".join([f"{config.tile_m}x{config.tile_n} c{config.cluster_m}x{config.cluster_n}", *others])


# ---------------------------------------------------------------------------------------- tuned table
def table_key(p: Problem) -> tuple:
    """What a tuned entry is keyed by: the values of TABLE_KEY_FIELDS (expected_m is the bucket)."""
    return (p.arch, p.kind, p.ab_dtype, p.d_dtype, p.n, p.k, p.expected_m)


def table_entry(p: Problem, config: KernelConfig, **measured: float) -> dict:
    """One JSON entry of a tuned table (``measured`` holds informative numbers such as timings)."""
    return {**dict(zip(TABLE_KEY_FIELDS, table_key(p))), "config": asdict(config), **measured}


def read_tuned_table(path: Path) -> dict[tuple, KernelConfig]:
    """Parse and validate a tuned table file; errors name the file and the entry."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{TUNED_TABLE_ENV}: cannot read tuned table {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != TUNED_TABLE_FORMAT or not isinstance(
            data.get("entries"), list):
        raise ValueError(f"{TUNED_TABLE_ENV}: {path} is not a cute-moe tuned table "
                         f"(expected {{\"format\": \"{TUNED_TABLE_FORMAT}\", \"entries\": [...]}})")
    table = {}
    for i, entry in enumerate(data["entries"]):
        try:
            # num_groups, alignment and num_sms are not part of the key: placeholders for validation.
            problem = Problem(entry["kind"], entry["n"], entry["k"], 1, entry["expected_m"], 0, entry["arch"],
                              entry["ab_dtype"], entry["d_dtype"], 1)
            table[table_key(problem)] = KernelConfig(**entry["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{TUNED_TABLE_ENV}: {path}: entry {i} is invalid: {e!r}") from e
    return table


def default_table_path(arch: str) -> Path:
    """The tuned table shipped in the package for ``arch``: cute_moe/tuned/<arch>.json."""
    return Path(__file__).resolve().parent / "tuned" / f"{arch}.json"


def tuned_table_path(arch: str) -> Optional[Path]:
    """CUTE_MOE_TUNED_TABLE (``off`` disables tables), else the package's table for ``arch`` if shipped."""
    setting = os.environ.get(TUNED_TABLE_ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting)
    default = default_table_path(arch)
    return default if default.is_file() else None


@lru_cache(maxsize=None)
def _tuned_table(arch: str) -> dict[tuple, KernelConfig]:
    path = tuned_table_path(arch)
    return {} if path is None else read_tuned_table(path)


def reload_tuned_table() -> None:
    """Forget the loaded tuned tables and every decision made from them (after writing a table)."""
    _tuned_table.cache_clear()
    _resolve.cache_clear()


# ---------------------------------------------------------------------------------------- choice
@lru_cache(maxsize=None)
def _resolve(p: Problem) -> KernelConfig:
    config, source = _tuned_table(p.arch).get(table_key(p)), "tuned"
    if config is not None:
        try:
            check_config_fits(p.kind, config, p.alignment)
        except ValueError:
            config = None
    if config is None:
        config, source = rule_config(p), "rules"
    if os.environ.get("CUTE_MOE_PRINT_CONFIGS", "0") not in ("", "0"):
        print(f"cute-moe: {p} -> {format_config(config)} ({source})", file=sys.stderr)
    return config


def problem_of(kind: str, n: int, k: int, num_groups: int, expected_m: int, alignment: int, *,
               arch: str = "sm_90a", ab_dtype: str = "bf16", d_dtype: str = "bf16",
               num_sms: Optional[int] = None) -> Problem:
    """The Problem for these arguments (expected_m bucketed, num_sms defaulted per arch)."""
    if arch not in DEFAULT_NUM_SMS:
        raise ValueError(f"arch: expected one of {tuple(DEFAULT_NUM_SMS)}, got {arch!r}")
    return Problem(kind, n, k, num_groups, m_bucket(expected_m), alignment, arch, ab_dtype, d_dtype,
                   DEFAULT_NUM_SMS[arch] if num_sms is None else num_sms)


def choose_config(kind: str, n: int, k: int, num_groups: int, expected_m: int, alignment: int, *,
                  arch: str = "sm_90a", ab_dtype: str = "bf16", d_dtype: str = "bf16",
                  num_sms: Optional[int] = None) -> KernelConfig:
    """The kernel configuration for one problem: the tuned table's entry when one fits, else the rules.

    expected_m: rows per group hint (0 = unknown); alignment: segment alignment of the contiguous
    layouts (ALIGNED_KINDS; 0 for other kinds). With CUTE_MOE_PRINT_CONFIGS=1 each decision is printed once (stderr).
    """
    return _resolve(problem_of(kind, n, k, num_groups, expected_m, alignment, arch=arch, ab_dtype=ab_dtype,
                               d_dtype=d_dtype, num_sms=num_sms))


def reachable_configs(kind: str, n: int, k: int, num_groups: int, hints: tuple[int, ...], alignment: int, *,
                      arch: str = "sm_90a", ab_dtype: str = "bf16", d_dtype: str = "bf16",
                      num_sms: Optional[int] = None) -> set[KernelConfig]:
    """Every config a launch of this problem can get for a hint in ``hints`` (the forced one if set)."""
    forced = forced_config()
    if forced is not None:
        return {forced}
    return {choose_config(kind, n, k, num_groups, m, alignment, arch=arch, ab_dtype=ab_dtype, d_dtype=d_dtype,
                          num_sms=num_sms) for m in hints}


# ---------------------------------------------------------------------------------------- overrides
def parse_config(text: str) -> KernelConfig:
    """``"tile_m=64,tile_n=128,cluster_m=2"`` -> KernelConfig (fields not named keep their defaults)."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in KernelConfig.__dataclass_fields__ or not value.strip().isdigit():
            raise ValueError(f"CUTE_MOE_CONFIG: expected comma-separated field=int among "
                             f"{list(KernelConfig.__dataclass_fields__)}, got {item!r}")
        fields[name] = int(value)
    return KernelConfig(**fields)


_forced: Optional[KernelConfig] = parse_config(os.environ["CUTE_MOE_CONFIG"]) if os.environ.get(
    "CUTE_MOE_CONFIG") else None


def forced_config() -> Optional[KernelConfig]:
    """The config every launch uses instead of the rules (CUTE_MOE_CONFIG or ``force_config``), if any."""
    return _forced


@contextlib.contextmanager
def force_config(config: KernelConfig) -> Iterator[None]:
    """Use ``config`` for every GEMM launched inside the block."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous
