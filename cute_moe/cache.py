"""Disk cache of compiled specializations (objects from ``export_to_c``, loaded with ``load_module``).

Layout under the cache root (CUTE_MOE_CACHE_DIR, default ``$XDG_CACHE_HOME/cute-moe`` or
``~/.cache/cute-moe``)::

    <fingerprint>/fingerprint.json   what the fingerprint was computed from
    <fingerprint>/<digest>.o         the exported object (host code + embedded cubin)
    <fingerprint>/<digest>.json      its manifest entry: key, size, sha256, compile seconds
    <fingerprint>/<digest>.lock      per-key lock (flock): one process compiles a key, others wait

``digest`` hashes the key (kernel, spec = kind/static N,K/dtypes/arch, config, fingerprint). The
manifest entry is written last (temp file + rename), so it marks a complete object; an entry whose
manifest, key, size or checksum does not match is never loaded: it is removed and rebuilt. A new
fingerprint (kernel sources, nvidia-cutlass-dsl, apache-tvm-ffi, host CPU) is a new directory.
CUTE_MOE_CACHE=0 turns the disk cache off.
"""

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .specs import GemmSpec, KernelConfig

ENTRY_FORMAT = "cute-moe-cache-entry"
LAYOUT_VERSION = 1
KERNEL = "grouped_gemm"
LOCK_TIMEOUT_S = 600.0
ABSENT = "absent"
_FINGERPRINT_DIR = re.compile(r"^[0-9a-f]{16}$")
_ENTRY_FILE = re.compile(r"^\.?([0-9a-f]{32})\.")  # <digest>.o/.json/.lock and .<digest>.* temporaries
_PACKAGE_DIR = Path(__file__).resolve().parent


class CacheWarning(RuntimeWarning):
    """A cache entry was unusable (and removed) or the cache directory could not be written."""


@dataclass(frozen=True)
class BuildResult:
    """What ``ensure`` did for one key: status compiled / rebuilt / cached, seconds, object bytes."""

    status: str
    seconds: float
    size: int


