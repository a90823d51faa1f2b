"""Disk cache trust model and robustness (CPU only): ownership and modes, read-only trusted roots,
symlinks, FIFOs, directory-shaped entries, unusable directories, per-family keys, and stopping
``cute-moe precompile`` (its workers must die with it).

The tests run as root: root bypasses permission bits, so foreign owners are made with os.chown to
uid 65534, and what another user sees is run in a subprocess that drops to uid 65534 after its
imports (the interpreter may live under a home directory that uid cannot enter). One real
specialization is compiled per module; "compiling" is otherwise a stand-in handing it out.
"""

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from cute_moe import cache
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.specs import GemmSpec
from cute_moe.tools import cli, precompile

SPEC = GemmSpec("ragged", 256, 128)
CONFIG = KernelConfig(tile_m=64, tile_n=128)
OTHER_CONFIG = KernelConfig(tile_m=64, tile_n=64)
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="simulates other accounts with chown: needs root")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(a real compiled function of SPEC/CONFIG, a cache root holding its entry)."""
    from cute_moe.compile import compile_gemm

    fn = compile_gemm(SPEC, CONFIG)
    root = tmp_path_factory.mktemp("template") / "cache"
    cache.open_build_dir(root, create=True)
    cache._store(cache.entry_for(SPEC, CONFIG, root), fn, 1.0)
    return fn, root


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(cache, "_warned", set())
    monkeypatch.delenv("CUTE_MOE_CACHE", raising=False)
    monkeypatch.delenv(cache.TRUSTED_DIRS_ENV, raising=False)


@pytest.fixture
def root(compiled, tmp_path, monkeypatch):
    """A copy of the template cache, used as CUTE_MOE_CACHE_DIR."""
    target = tmp_path / "cache"
    shutil.copytree(compiled[1], target, symlinks=True)
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(target))
    return target


@pytest.fixture
def compiles(compiled, monkeypatch):
    """Compiling hands out the module's function; the list records each call."""
    calls = []

    def fake_compile(spec, config):
        calls.append(config)
        return compiled[0], 0.25

    monkeypatch.setattr(cache, "_compile", fake_compile)
    return calls


@pytest.fixture
def loads(monkeypatch):
    """The bytes of every object handed to load_module."""
    objects = []
    real = cache._load_object

    def recording_load(path, symbol):
        objects.append(Path(path).read_bytes())
        return real(path, symbol)

    monkeypatch.setattr(cache, "_load_object", recording_load)
    return objects


def _entry(root, config=CONFIG, spec=SPEC):
    return cache.entry_for(spec, config, root)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def _deadline(seconds=10):
    """Fail instead of hanging (a blocked open() is interrupted by the alarm's exception)."""
    def hung(signum, frame):
        raise AssertionError(f"hung for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _only_warning(record):
    messages = [str(w.message) for w in record if issubclass(w.category, cache.CacheWarning)]
    assert len(messages) == 1, messages
    return messages[0]


# ------------------------------------------------------------------------------------- permissions
def test_directories_0700_and_files_0600_whatever_the_umask(tmp_path, compiles, monkeypatch):
    root = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(root))
    previous = os.umask(0)
    try:
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
    finally:
        os.umask(previous)
    entry = _entry(root)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", root, entry.directory):
        assert _mode(directory) == 0o700, directory
    for path in entry.directory.iterdir():
        assert _mode(path) == 0o600, path
    assert {p.suffix for p in entry.directory.iterdir()} == {".o", ".json", ".lock"}


