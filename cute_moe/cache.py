"""Disk cache of compiled specializations (objects from ``export_to_c``, loaded with ``load_module``).

Layout under the cache root (CUTE_MOE_CACHE_DIR, default ``$XDG_CACHE_HOME/cute-moe`` or
``~/.cache/cute-moe``); directories are created 0700 and files 0600 whatever the umask::

    <fingerprint>/fingerprint.json   the build facts the fingerprint was computed from
    <fingerprint>/<digest>.o         the exported object (host code + embedded cubin)
    <fingerprint>/<digest>.json      its manifest entry: key, size, sha256, compile seconds
    <fingerprint>/<digest>.lock      per-key lock (flock): one process compiles a key, others wait

The fingerprint covers build facts only (layout version, nvidia-cutlass-dsl and apache-tvm-ffi,
host machine); ``digest`` hashes the key: kernel family, a digest of that family's sources, spec,
config, arch, fingerprint. Editing one family's sources therefore changes only its entries' names.

Trust (like ssh StrictModes): the root, its ancestors, the fingerprint directory and every entry
file must belong to this user (ancestors: or to root; group/other-writable ancestors need the sticky
bit) and must not be writable by group or others, else they are not used (CacheWarning, compile in
memory). A root listed in CUTE_MOE_TRUSTED_CACHE_DIRS may belong to another account; it is used
read-only. Files are opened with O_NOFOLLOW | O_NONBLOCK and must be regular; the object is hashed
from the bytes read and exactly those bytes are loaded, from a sealed memfd. See docs/cache.md.
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
import stat
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .arch import get_backend
from .specs import GemmSpec

ENTRY_FORMAT = "cute-moe-cache-entry"
LAYOUT_VERSION = 2
LOCK_TIMEOUT_S = 600.0
ABSENT = "absent"
TRUSTED_DIRS_ENV = "CUTE_MOE_TRUSTED_CACHE_DIRS"
_FINGERPRINT_DIR = re.compile(r"^[0-9a-f]{16}$")
_ENTRY_FILE = re.compile(r"^\.?([0-9a-f]{32})\.")  # <digest>.o/.json/.lock and .<digest>.* temporaries
_TEMP_FILE = re.compile(r"^\.[0-9a-f]{32}\.(\d+)\.tmp")  # .<digest>.<writer pid>.tmp.<suffix>
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no symlinks; a FIFO cannot block the open
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_PACKAGE_DIR = Path(__file__).resolve().parent
_warned: set[str] = set()


class CacheWarning(RuntimeWarning):
    """A cache directory or entry was not used (untrusted, damaged, unwritable) or was removed."""


class CacheDirError(Exception):
    """A cache directory that must not (or cannot) be used, and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cache directory {self.path}: {self.reason}"


class _Rejected(Exception):
    """Why an entry is not loaded; ``untrusted``: its files are not this user's or too permissive."""

    def __init__(self, reason: str, untrusted: bool = False):
        super().__init__(reason)
        self.reason, self.untrusted = reason, untrusted


@dataclass(frozen=True)
class BuildResult:
    """What ``ensure`` did for one key: status compiled / rebuilt / cached, seconds, object bytes."""

    status: str
    seconds: float
    size: int


@dataclass(frozen=True)
class CacheDir:
    """A checked cache directory: resolved path, whether this process may write it, trusted owners."""

    path: Path
    writable: bool
    owners: frozenset[int]


