"""Problem -> kernel config: the arch backend's rules, tuned tables that win when present, overrides.

Everything here runs once per shape (the launcher caches the result per warm key), never on the
warm path. The rules belong to the arch backends (e.g. kernels/sm90/rules.py) and are documented in
docs/dispatch.md; this module holds what is arch-neutral: row buckets, the problem description,
tuned tables and the forced config.
"""

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

from .arch import backend_for, check_arch, get_backend
from .operands import BF16, Operand, operands_label, precision_of
from .specs import D_DTYPES, KINDS, GemmSpec

# Upper bounds of the expected-rows buckets; the last bucket is open-ended (everything above 2048).
# Rules and tuned entries see expected_m only through its bucket; bucket 0 means "no hint".
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Kinds whose launches carry a rows-per-group hint: dense M, masked the caller's expected_m, contiguous
# and ragged their rows per group (A's rows over the groups, see rows_per_group). psum launches pass 0:
# their A is usually a dispatch's fixed-capacity pool, whose size says nothing about the routing.
KINDS_WITH_ROW_HINT = ("dense", "masked", "contiguous", "ragged")
TUNED_TABLE_FORMAT = "cute-moe-tuned-table"
TUNED_TABLE_ENV = "CUTE_MOE_TUNED_TABLE"
CONFIG_ENV = "CUTE_MOE_CONFIG"
TABLE_KEY_FIELDS = ("arch", "kind", "operands", "d_dtype", "n", "k", "expected_m")


def m_bucket(expected_m: int) -> int:
    """Bucket of a rows-per-group hint: 0 for none (<= 0), else the smallest bound of M_BUCKETS >= it."""
    if expected_m <= 0:
        return 0
    for bound in M_BUCKETS:
        if expected_m <= bound:
            return bound
    return M_BUCKETS[-1]