def cache_root() -> Path:
    """CUTE_MOE_CACHE_DIR, else the user's cache directory."""
    if os.environ.get("CUTE_MOE_CACHE_DIR"):
        return Path(os.environ["CUTE_MOE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cute-moe"


def cache_enabled() -> bool:
    """False when CUTE_MOE_CACHE is 0 / off / false / no."""
    return os.environ.get("CUTE_MOE_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def _source_files() -> list[Path]:
    from . import kernels as kernels_pkg  # the installed mapping wins over the source-tree guess

    kernels = Path(kernels_pkg.__file__).resolve().parent
    return sorted(kernels.rglob("*.py")) + [_PACKAGE_DIR / "compile.py", _PACKAGE_DIR / "specs.py"]


@lru_cache(maxsize=1)
def fingerprint_parts() -> dict[str, Any]:
    """Everything a compiled object depends on besides its key."""
    sources = hashlib.sha256()
    for path in _source_files():
        data = path.read_bytes()
        sources.update(f"{path.parent.name}/{path.name}:{len(data)}:".encode())
        sources.update(data)
    return {
        "layout": LAYOUT_VERSION,
        "sources": sources.hexdigest(),
        "nvidia-cutlass-dsl": importlib.metadata.version("nvidia-cutlass-dsl"),
        "apache-tvm-ffi": importlib.metadata.version("apache-tvm-ffi"),
        "host": platform.machine(),
    }


def fingerprint() -> str:
    """16 hex digits naming the directory of this build's entries."""
    return hashlib.sha256(json.dumps(fingerprint_parts(), sort_keys=True).encode()).hexdigest()[:16]


def _digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _symbol(digest: str) -> str:
    """Function prefix of the exported TVM-FFI function of an entry."""
    return f"cute_moe_{digest}"


@dataclass(frozen=True, eq=False)
class Entry:
    """Where one key lives on disk."""

    directory: Path
    key: dict
    digest: str

    @property
    def object_path(self) -> Path:
        return self.directory / f"{self.digest}.o"

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.digest}.json"

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.digest}.lock"

    @property
    def symbol(self) -> str:
        return _symbol(self.digest)


def entry_for(spec: GemmSpec, config: KernelConfig, root: Optional[Path] = None) -> Entry:
    """The cache entry of (spec, config) for this build's fingerprint."""
    fp = fingerprint()
    key = {"kernel": KERNEL, "spec": asdict(spec), "config": asdict(config), "arch": spec.arch, "fingerprint": fp}
    return Entry((root or cache_root()) / fp, key, _digest(key))


# ------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def _locked(path: Path, exclusive: bool, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """flock on ``path`` (released by the kernel if the holder dies). A shared lock that cannot be
    created (read-only cache) is skipped: nobody can rewrite such an entry under us."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        if exclusive:
            raise
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT,
                                       f"cute-moe cache: lock {path} held for over {timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _inspect(directory: Path, digest: str, expected_key: Optional[dict] = None) -> tuple[Optional[dict], str]:
    """(manifest entry, "") when the entry is complete and is the one its name says; else (None, reason).

    The reason is ABSENT when nothing was committed under this digest.
    """
    try:
        meta = json.loads((directory / f"{digest}.json").read_bytes())
    except FileNotFoundError:
        return None, ABSENT
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest entry ({e})"
    if not isinstance(meta, dict) or meta.get("format") != ENTRY_FORMAT:
        return None, "not a cute-moe manifest entry"
    key = meta.get("key")
    if _digest(key) != digest or (expected_key is not None and key != expected_key):
        return None, "foreign entry (its key does not match its name)"
    if not isinstance(key, dict) or key.get("fingerprint") != directory.name:
        return None, "foreign entry (fingerprint of another build)"
    try:
        data = (directory / f"{digest}.o").read_bytes()
    except OSError as e:
        return None, f"missing object ({e.strerror})"
    if len(data) != meta.get("size"):
        return None, f"truncated object ({len(data)} of {meta.get('size')} bytes)"
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None, "corrupt object (checksum mismatch)"
    return meta, ""


def _remove(directory: Path, digest: str) -> None:
    """Delete an entry, manifest first (an object without a manifest is never loaded)."""
    for suffix in (".json", ".o"):
        (directory / f"{digest}{suffix}").unlink(missing_ok=True)


def _write_fingerprint_file(directory: Path) -> None:
    path = directory / "fingerprint.json"
    if not path.exists():
        _atomic_write(path, json.dumps(fingerprint_parts(), indent=1, sort_keys=True).encode())


def _store(entry: Entry, fn: Any, seconds: float) -> int:
    """Export ``fn`` and commit the entry (object, then manifest); returns the object's size."""
    _write_fingerprint_file(entry.directory)
    tmp = entry.directory / f".{entry.digest}.{os.getpid()}.tmp.o"  # export_to_c picks the format by suffix
    try:
        fn.export_to_c(str(tmp), function_name=entry.symbol)
        data = tmp.read_bytes()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, entry.object_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": ENTRY_FORMAT, "key": entry.key, "symbol": entry.symbol, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "compile_seconds": round(seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _atomic_write(entry.meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
    return len(data)


def _load_object(path: Path, symbol: str) -> Callable:
    import cutlass.cute as cute

    module = cute.runtime.load_module(str(path), enable_tvm_ffi=True)
    return getattr(module, symbol)


def _compile(spec: GemmSpec, config: KernelConfig) -> tuple[Callable, float]:
    from .compile import compile_gemm

    start = time.perf_counter()
    fn = compile_gemm(spec, config)
    return fn, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ API
def _load_verified(entry: Entry) -> tuple[Optional[Callable], str]:
    """Load the entry if it checks out: (fn, "") or (None, reason)."""
    meta, reason = _inspect(entry.directory, entry.digest, entry.key)
    if meta is None:
        return None, reason
    try:
        return _load_object(entry.object_path, entry.symbol), ""
    except Exception as e:  # noqa: BLE001 - any failure to link or look up means "rebuild"
        return None, f"object failed to load ({type(e).__name__})"


def get_or_compile(spec: GemmSpec, config: KernelConfig) -> tuple[Callable, str]:
    """The compiled function for (spec, config) and where it came from: "disk" or "compiled".

    Loads a verified entry; otherwise compiles under the key's lock (another process may have
    built it meanwhile) and exports the result. A cache that cannot be written is bypassed with a
    CacheWarning; an unusable entry is removed (CacheWarning) and rebuilt.
    """
    if not cache_enabled():
        return _compile(spec, config)[0], "compiled"
    entry = entry_for(spec, config)
    fn = None
    try:
        if entry.meta_path.exists():
            with _locked(entry.lock_path, exclusive=False):
                fn, _ = _load_verified(entry)
            if fn is not None:
                return fn, "disk"
        entry.directory.mkdir(parents=True, exist_ok=True)
        with _locked(entry.lock_path, exclusive=True):
            fn, reason = _load_verified(entry)
            if fn is not None:
                return fn, "disk"
            if reason != ABSENT:
                warnings.warn(f"cute-moe cache: removing {entry.meta_path}: {reason}; rebuilding", CacheWarning,
                              stacklevel=2)
                _remove(entry.directory, entry.digest)
            fn, seconds = _compile(spec, config)
            _store(entry, fn, seconds)
    except OSError as e:
        warnings.warn(f"cute-moe cache: {entry.directory} unusable ({e}); compiling without the disk cache",
                      CacheWarning, stacklevel=2)
        if fn is None:
            fn = _compile(spec, config)[0]
    return fn, "compiled"


def ensure(spec: GemmSpec, config: KernelConfig, root: Optional[Path] = None) -> BuildResult:
    """Make sure a verified entry for (spec, config) exists under ``root``, compiling it if needed."""
    entry = entry_for(spec, config, root)
    entry.directory.mkdir(parents=True, exist_ok=True)
    with _locked(entry.lock_path, exclusive=True):
        meta, reason = _inspect(entry.directory, entry.digest, entry.key)
        if meta is not None:
            return BuildResult("cached", meta.get("compile_seconds", 0.0), meta["size"])
        if reason != ABSENT:
            _remove(entry.directory, entry.digest)
        fn, seconds = _compile(spec, config)
        size = _store(entry, fn, seconds)
    return BuildResult("compiled" if reason == ABSENT else "rebuilt", seconds, size)


def _fingerprint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _FINGERPRINT_DIR.match(p.name))


