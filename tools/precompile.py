"""Fill the disk cache with every specialization the dispatcher can choose for a model's expert GEMMs.

Runs on any machine (no GPU needed): compiles in parallel worker processes started with the
``spawn`` method (each compiles for its spec's arch; no environment variable needed), exports each
object into the cache (see cute_moe.cache), prints progress and a table.

    cute-moe precompile --model DeepSeek-V3 --ep 8 --arch sm_90a --dtype bf16 --jobs 8
"""

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from cute_moe import cache
from cute_moe.arch import backend_for, get_backend, registered_archs
from cute_moe.dispatch import KINDS_WITH_ROW_HINT, buckets_between, format_config, problem_of, reachable_configs
from cute_moe.layouts.alignment import check_alignment, get_mk_alignment_for_contiguous_layout
from cute_moe.models import PRESETS, MoeModel, expected_rows, expert_gemms, get_preset, load_shapes, model_errors
from cute_moe.operands import PRECISIONS as OPERAND_PAIRS
from cute_moe.operands import Operand
from cute_moe.specs import ALIGNED_KINDS, GemmSpec

from .command import module_main, one_line


@dataclass(frozen=True)
class Precision:
    """Operand and output types of one --dtype and the MoE kinds of its expert GEMMs."""

    a: Operand
    b: Operand
    d_dtype: str
    kinds: tuple[str, ...]


# --dtype names (operand pairs of cute_moe.operands) and the MoE kinds of their expert GEMMs.
DTYPES = {
    "bf16": Precision(*OPERAND_PAIRS["bf16"], "bf16", ("contiguous", "psum", "masked", "ragged")),
    "fp8": Precision(*OPERAND_PAIRS["fp8"], "bf16", ("contiguous", "psum", "masked")),
    "fp8xfp4": Precision(*OPERAND_PAIRS["fp8xfp4"], "bf16", ("contiguous", "psum", "masked")),
    "bf16xfp4": Precision(*OPERAND_PAIRS["bf16xfp4"], "bf16", ("contiguous", "psum", "masked")),
}


def _available(precision: Precision) -> bool:
    """Whether the default arch's backend implements the precision's kinds."""
    try:
        for kind in precision.kinds:
            backend_for(None).check_spec(problem_of(kind, 256, 256, 1, 0, 128, a=precision.a, b=precision.b))
    except ValueError:
        return False
    return True


PRECISIONS = {name: p for name, p in DTYPES.items() if _available(p)}
PLANNED_ARCHS = {"sm_100a": "no SM100 kernels in this build"}
DEFAULT_MAX_TOKENS = 8192
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Task:
    """One specialization to build, and the model GEMMs that need it."""

    spec: GemmSpec
    config: Any
    uses: tuple[str, ...]


Outcome = Union[cache.BuildResult, str]  # a result, or the error message of a failed compile


def parse_csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_positive(option: str, value: Optional[int]) -> None:
    """Raise ValueError naming ``option`` unless value is None (not given) or >= 1."""
    if value is not None and value < 1:
        raise ValueError(f"{option}: expected >= 1, got {value}")


def parse_archs(text: str) -> tuple[str, ...]:
    """--arch: comma-separated archs that have kernels in this build."""
    archs = parse_csv(text)
    if not archs:
        raise ValueError("--arch: expected at least one arch, e.g. sm_90a")
    for arch in archs:
        supported = ", ".join(registered_archs())
        if arch in PLANNED_ARCHS and arch not in registered_archs():
            raise ValueError(f"--arch: {arch}: {PLANNED_ARCHS[arch]}; supported archs: {supported}")
        if arch not in registered_archs():
            raise ValueError(f"--arch: unknown arch {arch!r}; supported archs: {supported}")
    return tuple(dict.fromkeys(archs))


