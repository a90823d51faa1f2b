"""Disk cache: manifest, fingerprint and invalidation, damaged entries, locking, off switch (CPU only).

One real specialization is compiled per session; tests that need "a compile" reuse that compiled
function through a counting stand-in for ``cache._compile``, so each test costs milliseconds.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from cute_moe import cache, runtime
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.specs import GemmSpec

SPEC = GemmSpec("ragged", 256, 128)
CONFIG = KernelConfig(tile_m=64, tile_n=128)
OTHER_CONFIG = KernelConfig(tile_m=64, tile_n=64)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(a real compiled function of SPEC/CONFIG, a cache root holding its verified entry)."""
    from cute_moe.compile import compile_gemm

    fn = compile_gemm(SPEC, CONFIG)
    root = tmp_path_factory.mktemp("template")
    cache.open_build_dir(root, create=True)
    cache._store(_entry(root), fn, 1.5)
    return fn, root


def _entry(root, config=CONFIG):
    return cache.entry_for(SPEC, config, root)


@pytest.fixture
def root(compiled, tmp_path, monkeypatch):
    """A cache root holding the template entry, used as CUTE_MOE_CACHE_DIR."""
    target = tmp_path / "cache"
    shutil.copytree(compiled[1], target)
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(target))
    monkeypatch.delenv("CUTE_MOE_CACHE", raising=False)
    return target