def _object_count(directory: Path) -> int:
    return sum(1 for p in directory.glob("*.o") if not p.name.startswith("."))


def list_entries(root: Optional[Path] = None) -> tuple[list[dict], dict[str, int]]:
    """Manifest entries of this build (as written, unverified) and the object count of other builds."""
    root = root or cache_root()
    current = root / fingerprint()
    stale = {d.name: _object_count(d) for d in _fingerprint_dirs(root) if d != current}
    entries = []
    for path in sorted(current.glob("*.json")) if current.is_dir() else []:
        if not _ENTRY_FILE.match(path.name) or path.name.startswith("."):
            continue
        try:
            meta = json.loads(path.read_bytes())
        except (OSError, ValueError):
            meta = None
        entries.append({"digest": path.stem, **(meta if isinstance(meta, dict) else {})})
    return entries, stale


def verify(root: Optional[Path] = None) -> tuple[int, list[tuple[str, str]]]:
    """Check and load every entry of this build; remove what is unusable (and leftover temporaries).

    Returns the number of good entries and (file, reason) for each thing removed or skipped.
    """
    directory = (root or cache_root()) / fingerprint()
    if not directory.is_dir():
        return 0, []
    good, problems = 0, []
    digests = {m.group(1) for m in map(_ENTRY_FILE.match, (p.name for p in directory.iterdir())) if m}
    for digest in sorted(digests):
        try:
            with _locked(directory / f"{digest}.lock", exclusive=True, timeout=0):
                for tmp in directory.glob(f".{digest}.*"):
                    tmp.unlink()
                    problems.append((tmp.name, "leftover temporary file"))
                meta, reason = _inspect(directory, digest)
                if meta is not None:
                    try:
                        _load_object(directory / f"{digest}.o", _symbol(digest))
                        good += 1
                        continue
                    except Exception as e:  # noqa: BLE001 - any failure to link or look up
                        reason = f"object failed to load ({type(e).__name__})"
                if reason == ABSENT:
                    if not (directory / f"{digest}.o").exists():
                        continue  # only a lock file
                    reason = "object without a manifest entry"
                _remove(directory, digest)
                problems.append((digest, reason))
        except TimeoutError:
            problems.append((digest, "in use by another process, skipped"))
    return good, problems


def clear(root: Optional[Path] = None, stale_only: bool = False) -> int:
    """Delete the fingerprint directories under the root (only other builds' with ``stale_only``).

    Returns the number of objects deleted. Do not clear while another process compiles into it.
    """
    root = root or cache_root()
    removed = 0
    for directory in _fingerprint_dirs(root):
        if stale_only and directory.name == fingerprint():
            continue
        removed += _object_count(directory)
        shutil.rmtree(directory)
    return removed