def rows_per_group(total_rows: int, num_groups: int) -> int:
    """The hint of a contiguous or ragged launch: A's rows (contiguous: padding included) per group, rounded up
    (0, no hint, without groups: the launch's validation refuses those)."""
    return -(-total_rows // num_groups) if num_groups > 0 else 0


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
    a: Operand = field(default=BF16)
    b: Operand = field(default=BF16)
    d_dtype: str = "bf16"
    num_sms: int = 1
    has_c: bool = False

    def __str__(self) -> str:
        return (f"{self.kind} {self.operands}->{self.d_dtype} n={self.n} k={self.k} groups={self.num_groups} "
                f"m~{self.expected_m or '?'} align={self.alignment} {self.arch} sms={self.num_sms}")

    def __post_init__(self) -> None:
        check_arch(self.arch)
        for name, allowed in (("kind", KINDS), ("d_dtype", D_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("n", "k", "num_groups", "num_sms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.expected_m != m_bucket(self.expected_m):
            raise ValueError(f"expected_m: expected a bucket of {M_BUCKETS} or 0, got {self.expected_m}")
        if self.alignment < 0:
            raise ValueError(f"alignment: expected >= 0, got {self.alignment}")

    @property
    def operands(self) -> str:
        return operands_label(self.a, self.b)


def problem_of(kind: str, n: int, k: int, num_groups: int, expected_m: int, alignment: int, *,
               arch: Optional[str] = None, a: Operand = BF16, b: Operand = BF16, d_dtype: str = "bf16",
               num_sms: Optional[int] = None, has_c: bool = False) -> Problem:
    """The Problem for these arguments (expected_m bucketed; arch and SM count default per backend)."""
    backend = backend_for(arch)
    return Problem(kind, n, k, num_groups, m_bucket(expected_m), alignment, backend.arch, a, b, d_dtype,
                   backend.default_num_sms if num_sms is None else num_sms, has_c)


def problem_of_spec(spec: GemmSpec) -> Problem:
    """The facts of a spec alone as a Problem (one group, no hint, the spec's psum alignment)."""
    return problem_of(spec.kind, spec.n, spec.k, 1, 0, spec.alignment, arch=spec.arch, a=spec.a, b=spec.b,
                      d_dtype=spec.d_dtype, has_c=spec.has_c)


def spec_of(p: Problem) -> GemmSpec:
    """The static spec a launch of ``p`` compiles (psum specs carry the alignment)."""
    return GemmSpec(p.kind, p.n, p.k, p.a, p.b, p.d_dtype, p.has_c, p.arch,
                    p.alignment if p.kind == "psum" else 0)


def format_config(config: Any, arch: Optional[str] = None) -> str:
    """Short form of a config for tables and logs (the arch backend's notation)."""
    return backend_for(arch).format_config(config)


# ---------------------------------------------------------------------------------------- tuned tables
def table_key(p: Problem) -> tuple:
    """What a tuned entry is keyed by: the values of TABLE_KEY_FIELDS (expected_m is the bucket)."""
    return (p.arch, p.kind, p.operands, p.d_dtype, p.n, p.k, p.expected_m)


def table_entry(p: Problem, config: Any, **measured: float) -> dict:
    """One JSON entry of a tuned table (``measured`` holds informative numbers such as timings)."""
    return {**dict(zip(TABLE_KEY_FIELDS, table_key(p))), "config": asdict(config), **measured}


def read_tuned_table(path: Path) -> dict[tuple, Any]:
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
            a, b = precision_of(entry["operands"])
            # num_groups, alignment and num_sms are not part of the key: placeholders for validation.
            problem = Problem(entry["kind"], entry["n"], entry["k"], 1, entry["expected_m"], 0, entry["arch"],
                              a, b, entry["d_dtype"], 1)
            if not isinstance(entry["config"], dict):
                raise TypeError(f"config: expected an object, got {entry['config']!r}")
            table[table_key(problem)] = get_backend(problem.arch).config_type(**entry["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{TUNED_TABLE_ENV}: {path}: entry {i} is invalid: {e!r}") from e
    return table


def default_table_path(arch: str) -> Path:
    """The tuned table shipped in the package for ``arch``: cute_moe/tuned/<arch>.json."""
    return Path(__file__).resolve().parent / "tuned" / f"{arch}.json"


def user_table_path(arch: str) -> Path:
    """The user's tuned table for ``arch`` (``cute-moe tune`` writes here by default):
    ``$XDG_CONFIG_HOME/cute-moe/tuned/<arch>.json`` (default ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "cute-moe" / "tuned" / f"{arch}.json"


def tuned_table_paths(arch: str) -> list[Path]:
    """The tables read for ``arch``, lowest precedence first: the shipped one, the user's, then the
    file CUTE_MOE_TUNED_TABLE names (``off`` disables every table). Missing default files are skipped."""
    setting = os.environ.get(TUNED_TABLE_ENV, "")
    if setting.lower() == "off":
        return []
    paths = [p for p in (default_table_path(arch), user_table_path(arch)) if p.is_file()]
    return paths + [Path(setting)] if setting else paths


@lru_cache(maxsize=None)
def _tuned_table(arch: str) -> dict[tuple, Any]:
    merged: dict[tuple, Any] = {}
    for path in tuned_table_paths(arch):
        merged.update(read_tuned_table(path))
    return merged


def reload_tuned_table() -> None:
    """Forget the loaded tuned tables and every decision made from them (after writing a table)."""
    _tuned_table.cache_clear()
    _resolve.cache_clear()


# ---------------------------------------------------------------------------------------- choice
def _fitting_entry(p: Problem, key_problem: Problem) -> Any:
    """The tuned tables' entry under ``key_problem``'s key if it can implement ``p``, else None."""
    config = _tuned_table(p.arch).get(table_key(key_problem))
    if config is not None:
        try:
            get_backend(p.arch).can_implement(p, config)
        except ValueError:
            return None
    return config


def fallback_choice(p: Problem) -> tuple[Any, str]:
    """(config, source) the dispatcher takes for ``p`` when its own key has no entry: the entry of
    its hint-free key (bucket 0) when ``p`` carries a hint, else the rules. ``cute-moe tune`` measures
    a key's candidates against this choice."""
    if p.expected_m:
        config = _fitting_entry(p, replace(p, expected_m=0))
        if config is not None:
            return config, "tuned, no hint"
    return get_backend(p.arch).rule_config(p), "rules"


@lru_cache(maxsize=None)
def _resolve(p: Problem) -> Any:
    backend = get_backend(p.arch)
    backend.check_spec(p)
    config, source = _fitting_entry(p, p), "tuned"
    if config is None:
        config, source = fallback_choice(p)
    if os.environ.get("CUTE_MOE_PRINT_CONFIGS", "0") not in ("", "0"):
        print(f"cute-moe: {p} -> {backend.format_config(config)} ({source})", file=sys.stderr)
    return config


def choose_config(kind: str, n: int, k: int, num_groups: int, expected_m: int, alignment: int, **facts) -> Any:
    """The kernel config for one problem: the tuned tables' entry when one fits, else the rules.

    expected_m: rows per group hint (0 = unknown); alignment: segment alignment of the contiguous
    layouts (ALIGNED_KINDS; 0 for other kinds); ``facts``: the keyword arguments of problem_of. With
    CUTE_MOE_PRINT_CONFIGS=1 each decision is printed once (stderr).
    """
    return resolve(problem_of(kind, n, k, num_groups, expected_m, alignment, **facts))


def resolve(p: Problem) -> Any:
    """The config for a Problem: the forced one, else the tuned tables' entry when it fits, else the
    rules; a forced config that cannot implement the problem is refused (ValueError)."""
    forced = forced_config()
    if forced is None:
        return _resolve(p)
    get_backend(p.arch).can_implement(p, forced)
    return forced


def reachable_configs(kind: str, n: int, k: int, num_groups: int, hints: tuple[int, ...], alignment: int,
                      **facts) -> set:
    """Every config a launch of this problem can get for a hint in ``hints`` (the forced one if set)."""
    return {choose_config(kind, n, k, num_groups, m, alignment, **facts) for m in hints}


# ---------------------------------------------------------------------------------------- overrides
def parse_config(text: str, arch: Optional[str] = None) -> Any:
    """``"tile_m=64,tile_n=128,cluster_m=2"`` -> the arch backend's config (fields not named keep
    their defaults); errors name CUTE_MOE_CONFIG."""
    try:
        return backend_for(arch).parse_config(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{CONFIG_ENV}: {e}") from None


_forced: list = []  # configs pushed by force_config, innermost last
_ENV_CONFIG = os.environ.get(CONFIG_ENV)  # read once, parsed at the first launch


@lru_cache(maxsize=4)
def _config_from_env(text: str) -> Any:
    return parse_config(text)


def forced_config() -> Optional[Any]:
    """The config every launch uses instead of dispatch (``force_config``, else CUTE_MOE_CONFIG), if
    any. A malformed CUTE_MOE_CONFIG raises ValueError naming it here, at the first launch."""
    if _forced:
        return _forced[-1]
    return _config_from_env(_ENV_CONFIG) if _ENV_CONFIG else None


@contextlib.contextmanager
def force_config(config: Any) -> Iterator[None]:
    """Use ``config`` for every GEMM launched inside the block."""
    _forced.append(config)
    try:
        yield
    finally:
        _forced.pop()