def parse_dtypes(text: str) -> tuple[str, ...]:
    """--dtype: comma-separated operand precisions that have kernels in this build."""
    dtypes = parse_csv(text)
    if not dtypes:
        raise ValueError(f"--dtype: expected at least one of {', '.join(PRECISIONS)}")
    for dtype in dtypes:
        if dtype in DTYPES and dtype not in PRECISIONS:
            raise ValueError(f"--dtype: {dtype} kernels not available in this build (available: "
                             f"{', '.join(PRECISIONS)})")
        if dtype not in PRECISIONS:
            raise ValueError(f"--dtype: unknown dtype {dtype!r} (available: {', '.join(PRECISIONS)})")
    return tuple(dict.fromkeys(dtypes))


def parse_kinds(text: Optional[str], dtypes: tuple[str, ...]) -> Optional[tuple[str, ...]]:
    """--kinds: a subset of the MoE kinds of the chosen dtypes (None: all of them)."""
    if text is None:
        return None
    offered = sorted({kind for dtype in dtypes for kind in PRECISIONS[dtype].kinds})
    return parse_subset("--kinds", text, offered)


def parse_subset(option: str, text: str, allowed: list[str]) -> tuple[str, ...]:
    """A comma-separated, non-empty list of kinds among ``allowed``; errors name ``option``."""
    kinds = parse_csv(text)
    for kind in kinds:
        if kind not in allowed:
            raise ValueError(f"{option}: unknown kind {kind!r} (expected among {', '.join(allowed)})")
    if not kinds:
        raise ValueError(f"{option}: expected at least one of {', '.join(allowed)}")
    return tuple(kinds)


def spec_for(kind: str, n: int, k: int, precision: Precision, arch: str, alignment: int) -> GemmSpec:
    """The static description of a GEMM launched as ``kind`` (psum specs carry the alignment)."""
    return GemmSpec(kind, n, k, precision.a, precision.b, precision.d_dtype, arch=arch,
                    alignment=alignment if kind == "psum" else 0)


def plan(models: list[MoeModel], *, archs: tuple[str, ...], dtypes: tuple[str, ...], ep: int = 1, tp: int = 1,
         kinds: Optional[tuple[str, ...]] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
         alignment: Optional[int] = None, num_sms: Optional[int] = None) -> list[Task]:
    """Every (spec, config) the dispatcher can choose for the models' expert GEMMs on one rank.

    N and K are static; the rows-per-group hint of hinted kinds (masked, contiguous, ragged) ranges
    over the buckets of expected_rows(model, tokens, ep) for tokens in [1, max_tokens] (contiguous: up
    to one alignment more, its padding), plus "no hint"; psum launches carry no hint. ``alignment``:
    contiguous-layout segment alignment (default: current).
    """
    check_positive("--max-tokens", max_tokens)
    check_positive("--num-sms", num_sms)
    alignment = (get_mk_alignment_for_contiguous_layout() if alignment is None
                 else check_alignment(alignment, "--alignment"))
    uses: dict[tuple[GemmSpec, Any], list[str]] = {}
    for model in models:
        with model_errors(model):
            fewest, most = expected_rows(model, 1, ep), expected_rows(model, max_tokens, ep)
            # A contiguous A holds each expert's rows padded to the alignment: its hint (rows per
            # group) exceeds the mean by less than the alignment.
            hints = {kind: (0,) + buckets_between(fewest, most + (alignment - 1 if kind == "contiguous" else 0))
                     for kind in KINDS_WITH_ROW_HINT}
            for gemm in expert_gemms(model, ep, tp):
                for arch in archs:
                    for dtype in dtypes:
                        precision = PRECISIONS[dtype]
                        for kind in precision.kinds:
                            if kinds is not None and kind not in kinds:
                                continue
                            spec = spec_for(kind, gemm.n, gemm.k, precision, arch, alignment)
                            configs = reachable_configs(
                                kind, gemm.n, gemm.k, gemm.num_groups,
                                hints.get(kind, (0,)),
                                alignment if kind in ALIGNED_KINDS else 0, arch=arch, a=precision.a, b=precision.b,
                                d_dtype=precision.d_dtype, num_sms=num_sms)
                            for config in configs:
                                uses.setdefault((spec, config), []).append(f"{model.name}/{gemm.name}")
    tasks = [Task(spec, config, tuple(dict.fromkeys(names))) for (spec, config), names in uses.items()]
    return sorted(tasks, key=lambda t: (t.spec.arch, t.spec.operands, t.spec.kind, t.spec.n, t.spec.k, t.config.key()))