@pytest.fixture
def compiles(compiled, monkeypatch):
    """Replace compiling by handing out the session's compiled function; the list records each call."""
    calls = []

    def fake_compile(spec, config):
        calls.append((spec, config))
        return compiled[0], 0.25

    monkeypatch.setattr(cache, "_compile", fake_compile)
    return calls


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-directory / once-per-entry warnings afresh, and damages entries
    with files only their owner can write (else the trust check, not the damage, is reported)."""
    monkeypatch.setattr(cache, "_warned", set())
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture
def loads(monkeypatch):
    """Record the bytes of every object handed to load_module."""
    objects = []
    real = cache._load_object

    def recording_load(path, symbol):
        objects.append(open(path, "rb").read())
        return real(path, symbol)

    monkeypatch.setattr(cache, "_load_object", recording_load)
    return objects


def _checked(entry):
    """(manifest, object bytes) of an entry that checks out; raises otherwise."""
    return cache._checked_object(entry.directory, entry.digest, frozenset({os.geteuid()}), entry.key)


def test_manifest_entry_describes_the_object(root):
    entry = _entry(root)
    meta = json.loads(entry.meta_path.read_text())
    data = entry.object_path.read_bytes()
    assert meta["format"] == cache.ENTRY_FORMAT
    assert meta["key"] == entry.key
    assert meta["key"]["spec"]["n"] == 256 and meta["key"]["config"]["tile_n"] == 128
    assert meta["key"]["fingerprint"] == cache.fingerprint() == entry.directory.name
    assert meta["size"] == len(data) and data[:4] == b"\x7fELF"
    assert meta["compile_seconds"] == 1.5
    fingerprint = json.loads((entry.directory / "fingerprint.json").read_text())
    assert fingerprint == cache.fingerprint_parts()
    assert not [p for p in entry.directory.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_verified_entry_loads_without_a_gpu(root, compiles, loads):
    fn, source = cache.get_or_compile(SPEC, CONFIG)
    assert source == "disk" and callable(fn)
    assert compiles == [] and loads == [_entry(root).object_path.read_bytes()]


def test_runtime_counts_loads_and_compiles(root, compiles, monkeypatch):
    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "_counts", {"compiled": 0, "disk": 0})
    runtime.get_kernel(SPEC, CONFIG)
    runtime.get_kernel(SPEC, CONFIG)  # memory
    assert (runtime.compiled_count(), runtime.loaded_count()) == (0, 1)
    runtime.get_kernel(SPEC, OTHER_CONFIG)
    assert (runtime.compiled_count(), runtime.loaded_count()) == (1, 1)
    assert _entry(root, OTHER_CONFIG).meta_path.exists()  # exported for the next process
    runtime.clear_memory()
    runtime.get_kernel(SPEC, OTHER_CONFIG)
    assert (runtime.compiled_count(), runtime.loaded_count()) == (1, 2)


def _truncate(entry):
    entry.object_path.write_bytes(entry.object_path.read_bytes()[:4096])


def _flip_byte(entry):
    data = bytearray(entry.object_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.object_path.write_bytes(bytes(data))


def _garbage_manifest(entry):
    entry.meta_path.write_text('{"format": "cute-moe-cache-e')


def _foreign_manifest(entry):
    """Another key's manifest (and object) under this entry's name."""
    meta = json.loads(entry.meta_path.read_text())
    meta["key"] = {**meta["key"], "config": {**meta["key"]["config"], "tile_n": 64}}
    entry.meta_path.write_text(json.dumps(meta))


def _other_build(entry):
    """An entry whose key names another fingerprint, consistent with its own digest."""
    meta = json.loads(entry.meta_path.read_text())
    meta["key"] = {**meta["key"], "fingerprint": "0" * 16}
    digest = cache._digest(meta["key"])
    (entry.directory / f"{digest}.json").write_text(json.dumps(meta))
    shutil.copy(entry.object_path, entry.directory / f"{digest}.o")
    return digest


def _missing_object(entry):
    entry.object_path.unlink()


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "truncated object"), (_flip_byte, "checksum mismatch"), (_garbage_manifest, "unreadable manifest"),
    (_foreign_manifest, "foreign entry"), (_missing_object, "missing object"),
])
def test_damaged_entry_is_never_loaded_and_is_rebuilt(root, compiles, loads, damage, reason):
    entry = _entry(root)
    damage(entry)
    with pytest.warns(cache.CacheWarning, match=reason):
        fn, source = cache.get_or_compile(SPEC, CONFIG)
    assert source == "compiled" and callable(fn)
    assert compiles == [(SPEC, CONFIG)] and loads == []
    assert _checked(entry)[0]["size"] == entry.object_path.stat().st_size  # rebuilt, verified


def test_object_that_fails_to_link_is_rebuilt(root, compiles, monkeypatch):
    def failing_load(path, symbol):
        raise RuntimeError("link error")

    monkeypatch.setattr(cache, "_load_object", failing_load)
    with pytest.warns(cache.CacheWarning, match="failed to load"):
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
    assert len(compiles) == 1


def test_ensure_reports_cached_compiled_and_rebuilt(root, compiles):
    assert cache.ensure(SPEC, CONFIG, root).status == "cached"
    assert cache.ensure(SPEC, OTHER_CONFIG, root).status == "compiled"
    _truncate(_entry(root, OTHER_CONFIG))
    result = cache.ensure(SPEC, OTHER_CONFIG, root)
    assert result.status == "rebuilt" and result.size == _entry(root, OTHER_CONFIG).object_path.stat().st_size
    assert len(compiles) == 2


def test_key_follows_family_sources_and_fingerprint_follows_versions(tmp_path, monkeypatch):
    source = tmp_path / "kernel.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(cache, "kernel_family", lambda spec: ("family", [source]))

    def digest():
        cache._sources_digest.cache_clear()
        return _entry(tmp_path).digest

    first = digest()
    assert digest() == first
    source.write_text("x = 2\n")
    assert digest() != first
    directory = _entry(tmp_path).directory
    real_version = cache.importlib.metadata.version
    monkeypatch.setattr(cache.importlib.metadata, "version",
                        lambda name: "9.9.9" if name == "apache-tvm-ffi" else real_version(name))
    cache.fingerprint_parts.cache_clear()
    try:
        assert _entry(tmp_path).directory != directory
    finally:
        monkeypatch.undo()
        cache.fingerprint_parts.cache_clear()
        cache._sources_digest.cache_clear()


def test_real_fingerprint_is_build_facts_and_the_key_names_the_family():
    parts = cache.fingerprint_parts()
    assert set(parts) == {"layout", "nvidia-cutlass-dsl", "apache-tvm-ffi", "host"}
    assert parts["nvidia-cutlass-dsl"] == "4.8.1" and parts["apache-tvm-ffi"]
    name, sources = cache.kernel_family(SPEC)
    key = _entry(Path("/x")).key
    assert key["kernel"] == name and len(key["sources"]) == 32
    assert "grouped_gemm.py" in {p.name for p in sources} and all(p.is_file() for p in sources)


def test_new_fingerprint_is_a_clean_miss_and_old_builds_can_be_cleared(root, compiles, monkeypatch):
    old_dir = _entry(root).directory
    parts = {**cache.fingerprint_parts(), "sources": "changed"}
    monkeypatch.setattr(cache, "fingerprint_parts", lambda: parts)
    assert _entry(root).directory != old_dir
    assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
    entries, stale = cache.list_entries(root)
    assert len(entries) == 1 and stale == {old_dir.name: 1}
    assert cache.clear(root, stale_only=True) == 1
    assert not old_dir.exists() and _entry(root).meta_path.exists()
    assert cache.clear(root) == 1 and cache.list_entries(root) == ([], {})


def test_cache_off_switch_writes_nothing(tmp_path, compiles, monkeypatch):
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CUTE_MOE_CACHE", "0")
    assert cache.get_or_compile(SPEC, CONFIG)[1] == "compiled"
    assert not (tmp_path / "cache").exists() and len(compiles) == 1


def test_unwritable_cache_dir_falls_back_to_compiling(tmp_path, compiles, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.warns(cache.CacheWarning, match="compiling without the disk cache"):
        fn, source = cache.get_or_compile(SPEC, CONFIG)
    assert source == "compiled" and callable(fn) and len(compiles) == 1


def test_failed_export_leaves_no_entry_and_no_temporaries(root, compiled, monkeypatch):
    class HalfExport:
        def export_to_c(self, path, function_name):
            with open(path, "wb") as f:
                f.write(b"\x7fELF partial")
            raise RuntimeError("disk full")

    monkeypatch.setattr(cache, "_compile", lambda spec, config: (HalfExport(), 0.1))
    with pytest.raises(RuntimeError, match="disk full"):
        cache.ensure(SPEC, OTHER_CONFIG, root)
    entry = _entry(root, OTHER_CONFIG)
    leftovers = [p.name for p in entry.directory.iterdir() if entry.digest in p.name and p.suffix != ".lock"]
    assert leftovers == []


def test_verify_keeps_good_entries_and_removes_the_rest(root, compiles):
    cache.ensure(SPEC, OTHER_CONFIG, root)
    _flip_byte(_entry(root, OTHER_CONFIG))
    directory = _entry(root).directory
    stale_digest = _other_build(_entry(root))
    (directory / f".{_entry(root).digest}.123.tmp.o").write_bytes(b"partial")
    (directory / ("f" * 32 + ".o")).write_bytes(b"orphan")
    good, problems = cache.verify(root)
    reasons = dict(problems)
    assert good == 1
    assert "checksum mismatch" in reasons[_entry(root, OTHER_CONFIG).digest]
    assert "fingerprint of another build" in reasons[stale_digest]
    assert reasons["f" * 32] == "object without a manifest entry"
    assert any(reason == "leftover temporary file" for reason in reasons.values())
    assert cache.verify(root) == (1, [])
    assert _entry(root).meta_path.exists()


_WAITER = """
import sys, time
from pathlib import Path
from cute_moe import cache
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.specs import GemmSpec
spec, config = GemmSpec("ragged", 256, 128), KernelConfig(tile_m=64, tile_n=128)
print("ready", flush=True)
start = time.monotonic()
result = cache.ensure(spec, config, Path(sys.argv[1]))
print(result.status, time.monotonic() - start, flush=True)
"""


def test_second_process_waits_for_the_key_lock_and_compiles_nothing(compiled, tmp_path):
    """While this process holds a key's lock and builds it, another process asking for the key waits
    and then finds the entry: it must not compile it a second time."""
    entry = _entry(tmp_path)
    cache.open_build_dir(tmp_path, create=True)
    with cache._locked(entry.lock_path, exclusive=True):
        waiter = subprocess.Popen([sys.executable, "-c", _WAITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ))
        assert waiter.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        assert waiter.poll() is None  # still waiting for the lock
        cache._store(entry, compiled[0], 0.5)
    status, waited = waiter.stdout.readline().split()
    assert waiter.wait(timeout=60) == 0
    assert status == "cached" and float(waited) >= 1.0


def test_list_entries_reads_the_manifest(root):
    entries, stale = cache.list_entries(root)
    assert stale == {}
    assert [(e["digest"], e["key"]["config"]["tile_m"]) for e in entries] == [(_entry(root).digest, 64)]


def test_cache_root_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("CUTE_MOE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "cute-moe"
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_root() == tmp_path / "x"


def test_no_warnings_on_a_clean_hit(root, compiles):
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache.CacheWarning)
        assert cache.get_or_compile(SPEC, CONFIG)[1] == "disk"