def cache_root() -> Path:
    """CUTE_MOE_CACHE_DIR, else the user's cache directory."""
    if os.environ.get("CUTE_MOE_CACHE_DIR"):
        return Path(os.environ["CUTE_MOE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cute-moe"


def cache_enabled() -> bool:
    """False when CUTE_MOE_CACHE is 0 / off / false / no."""
    return os.environ.get("CUTE_MOE_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def trusted_dirs() -> list[Path]:
    """Read-only roots the user opted into (CUTE_MOE_TRUSTED_CACHE_DIRS, os.pathsep-separated)."""
    text = os.environ.get(TRUSTED_DIRS_ENV, "")
    return [Path(os.path.realpath(Path(p).expanduser())) for p in text.split(os.pathsep) if p.strip()]


# ------------------------------------------------------------------------------ fingerprint and key
def kernel_family(spec: GemmSpec) -> tuple[str, list[Path]]:
    """(family name, its source files) of the kernel that serves ``spec``, from its arch backend."""
    family = get_backend(spec.arch).kernel_family(spec)
    return family.name, list(family.sources)


@lru_cache(maxsize=None)
def _sources_digest(paths: tuple[Path, ...]) -> str:
    """32 hex digits over the files' names and contents (read once per process)."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        digest.update(f"{path.parent.name}/{path.name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()[:32]


@lru_cache(maxsize=1)
def fingerprint_parts() -> dict[str, Any]:
    """The build facts every compiled object depends on (kernel sources are in each key)."""
    return {
        "layout": LAYOUT_VERSION,
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


def _family_key(spec: GemmSpec) -> dict[str, str]:
    """The key fields naming the kernel family of ``spec`` and the digest of its current sources."""
    family, sources = kernel_family(spec)
    return {"kernel": family, "sources": _sources_digest(tuple(sorted(sources)))}


def entry_for(spec: GemmSpec, config: Any, root: Optional[Path] = None) -> Entry:
    """The cache entry of (spec, config) for this build's fingerprint and its family's sources.

    ``config`` is the frozen dataclass config of the spec's arch backend.
    """
    fp = fingerprint()
    key = {**_family_key(spec), "spec": asdict(spec), "config": asdict(config), "arch": spec.arch,
           "fingerprint": fp}
    return Entry((root or cache_root()) / fp, key, _digest(key))


def _family_is_current(key: dict) -> bool:
    """Whether the key's family name and sources digest are still those of its spec's family."""
    try:
        current = _family_key(GemmSpec.from_dict(key["spec"]))
    except (KeyError, TypeError, ValueError):  # a spec this build no longer describes
        return False
    return all(key.get(name) == value for name, value in current.items())


# ------------------------------------------------------------------------------------------ trust
def _open_to_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _lstat(path: Path) -> Optional[os.stat_result]:
    """lstat, None when the path does not exist; other failures are CacheDirError."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheDirError(path, e.strerror) from None


def _check_ancestors(path: Path, owners: frozenset[int]) -> None:
    """StrictModes: every existing ancestor is a directory owned by ``owners`` or root, and only
    its owner can write it unless it has the sticky bit (like /tmp)."""
    for parent in reversed(path.parents):
        st = _lstat(parent)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise CacheDirError(path, f"{parent} is not a directory")
        if st.st_uid not in owners | {0}:
            raise CacheDirError(path, f"its ancestor {parent} belongs to uid {st.st_uid}")
        if _open_to_others(st) and not st.st_mode & stat.S_ISVTX:
            raise CacheDirError(path, f"its ancestor {parent} is writable by group or others "
                                      f"(mode {stat.S_IMODE(st.st_mode):04o}, no sticky bit)")


def _check_dir(path: Path, st: os.stat_result, owners: frozenset[int]) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(path, "not a directory")
    if st.st_uid not in owners:
        raise CacheDirError(path, f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); a read-only "
                                  f"cache of another account must be listed in {TRUSTED_DIRS_ENV}")
    if _open_to_others(st):
        raise CacheDirError(path, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                  "`chmod go-w` it, then `cute-moe cache clear`")


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 whatever the umask."""
    for directory in reversed([p for p in (path, *path.parents) if not os.path.lexists(p)]):
        try:
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)
        except FileExistsError:
            pass  # created concurrently: the caller checks it
        except OSError as e:
            raise CacheDirError(path, f"cannot create {directory} ({e.strerror})") from None


def open_root(root: Optional[Path] = None, create: bool = False) -> CacheDir:
    """Check a cache root (default cache_root()) and its ancestors; create it first when asked.

    A root of another account is usable only when listed in CUTE_MOE_TRUSTED_CACHE_DIRS, and a
    listed root is read-only (never created or written). Raises CacheDirError.
    """
    path = Path(os.path.realpath(root or cache_root()))
    listed = path in trusted_dirs()
    st = _lstat(path)
    owners = frozenset({os.geteuid()} | ({st.st_uid} if listed and st else set()))
    _check_ancestors(path, owners)
    if st is None:
        if not create or listed:
            raise CacheDirError(path, "does not exist")
        _make_private_dirs(path)
        return open_root(path)  # check what now exists (a sticky parent lets others race us)
    _check_dir(path, st, owners)
    return CacheDir(path, not listed, owners)


def open_build_dir(root: Optional[Path] = None, create: bool = False, write: bool = False) -> CacheDir:
    """The checked directory of this build's entries under a root (open_root; it may not exist yet).

    It is writable unless the root is a listed (trusted read-only) one or this user lacks write
    permission. ``create``: make it when possible; ``write``: a read-only directory is an error.
    """
    top = open_root(root, create=create)
    path = top.path / fingerprint()
    if _lstat(path) is None and create and top.writable and os.access(top.path, os.W_OK, effective_ids=True):
        _make_private_dirs(path)
    st = _lstat(path)
    if st is not None:
        _check_dir(path, st, top.owners)
    writable = top.writable and os.access(path if st else top.path, os.W_OK, effective_ids=True)
    if write and not writable:
        raise CacheDirError(top.path, "read-only: " + ("no write permission" if top.writable
                                                       else f"listed in {TRUSTED_DIRS_ENV}"))
    return CacheDir(path, writable, top.owners)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CacheWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ files
def _open_file(path: Path, flags: int, owners: Optional[frozenset[int]] = None) -> int:
    """Open a regular file without following symlinks (created 0600 with O_CREAT); with ``owners``,
    also check who can write it. Raises FileNotFoundError or _Rejected."""
    try:
        fd = os.open(path, flags | _OPEN, 0o600)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _Rejected(f"{path.name} is a symbolic link" if e.errno == errno.ELOOP
                        else f"{path.name}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _Rejected(f"{path.name} is not a regular file")
    if owners is not None and (st.st_uid not in owners or _open_to_others(st)):
        os.close(fd)
        who = f"belongs to uid {st.st_uid}, not to you" if st.st_uid not in owners else "is writable by group or others"
        raise _Rejected(f"{path} {who}", untrusted=True)
    return fd


def _read_file(path: Path, owners: frozenset[int]) -> bytes:
    with os.fdopen(_open_file(path, os.O_RDONLY, owners), "rb") as f:
        return f.read()


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """flock on ``path`` (released by the kernel if the holder dies); the lock file is a regular
    file, created 0600 without following symlinks. A shared lock that cannot be created (a cache
    this user cannot write) is skipped: nobody can rewrite such an entry under us."""
    try:
        fd = _open_file(path, os.O_RDWR | os.O_CREAT)
    except (OSError, _Rejected) as e:
        if exclusive:
            raise OSError(errno.EPERM, f"cannot lock {path}: {e}") from None
        yield
        return
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
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


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (O_EXCL, no symlink, mode 0600 whatever the umask) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(data)
        f.flush()
        os.fsync(fd)


def _atomic_write(path: Path, data: bytes, tmp: Path) -> None:
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_path(path: Path) -> None:
    """Remove a file, symlink, FIFO or directory tree (never following symlinks)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove(directory: Path, digest: str) -> None:
    """Delete an entry, manifest first (an object without a manifest is never loaded)."""
    for suffix in (".json", ".o"):
        if os.path.lexists(directory / f"{digest}{suffix}"):
            _remove_path(directory / f"{digest}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        return True
    return True


def _remove_dead_temporaries(directory: Path, digest: str) -> None:
    """With the key's lock held: remove temporaries of writers that died (or of this process)."""
    for path in directory.glob(f".{digest}.*"):
        match = _TEMP_FILE.match(path.name)
        if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
            _remove_path(path)


# ------------------------------------------------------------------------------------------ entries
def _read_manifest(directory: Path, digest: str, owners: frozenset[int],
                   expected_key: Optional[dict]) -> dict:
    """The manifest entry of ``digest`` if it is one and names itself; else _Rejected."""
    try:
        meta = json.loads(_read_file(directory / f"{digest}.json", owners))
    except FileNotFoundError:
        raise _Rejected(ABSENT) from None
    except (OSError, ValueError) as e:
        raise _Rejected(f"unreadable manifest entry ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ENTRY_FORMAT:
        raise _Rejected("not a cute-moe manifest entry")
    key = meta.get("key")
    if _digest(key) != digest or (expected_key is not None and key != expected_key):
        raise _Rejected("foreign entry (its key does not match its name)")
    if not isinstance(key, dict) or key.get("fingerprint") != directory.name:
        raise _Rejected("foreign entry (fingerprint of another build)")
    return meta


def _checked_object(directory: Path, digest: str, owners: frozenset[int],
                    expected_key: Optional[dict] = None) -> tuple[dict, bytes]:
    """(manifest entry, object bytes) when the entry is complete and is the one its name says."""
    meta = _read_manifest(directory, digest, owners, expected_key)
    try:
        data = _read_file(directory / f"{digest}.o", owners)
    except OSError as e:
        raise _Rejected(f"missing object ({e.strerror})") from None
    if len(data) != meta.get("size"):
        raise _Rejected(f"truncated object ({len(data)} of {meta.get('size')} bytes)")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise _Rejected("corrupt object (checksum mismatch)")
    return meta, data


def _load_bytes(data: bytes, symbol: str) -> Callable:
    """Load exactly ``data`` (already checked): it goes through a sealed memfd, so no file that
    anyone could swap or rewrite between the checksum and the load is read a second time."""
    fd = os.memfd_create(f"cute-moe-{symbol}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return _load_object(Path(f"/proc/self/fd/{fd}"), symbol)
    finally:
        os.close(fd)


def _load_checked(directory: Path, digest: str, owners: frozenset[int],
                  expected_key: Optional[dict] = None) -> tuple[dict, Callable]:
    """(manifest entry, loaded function) of a checked entry; else _Rejected."""
    meta, data = _checked_object(directory, digest, owners, expected_key)
    try:
        return meta, _load_bytes(data, _symbol(digest))
    except Exception as e:  # noqa: BLE001 - any failure to link or look up means "rebuild"
        raise _Rejected(f"object failed to load ({type(e).__name__})") from None


def _write_fingerprint_file(directory: Path) -> None:
    path = directory / "fingerprint.json"
    if not os.path.lexists(path):
        data = json.dumps(fingerprint_parts(), indent=1, sort_keys=True).encode()
        _atomic_write(path, data, directory / f".fingerprint.json.{os.getpid()}.tmp")


def _export(entry: Entry, fn: Any) -> bytes:
    """Export ``fn`` into the entry's object file (via a private temporary); returns its bytes."""
    tmp = entry.directory / f".{entry.digest}.{os.getpid()}.tmp.o"  # export_to_c picks the format by suffix
    try:
        _write_new(tmp, b"")  # claim the name 0600; export_to_c rewrites the file in place
        fn.export_to_c(str(tmp), function_name=entry.symbol)
        with os.fdopen(_open_file(tmp, os.O_RDWR), "rb") as f:
            os.fchmod(f.fileno(), 0o600)
            data = f.read()
            os.fsync(f.fileno())
        os.replace(tmp, entry.object_path)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def _store(entry: Entry, fn: Any, seconds: float) -> int:
    """Export ``fn`` and commit the entry (object, then manifest); returns the object's size."""
    _write_fingerprint_file(entry.directory)
    data = _export(entry, fn)
    meta = {"format": ENTRY_FORMAT, "key": entry.key, "symbol": entry.symbol, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "compile_seconds": round(seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _atomic_write(entry.meta_path, json.dumps(meta, indent=1, sort_keys=True).encode(),
                  entry.directory / f".{entry.digest}.{os.getpid()}.tmp.json")
    return len(data)


def _load_object(path: Path, symbol: str) -> Callable:
    import cutlass.cute as cute

    module = cute.runtime.load_module(str(path), enable_tvm_ffi=True)
    return getattr(module, symbol)


def _compile(spec: GemmSpec, config: Any) -> tuple[Callable, float]:
    from .compile import compile_gemm

    start = time.perf_counter()
    fn = compile_gemm(spec, config)
    return fn, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ API
def _read_entry(entry: Entry, owners: frozenset[int], shared_lock: bool) -> tuple[Optional[Callable], _Rejected]:
    """(function, _Rejected("")) for a good entry, else (None, why it was not loaded)."""
    try:
        with _locked(entry.lock_path, exclusive=False) if shared_lock else contextlib.nullcontext():
            return _load_checked(entry.directory, entry.digest, owners, entry.key)[1], _Rejected("")
    except _Rejected as e:
        return None, e


def _build_entry(spec: GemmSpec, config: Any, entry: Entry, owners: frozenset[int]) -> tuple[Callable, str]:
    """Under the key's exclusive lock: load what another process built meanwhile, or compile and
    export (a damaged entry is removed first, with a CacheWarning; an untrusted one is left alone)."""
    with _locked(entry.lock_path, exclusive=True):
        _remove_dead_temporaries(entry.directory, entry.digest)
        fn, problem = _read_entry(entry, owners, shared_lock=False)
        if fn is not None:
            return fn, "disk"
        if problem.untrusted:
            _warn_once(f"cute-moe cache: not loading {entry.meta_path}: {problem.reason}; compiling in memory")
            return _compile(spec, config)[0], "compiled"
        if problem.reason != ABSENT:
            _warn_once(f"cute-moe cache: removing {entry.meta_path}: {problem.reason}; rebuilding")
            _remove(entry.directory, entry.digest)
        fn, seconds = _compile(spec, config)
        try:
            _store(entry, fn, seconds)
        except OSError as e:
            _warn_once(f"cute-moe cache: cannot write {entry.directory} ({e}); not caching")
    return fn, "compiled"


def get_or_compile(spec: GemmSpec, config: Any) -> tuple[Callable, str]:
    """The compiled function for (spec, config) and where it came from: "disk" or "compiled".

    Loads a checked entry; otherwise compiles under the key's lock (another process may have built
    it meanwhile) and exports the result. An untrusted or unusable cache directory or entry is not
    used: one CacheWarning per directory or entry, and the function is compiled in memory. A
    read-only (trusted) root is never written: a miss compiles in memory.
    """
    if not cache_enabled():
        return _compile(spec, config)[0], "compiled"
    try:
        directory = open_build_dir(create=True)
    except CacheDirError as e:
        _warn_once(f"cute-moe cache: {e}; compiling without the disk cache")
        return _compile(spec, config)[0], "compiled"
    entry = entry_for(spec, config, directory.path.parent)
    try:
        fn, problem = _read_entry(entry, directory.owners, shared_lock=directory.writable)
        if fn is not None:
            return fn, "disk"
        if directory.writable and not problem.untrusted:
            return _build_entry(spec, config, entry, directory.owners)
    except OSError as e:
        _warn_once(f"cute-moe cache: {entry.directory} unusable ({e}); compiling without the disk cache")
        return _compile(spec, config)[0], "compiled"
    if problem.reason != ABSENT:
        _warn_once(f"cute-moe cache: not loading {entry.meta_path}: {problem.reason}; compiling in memory")
    return _compile(spec, config)[0], "compiled"


def ensure(spec: GemmSpec, config: Any, root: Optional[Path] = None) -> BuildResult:
    """Make sure a checked entry that loads exists for (spec, config) under ``root``, compiling it if
    needed ("compiled"; "rebuilt" when a damaged, unloadable or untrusted entry was replaced).
    Raises CacheDirError when the root is untrusted, unusable or read-only."""
    directory = open_build_dir(root, create=True, write=True)
    entry = entry_for(spec, config, directory.path.parent)
    with _locked(entry.lock_path, exclusive=True):
        _remove_dead_temporaries(entry.directory, entry.digest)
        try:
            meta, _ = _load_checked(entry.directory, entry.digest, directory.owners, entry.key)
            return BuildResult("cached", meta.get("compile_seconds", 0.0), meta["size"])
        except _Rejected as e:
            reason = e.reason
        if reason != ABSENT:
            _remove(entry.directory, entry.digest)
        fn, seconds = _compile(spec, config)
        size = _store(entry, fn, seconds)
    return BuildResult("compiled" if reason == ABSENT else "rebuilt", seconds, size)


def _fingerprint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if _FINGERPRINT_DIR.match(p.name) and stat.S_ISDIR(p.lstat().st_mode))


def _object_count(directory: Path) -> int:
    return sum(1 for p in directory.glob("*.o") if not p.name.startswith("."))


def _manifests(directory: CacheDir) -> Iterator[tuple[str, Optional[dict]]]:
    """(digest, parsed manifest or None when unreadable) for each manifest file of a build directory."""
    if not os.path.isdir(directory.path):
        return
    for path in sorted(directory.path.glob("*.json")):
        if not _ENTRY_FILE.match(path.name) or path.name.startswith("."):
            continue
        try:
            meta = json.loads(_read_file(path, directory.owners))
        except (OSError, ValueError, _Rejected):
            meta = None
        yield path.stem, meta if isinstance(meta, dict) else None


def _is_stale(meta: Optional[dict]) -> bool:
    """A readable entry whose kernel family's sources changed (no request of this build finds it)."""
    return meta is not None and isinstance(meta.get("key"), dict) and not _family_is_current(meta["key"])


def list_entries(root: Optional[Path] = None) -> tuple[list[dict], dict[str, int]]:
    """Manifest entries of this build (as written, unchecked; unreadable ones as a bare digest) and
    stale object counts: per other build directory, and under this build's own fingerprint the
    entries of outdated kernel sources. Raises CacheDirError."""
    directory = open_build_dir(root)
    stale = {d.name: _object_count(d) for d in _fingerprint_dirs(directory.path.parent) if d != directory.path}
    entries, outdated = [], 0
    for digest, meta in _manifests(directory):
        if _is_stale(meta):
            outdated += 1
        else:
            entries.append({"digest": digest, **(meta or {})})
    if outdated:
        stale[directory.path.name] = outdated
    return entries, stale


def _check_lock_file(path: Path, writable: bool) -> list[tuple[str, str]]:
    """Report (and in a writable cache remove) a lock file that is not a regular file."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            return []
    except FileNotFoundError:
        return []
    if writable:
        _remove_path(path)
        return [(path.name, "lock file is not a regular file (removed)")]
    return [(path.name, "lock file is not a regular file (read-only cache: not removed)")]


def _sweep_temporaries(directory: Path, digest: str, writable: bool) -> list[tuple[str, str]]:
    """Report (and, under the key's lock, remove) the key's leftover temporary files."""
    found = []
    for path in sorted(directory.glob(f".{digest}.*")):
        if writable:
            _remove_path(path)
        found.append((path.name, "leftover temporary file" + ("" if writable else " (read-only cache: not removed)")))
    return found


def _entry_problem(directory: CacheDir, digest: str) -> Optional[str]:
    """Why the entry cannot be used (None: it checks out and loads; ABSENT: only a lock file)."""
    try:
        _load_checked(directory.path, digest, directory.owners)
        return None
    except _Rejected as e:
        if e.reason == ABSENT and os.path.lexists(directory.path / f"{digest}.o"):
            return "object without a manifest entry"
        return e.reason


def _verify_entry(directory: CacheDir, digest: str) -> tuple[bool, list[tuple[str, str]]]:
    """(good, problems) of one key; in a writable cache the key's lock is taken and bad files removed."""
    writable = directory.writable
    problems: list[tuple[str, str]] = []
    try:
        lock_path = directory.path / f"{digest}.lock"
        problems += _check_lock_file(lock_path, writable)
        with _locked(lock_path, exclusive=True, timeout=0) if writable else contextlib.nullcontext():
            problems += _sweep_temporaries(directory.path, digest, writable)
            reason = _entry_problem(directory, digest)
            if reason in (None, ABSENT):
                return reason is None, problems
            if writable:
                _remove(directory.path, digest)
            problems.append((digest, reason + ("" if writable else " (read-only cache: not removed)")))
    except TimeoutError:
        problems.append((digest, "in use by another process, skipped"))
    except OSError as e:
        problems.append((digest, f"could not check or remove it ({e})"))
    return False, problems


def verify(root: Optional[Path] = None) -> tuple[int, list[tuple[str, str]]]:
    """Check and load every entry of this build; in a cache this process can write, remove what is
    unusable (and leftover temporaries), else only report it.

    Returns the number of good entries and (file, reason) for each thing removed, reported or
    skipped. Raises CacheDirError for an untrusted or unusable root.
    """
    directory = open_build_dir(root)
    if not os.path.isdir(directory.path):
        return 0, []
    names = (p.name for p in directory.path.iterdir())
    good, problems = 0, []
    for digest in sorted({m.group(1) for m in map(_ENTRY_FILE.match, names) if m}):
        ok, found = _verify_entry(directory, digest)
        good += ok
        problems += found
    return good, problems


def _clear_stale_entries(directory: CacheDir) -> int:
    """Delete this build's entries of outdated kernel sources; returns how many."""
    stale = [digest for digest, meta in _manifests(directory) if _is_stale(meta)]
    for digest in stale:
        _remove(directory.path, digest)
        (directory.path / f"{digest}.lock").unlink(missing_ok=True)
    return len(stale)


def clear(root: Optional[Path] = None, stale_only: bool = False) -> int:
    """Delete the fingerprint directories under the root; with ``stale_only``, only other builds'
    directories and this build's entries of outdated kernel sources.

    Returns the number of objects deleted. Do not clear while another process compiles into it.
    Raises CacheDirError for an untrusted, unusable or read-only root.
    """
    directory = open_build_dir(root, write=True)
    removed = 0
    for path in _fingerprint_dirs(directory.path.parent):
        if stale_only and path == directory.path:
            removed += _clear_stale_entries(directory)
            continue
        removed += _object_count(path)
        shutil.rmtree(path)
    return removed