def _build_one(root: str, spec: GemmSpec, config: Any) -> Outcome:
    """Worker: ensure one entry (an error comes back as its message)."""
    try:
        return cache.ensure(spec, config, Path(root))
    except Exception as e:  # noqa: BLE001 - reported per task, the other tasks go on
        return f"{type(e).__name__}: {one_line(str(e))[:400]}"


def _worker_init(parent: int) -> None:
    """Worker initializer: die with the parent even when it is killed outright (SIGKILL leaves it no
    chance to stop its pool): PR_SET_PDEATHSIG, plus a watchdog thread for what that misses (a
    parent that died before this ran)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


class _Terminated(Exception):
    """SIGTERM arrived while building."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While building, SIGTERM raises _Terminated (only the main thread can install the handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the tasks not started and kill the workers now (shutting down alone waits for them).
    The workers are this process's multiprocessing children."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in multiprocessing.active_children():
        process.kill()
        process.join()


def _build_all(batch: list[Task], root: Path, jobs: int, done: Callable[[Task, Outcome], None]) -> None:
    """Build the tasks in spawned workers (each compiles for its spec's arch, no environment needed);
    whatever interrupts it (SIGTERM, Ctrl-C, an error) stops the workers before it propagates."""
    pool = ProcessPoolExecutor(min(jobs, len(batch)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_build_one, str(root), t.spec, t.config): t for t in batch}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as e:  # noqa: BLE001 - a worker died (e.g. killed): report, go on
                outcome = f"{type(e).__name__}: worker process failed: {e}"
            done(futures[future], outcome)
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown()