@pytest.mark.parametrize("damage,reason", [
    (lambda root: os.chown(root, NOBODY, NOBODY), "belongs to uid 65534"),
    (lambda root: os.chmod(root, 0o777), "writable by group or others"),
    (lambda root: os.chmod(root, 0o720), "writable by group or others"),
    (lambda root: os.chmod(_entry(root).directory, 0o707), "writable by group or others"),
    (lambda root: os.chown(_entry(root).directory, NOBODY, NOBODY), "belongs to uid 65534"),
])
def test_untrusted_directory_is_not_used_and_warns_once(root, compiles, loads, damage, reason):
    damage(root)
    before = sorted(p.name for p in _entry(root).directory.iterdir())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
        assert cache.get_or_compile(SPEC, OTHER_CONFIG)[1] == "compiled"
    message = _only_warning(record)
    assert reason in message and str(root) in message and "compiling without the disk cache" in message
    assert loads == [] and len(compiles) == 2
    assert sorted(p.name for p in _entry(root).directory.iterdir()) == before  # nothing written


@pytest.mark.parametrize("damage,reason", [
    (lambda e: os.chown(e.object_path, NOBODY, NOBODY), "belongs to uid 65534"),
    (lambda e: os.chown(e.meta_path, NOBODY, NOBODY), "belongs to uid 65534"),
    (lambda e: os.chmod(e.object_path, 0o620), "writable by group or others"),
    (lambda e: os.chmod(e.meta_path, 0o602), "writable by group or others"),
])
def test_untrusted_entry_is_not_loaded_then_rebuilt_or_removed_by_the_tools(root, compiles, loads, damage, reason):
    cache.ensure(SPEC, OTHER_CONFIG, root)
    entry, other = _entry(root), _entry(root, OTHER_CONFIG)
    damage(entry)
    damage(other)
    with pytest.warns(cache.CacheWarning, match=reason) as record:
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
    assert str(entry.directory) in str(record[0].message)
    assert loads == [] and len(compiles) == 2
    assert entry.meta_path.exists() and entry.object_path.exists()  # left alone by the library
    assert cache.ensure(SPEC, CONFIG, root).status == "rebuilt"  # precompile replaces it
    assert cache.ensure(SPEC, CONFIG, root).status == "cached"
    good, problems = cache.verify(root)  # verify removes it
    assert good == 1 and [digest for digest, why in problems if reason in why] == [other.digest]
    assert not other.meta_path.exists() and cache.get_or_compile(SPEC, CONFIG)[1] == "disk"


@pytest.mark.parametrize("mode,owner,trusted", [
    (0o1777, 0, True), (0o777, 0, False), (0o775, 0, False), (0o755, NOBODY, False), (0o755, 0, True),
])
def test_ancestors_are_checked_like_ssh_strict_modes(compiled, tmp_path, compiles, monkeypatch, mode, owner, trusted):
    ancestor = tmp_path / "shared"
    (ancestor / "me").mkdir(mode=0o755, parents=True)
    shutil.copytree(compiled[1], ancestor / "me" / "cache")
    os.chown(ancestor, owner, owner)
    os.chmod(ancestor, mode)
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(ancestor / "me" / "cache"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        source = cache.get_or_compile(SPEC, CONFIG)[1]
    if trusted:
        assert source == "disk" and not record
    else:
        assert source == "compiled" and f"its ancestor {ancestor}" in _only_warning(record)


# ------------------------------------------------------------------------------ symlinks and FIFOs
def test_symlinked_entry_files_are_not_followed(root, compiles, loads, tmp_path):
    entry = _entry(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (entry.object_path, entry.meta_path):  # a good entry, but reached through symlinks
        shutil.move(path, elsewhere / path.name)
        path.symlink_to(elsewhere / path.name)
    with pytest.warns(cache.CacheWarning, match="is a symbolic link"):
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
    assert loads == [] and not entry.meta_path.is_symlink() and not entry.object_path.is_symlink()
    assert cache.get_or_compile(SPEC, CONFIG)[1] == "disk"  # rebuilt as regular files
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([entry.object_path.name, entry.meta_path.name])


def test_lock_and_temporary_symlinks_create_nothing_where_they_point(root, compiles, tmp_path):
    entry = _entry(root, OTHER_CONFIG)
    lock_target, temp_target = tmp_path / "lock-target", tmp_path / "temp-target"
    entry.lock_path.symlink_to(lock_target)
    with pytest.warns(cache.CacheWarning, match="symbolic link"):
        assert cache.get_or_compile(SPEC, OTHER_CONFIG)[1] == "compiled"
    assert not lock_target.exists() and not entry.meta_path.exists()
    entry.lock_path.unlink()
    temp_target.write_bytes(b"victim")
    (entry.directory / f".{entry.digest}.{os.getpid()}.tmp.o").symlink_to(temp_target)
    (entry.directory / f".{entry.digest}.{os.getpid()}.tmp.json").symlink_to(temp_target)
    assert cache.ensure(SPEC, OTHER_CONFIG, root).status == "compiled"
    assert temp_target.read_bytes() == b"victim" and not entry.lock_path.is_symlink()


@pytest.mark.parametrize("suffix", [".o", ".json", ".lock"])
def test_fifo_entry_files_hang_nothing(root, compiles, suffix, capsys):
    entry = _entry(root)
    path = entry.directory / f"{entry.digest}{suffix}"
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    with _deadline(), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cache.get_or_compile(SPEC, CONFIG)[1] in ("disk", "compiled")
        assert cli.main(["cache", "ls", "--cache-dir", str(root)]) == 0
        cache.list_entries(root)
    path = entry.directory / ("e" * 32 + suffix)
    os.mkfifo(path)
    with _deadline():
        good, problems = cache.verify(root)
    assert good == 1 and [name for name, _ in problems if name.startswith("e" * 32)]
    assert not path.exists() or path.is_file()  # removed (a lock file is made anew)
    assert cache.verify(root) == (1, [])


def test_verify_checks_directory_shaped_entries_and_goes_on(root, compiles, capsys):
    cache.ensure(SPEC, OTHER_CONFIG, root)
    directory = _entry(root).directory
    for name in ("0" * 32 + ".o", "1" * 32 + ".json", "2" * 32 + ".lock", f".{'3' * 32}.77.tmp.o"):
        (directory / name).mkdir()
        (directory / name / "inner").write_text("x")
    assert cli.main(["cache", "verify", "--cache-dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 good entries, 4 problems" in out
    for text in ("0" * 32 + ": ", "1" * 32 + ": ", "2" * 32 + ".lock: lock file is not a regular file",
                 "leftover temporary file"):
        assert text in out
    assert cache.verify(root) == (2, [])


# ------------------------------------------------------------------------- read-only trusted roots
def test_listed_root_is_read_only(root, compiles, loads, monkeypatch):
    entry = _entry(root)
    entry.lock_path.unlink(missing_ok=True)
    monkeypatch.setenv(cache.TRUSTED_DIRS_ENV, os.pathsep.join(["/nonexistent", str(root)]))
    before = sorted(p.name for p in entry.directory.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache.CacheWarning)
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "disk"
        assert cache.get_or_compile(SPEC, OTHER_CONFIG)[1] == "compiled"  # a miss compiles in memory
    assert sorted(p.name for p in entry.directory.iterdir()) == before  # no lock, no entry written
    assert len(loads) == 1 and len(compiles) == 1
    with pytest.raises(cache.CacheDirError, match="read-only"):
        cache.ensure(SPEC, OTHER_CONFIG, root)
    os.chmod(root, 0o775)  # listed, but writable by its group: not trusted
    with pytest.warns(cache.CacheWarning, match="writable by group or others"):
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"


def test_verify_on_a_read_only_root_reports_and_removes_nothing(root, compiles, monkeypatch, capsys):
    cache.ensure(SPEC, OTHER_CONFIG, root)
    bad = _entry(root, OTHER_CONFIG)
    bad.object_path.write_bytes(b"\x7fELF damaged")
    (bad.directory / f".{bad.digest}.4242.tmp.o").write_bytes(b"partial")
    for lock in bad.directory.glob("*.lock"):
        lock.unlink()
    before = sorted(p.name for p in bad.directory.iterdir())
    monkeypatch.setenv(cache.TRUSTED_DIRS_ENV, str(root))
    assert cli.main(["cache", "verify", "--cache-dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "1 good entries, 2 problems" in out and out.count("(read-only cache: not removed)") == 2
    assert "truncated object" in out
    assert sorted(p.name for p in bad.directory.iterdir()) == before
    assert cli.main(["cache", "clear", "--cache-dir", str(root)]) == 2
    assert "read-only" in capsys.readouterr().err and sorted(p.name for p in bad.directory.iterdir()) == before


_AS_NOBODY = """
import json, os, sys, warnings
from pathlib import Path
from cute_moe import cache
from cute_moe.kernels.sm90.config import Sm90Config
from cute_moe.specs import GemmSpec
from cute_moe.tools import cli

real_load = cache._load_object


def load_with_root_libraries(path, symbol):
    # The loader looks up its runtime libraries under the interpreter's prefix, which may be unreadable to uid 65534.
    os.seteuid(0)
    try:
        return real_load(path, symbol)
    finally:
        os.seteuid(65534)


cache._load_object = load_with_root_libraries
cache._compile = lambda spec, config: (object(), 0.0)
spec, configs = GemmSpec("ragged", 256, 128), (Sm90Config(tile_m=64, tile_n=128), Sm90Config(tile_m=64, tile_n=64))
for config in configs:
    cache.entry_for(spec, config)  # reads the package metadata and kernel sources while still root
os.setgroups([])
os.setegid(65534)
os.seteuid(65534)
warnings.simplefilter("always")
out = {}
with warnings.catch_warnings(record=True) as record:
    out["load"], out["miss"] = (cache.get_or_compile(spec, config)[1] for config in configs)
out["warnings"] = [str(w.message) for w in record]
out["verify"] = cli.main(["cache", "verify", "--cache-dir", sys.argv[1]])
print(json.dumps(out))
"""


def _as_nobody(root, **env):
    """Run _AS_NOBODY on ``root`` as (effective) uid 65534; its JSON result and its other output."""
    result = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(root)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUTE_MOE_CACHE_DIR": str(root), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    *lines, last = result.stdout.strip().splitlines()
    return json.loads(last), "\n".join(lines)


@pytest.fixture
def shared_root(compiled):
    """A root-owned cache (0755 directories, 0644 files) that uid 65534 can read but not write."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    root = base / "cache"
    shutil.copytree(compiled[1], root)
    for path in (root, *root.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(base)


def test_other_users_cache_is_refused_unless_listed_then_read_only(shared_root):
    files = sorted(p.name for p in _entry(shared_root).directory.iterdir())
    out, _ = _as_nobody(shared_root)
    assert (out["load"], out["miss"]) == ("compiled", "compiled")
    assert len(out["warnings"]) == 1 and "belongs to uid 0, not to you" in out["warnings"][0]
    assert out["verify"] == 2

    bad = _entry(shared_root).directory / ("f" * 32 + ".o")
    bad.write_bytes(b"orphan")
    out, stdout = _as_nobody(shared_root, **{cache.TRUSTED_DIRS_ENV: str(shared_root)})
    assert (out["load"], out["miss"], out["warnings"]) == ("disk", "compiled", [])
    assert out["verify"] == 1 and "object without a manifest entry (read-only cache: not removed)" in stdout
    assert sorted(p.name for p in _entry(shared_root).directory.iterdir()) == sorted(files + [bad.name])


def test_own_cache_that_cannot_be_written_is_used_read_only(shared_root):
    for path in (shared_root, *shared_root.rglob("*")):
        os.chown(path, 65534, 65534)
        os.chmod(path, 0o500 if path.is_dir() else 0o400)
    bad = _entry(shared_root).directory / ("f" * 32 + ".o")
    os.chmod(bad.parent, 0o700)
    bad.write_bytes(b"orphan")
    os.chown(bad, 65534, 65534)
    os.chmod(bad.parent, 0o500)
    out, stdout = _as_nobody(shared_root)
    assert (out["load"], out["miss"], out["warnings"]) == ("disk", "compiled", [])  # used read-only
    assert out["verify"] == 1 and "(read-only cache: not removed)" in stdout and bad.exists()


# ---------------------------------------------------------------------------------- robustness
def test_bytes_checksummed_are_the_bytes_loaded(root, compiles, monkeypatch):
    entry = _entry(root)
    good = entry.object_path.read_bytes()
    seen = []
    real = cache._load_object

    def swap_then_load(path, symbol):
        entry.object_path.write_bytes(b"\x7fELF swapped after the checksum")
        seen.append(Path(path).read_bytes())
        return real(path, symbol)

    monkeypatch.setattr(cache, "_load_object", swap_then_load)
    assert cache.get_or_compile(SPEC, CONFIG)[1] == "disk"
    assert seen == [good]


def test_ensure_load_checks_before_reporting_cached(root, compiles, monkeypatch):
    monkeypatch.setattr(cache, "_load_object", lambda path, symbol: (_ for _ in ()).throw(RuntimeError("link")))
    assert cache.ensure(SPEC, CONFIG, root).status == "rebuilt"
    monkeypatch.undo()
    assert cache.ensure(SPEC, CONFIG, root).status == "cached"


def test_a_writer_taking_the_lock_removes_dead_writers_temporaries(root, compiles):
    entry = _entry(root, OTHER_CONFIG)
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_temp = entry.directory / f".{entry.digest}.{dead.pid}.tmp.o"
    live_temp = entry.directory / f".{entry.digest}.{os.getppid()}.tmp.json"
    dead_temp.write_bytes(b"partial")
    live_temp.write_bytes(b"partial")
    assert cache.ensure(SPEC, OTHER_CONFIG, root).status == "compiled"
    assert not dead_temp.exists() and live_temp.exists()
    dead_temp.write_bytes(b"partial")
    assert cache.get_or_compile(SPEC, OTHER_CONFIG)[1] == "disk"  # a reader takes no lock: left
    entry.object_path.unlink()
    with pytest.warns(cache.CacheWarning):
        assert cache.get_or_compile(SPEC, OTHER_CONFIG)[1] == "compiled"
    assert not dead_temp.exists()


def _unusable_paths(tmp_path):
    (tmp_path / "file").write_text("")
    return {"proc": Path("/proc/x"), "file": tmp_path / "file", "under a file": tmp_path / "file" / "cache"}


@pytest.mark.parametrize("case", ["proc", "file", "under a file"])
def test_unusable_directory_warns_once_per_root(tmp_path, compiles, monkeypatch, case):
    path = _unusable_paths(tmp_path)[case]
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for config in (CONFIG, OTHER_CONFIG, CONFIG):
            assert cache.get_or_compile(SPEC, config)[1] == "compiled"
    assert str(path) in _only_warning(record) and len(compiles) == 3


@pytest.mark.parametrize("case", ["proc", "file", "under a file", "group-writable"])
def test_commands_name_an_unusable_directory_in_one_line(tmp_path, capsys, monkeypatch, case):
    if case == "group-writable":
        path = tmp_path / "open"
        path.mkdir(mode=0o775)
        os.chmod(path, 0o775)
    else:
        path = _unusable_paths(tmp_path)[case]
    for action in ("ls", "verify", "clear"):
        assert cli.main(["cache", action, "--cache-dir", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and err[0].startswith(f"cute-moe cache {action}: ")
    monkeypatch.setattr(precompile, "build", lambda *args, **kwargs: pytest.fail("built into an unusable directory"))
    with pytest.raises(SystemExit) as info:
        cli.main(["precompile", "--model", "Qwen3-30B-A3B", "--kinds", "ragged", "--cache-dir", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and str(path) in err[0] and "Traceback" not in err[0]


# ------------------------------------------------------------------------------ per-family keys
@pytest.fixture
def two_families(tmp_path, monkeypatch):
    """Family "alpha" serves ragged specs, "beta" the others; each has one source file."""
    sources = {"alpha": tmp_path / "alpha.py", "beta": tmp_path / "beta.py"}
    for name, path in sources.items():
        path.write_text(f"{name} = 1\n")
    def kernel_family(spec):
        name = "alpha" if spec.kind == "ragged" else "beta"
        return name, [sources[name]]

    monkeypatch.setattr(cache, "kernel_family", kernel_family)
    cache._sources_digest.cache_clear()
    yield sources
    cache._sources_digest.cache_clear()


def test_editing_one_family_leaves_the_others_entries(root, compiles, two_families, capsys):
    beta_spec = GemmSpec("masked", 256, 128)
    for spec in (SPEC, beta_spec):
        assert cache.get_or_compile(spec, CONFIG)[1] == "compiled"
    alpha_old, beta = _entry(root), _entry(root, spec=beta_spec)
    two_families["alpha"].write_text("alpha = 2\n")
    cache._sources_digest.cache_clear()
    assert _entry(root).digest != alpha_old.digest and _entry(root, spec=beta_spec).digest == beta.digest
    assert cache.get_or_compile(beta_spec, CONFIG)[1] == "disk"
    entries, stale = cache.list_entries(root)
    assert {e["digest"] for e in entries} == {beta.digest} and stale == {beta.directory.name: 2}  # + the template's
    assert cli.main(["cache", "ls", "--cache-dir", str(root)]) == 0
    assert "stale: 2 entries of changed kernel sources" in capsys.readouterr().out
    assert cli.main(["cache", "clear", "--stale", "--cache-dir", str(root)]) == 0
    assert "removed 2 objects (stale only)" in capsys.readouterr().out
    assert not alpha_old.object_path.exists() and beta.object_path.exists()
    assert cache.list_entries(root) == ([e for e in entries], {})
    assert cache.get_or_compile(beta_spec, CONFIG)[1] == "disk"


def test_kernel_family_asks_the_arch_backend(monkeypatch, tmp_path):
    class Backend:
        @staticmethod
        def kernel_family(spec):
            return type("Family", (), {"name": f"fam_{spec.kind}", "sources": (tmp_path / "k.py",)})()

    monkeypatch.setattr(cache, "get_backend", lambda name: Backend)
    assert cache.kernel_family(SPEC) == ("fam_ragged", [tmp_path / "k.py"])


# ------------------------------------------------------------------------- stopping precompile
def _children(pid):
    """Live (non-zombie) processes whose parent is ``pid``."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(name))
    return found


def _workers(pid):
    """The children of ``pid`` that are multiprocessing workers."""
    found = []
    for child in _children(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def _alive(pid):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopping_precompile_stops_its_workers(tmp_path, sig):
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:
        cli_process = subprocess.Popen(
            [sys.executable, "-m", "cute_moe.tools.precompile", "--model", "DeepSeek-V3", "--ep", "8", "--jobs", "2",
             "--cache-dir", str(tmp_path / "cache")],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "CUTE_MOE_TUNED_TABLE": "off"})
    children = []
    try:
        deadline = time.monotonic() + 60
        while len(_workers(cli_process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # the workers are importing or compiling
        children = _children(cli_process.pid)  # the workers, and multiprocessing's resource tracker
        assert len(_workers(cli_process.pid)) == 2 and cli_process.poll() is None
        cli_process.send_signal(sig)
        status = cli_process.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if _alive(pid)]
    finally:
        for pid in [cli_process.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cli_process.wait()
    if sig == signal.SIGTERM:
        text = log.read_text()
        assert status == 128 + signal.SIGTERM and "Traceback" not in text
        assert text.strip().splitlines()[-1] == "cute-moe: terminated (SIGTERM); compile workers stopped"