def build(tasks: list[Task], root: Path, jobs: int,
          progress: Optional[Callable[[int, int, Task, Outcome], None]] = None) -> list[tuple[Task, Outcome]]:
    """Build the tasks' entries under ``root`` with ``jobs`` spawned worker processes.

    The workers die with this process; SIGTERM stops them and exits with status 143 and one line.
    """
    check_positive("--jobs", jobs)
    results: list[tuple[Task, Outcome]] = []

    def done(task: Task, outcome: Outcome) -> None:
        results.append((task, outcome))
        if progress is not None:
            progress(len(results), len(tasks), task, outcome)

    try:
        with _sigterm_raises():
            _build_all(tasks, root, jobs, done)
    except _Terminated:
        print("cute-moe: terminated (SIGTERM); compile workers stopped", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    order = {id(t): i for i, t in enumerate(tasks)}
    return sorted(results, key=lambda r: order[id(r[0])])


def describe_spec(spec: GemmSpec) -> str:
    return f"{spec.kind} {spec.operands}->{spec.d_dtype} n={spec.n} k={spec.k}"


def format_size(n: int) -> str:
    """Bytes as KiB or MiB."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_table(results: list[tuple[Task, Outcome]], wall_seconds: float) -> str:
    """The per-specialization table and the totals line."""
    header = ("kernel", "config", "arch", "status", "compile s", "size", "for")
    rows = []
    for task, outcome in results:
        ok = isinstance(outcome, cache.BuildResult)
        rows.append((describe_spec(task.spec), format_config(task.config), task.spec.arch,
                     outcome.status if ok else "FAILED", f"{outcome.seconds:.2f}" if ok else "-",
                     format_size(outcome.size) if ok else "-", ", ".join(task.uses)))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    done = [o for _, o in results if isinstance(o, cache.BuildResult)]
    count = {s: sum(o.status == s for o in done) for s in ("compiled", "rebuilt", "cached")}
    lines.append(f"totals: {len(results)} specializations, {count['compiled']} compiled, {count['rebuilt']} rebuilt, "
                 f"{count['cached']} cached, {len(results) - len(done)} failed; compile "
                 f"{sum(o.seconds for o in done if o.status != 'cached'):.1f} s, objects "
                 f"{format_size(sum(o.size for o in done))}, wall {wall_seconds:.1f} s")
    lines += [f"FAILED {describe_spec(t.spec)} {format_config(t.config)}: {o}"
              for t, o in results if not isinstance(o, cache.BuildResult)]
    return "\n".join(lines)


def model_help() -> str:
    """--model's help: the preset names."""
    return f"model preset name (case-insensitive): {', '.join(PRESETS)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=model_help())
    source.add_argument("--shapes", metavar="FILE",
                        help="JSON file: {name, hidden, moe_intermediate, experts, top_k} or a list of them")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (experts per rank = experts / ep)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks splitting moe_intermediate")
    parser.add_argument("--arch", default=",".join(registered_archs()),
                        help=f"comma-separated target archs (default: every registered arch: "
                        f"{', '.join(registered_archs())})")
    parser.add_argument("--dtype", default="bf16", help="comma-separated operand precisions (default bf16)")
    parser.add_argument("--kinds", help="comma-separated subset of contiguous,psum,masked,ragged (default: all)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"largest token count per rank per MoE layer (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--alignment", type=int, help="contiguous segment alignment (default: the library's, 128)")
    parser.add_argument("--num-sms", type=int, help="SM count the dispatcher assumes (default: the arch backend's, "
                        + ", ".join(f"{a}: {get_backend(a).default_num_sms}" for a in registered_archs()) + ")")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--cache-dir", help="cache root (default: CUTE_MOE_CACHE_DIR or the user cache dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the specializations, compile nothing")


def run(args: argparse.Namespace) -> int:
    """Plan, build, print; returns the exit status (1 when a compile failed). Bad input: ValueError,
    raised before anything is printed."""
    check_positive("--jobs", args.jobs)
    models = [get_preset(args.model)] if args.model else load_shapes(args.shapes)
    dtypes = parse_dtypes(args.dtype)
    tasks = plan(models, archs=parse_archs(args.arch), dtypes=dtypes, ep=args.ep, tp=args.tp,
                 kinds=parse_kinds(args.kinds, dtypes), max_tokens=args.max_tokens, alignment=args.alignment,
                 num_sms=args.num_sms)
    if args.dry_run:
        for task in tasks:
            print(f"{describe_spec(task.spec)}  {format_config(task.config)}  {task.spec.arch}  "
                  f"for {', '.join(task.uses)}")
        print(f"{len(tasks)} specializations")
        return 0
    if not cache.cache_enabled():
        raise ValueError("CUTE_MOE_CACHE: the disk cache is turned off; precompiling would fill nothing")
    try:  # before any work: one line naming an untrusted, unusable or read-only cache directory
        directory = cache.open_build_dir(Path(args.cache_dir).expanduser() if args.cache_dir else None,
                                         create=True, write=True)
    except cache.CacheDirError as e:
        raise ValueError(str(e)) from None
    root = directory.path.parent
    print(f"precompiling {len(tasks)} specializations into {directory.path} "
          f"with {min(args.jobs, len(tasks))} processes", file=sys.stderr)

    def progress(done: int, total: int, task: Task, outcome: Outcome) -> None:
        status = (f"{outcome.status} {outcome.seconds:.2f} s {format_size(outcome.size)}"
                  if isinstance(outcome, cache.BuildResult) else f"FAILED {outcome}")
        print(f"[{done}/{total}] {describe_spec(task.spec)} {format_config(task.config)} {task.spec.arch}: {status}",
              file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = build(tasks, root, args.jobs, progress)
    print(format_table(results, time.perf_counter() - start))
    return 0 if all(isinstance(o, cache.BuildResult) for _, o in results) else 1


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.precompile``: the same as ``cute-moe precompile``."""
    return module_main("precompile", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
