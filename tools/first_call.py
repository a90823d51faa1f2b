"""First-call latency of one shape (GPU): empty cache, from the disk cache, from memory, warm.

Each disk-cache measurement runs in a fresh process (as a new server process would): the first with
an empty cache directory (compile + export), the second on the filled one (load_module). Inside the
second, the shape is then called again after dropping the per-shape launch table (its kernel is in
memory) and finally timed warm. Latency = host wall time of the call plus a device synchronize.

    python -m cute_moe.tools.first_call [--kind masked] [--n 4096] [--k 7168] [--groups 8] [--rows 64]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

from .command import OneLineParser, call_handler, require_gpu

TARGET_DISK_MS = 50.0


def _call(args: argparse.Namespace) -> Callable[[], None]:
    """The public op of ``args.kind`` on random inputs of ``args.rows`` rows per group."""
    import torch

    import cute_moe
    from cute_moe.layouts.alignment import align

    g, m, n, k = args.groups, args.rows, args.n, args.k
    w = torch.randn(g, n, k, device="cuda").to(torch.bfloat16)
    if args.kind == "masked":
        a = torch.randn(g, m, k, device="cuda").to(torch.bfloat16)
        d = torch.empty(g, m, n, device="cuda", dtype=torch.bfloat16)
        counts = torch.full((g,), m, device="cuda", dtype=torch.int32)
        return lambda: cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, counts, m)
    seg = align(m, cute_moe.get_mk_alignment_for_contiguous_layout())
    if args.kind == "contiguous":
        a = torch.randn(g * seg, k, device="cuda").to(torch.bfloat16)
        d = torch.empty(g * seg, n, device="cuda", dtype=torch.bfloat16)
        layout = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(seg)
        return lambda: cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, layout)
    a = torch.randn(g * m, k, device="cuda").to(torch.bfloat16)
    offs = torch.arange(1, g + 1, device="cuda", dtype=torch.int32) * m
    return lambda: cute_moe.grouped_mm(a, w.transpose(1, 2), offs)


def _timed_ms(call: Callable[[], None]) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def child(args: argparse.Namespace) -> dict:
    """One fresh process: first call, then (phase disk) memory and warm timings."""
    import torch

    from cute_moe import launcher, runtime

    call = _call(args)
    start = time.perf_counter()
    import cutlass.cute  # noqa: F401  (import cute_moe leaves the DSL to the first compile or load)

    dsl_import_ms = (time.perf_counter() - start) * 1e3
    result = {"first_ms": _timed_ms(call), "compiled": runtime.compiled_count(), "loaded": runtime.loaded_count(),
              "dsl_import_ms": dsl_import_ms}
    if args.phase == "disk":
        launcher.clear_launches()  # the next call finds the kernel in runtime's memory
        result["memory_ms"] = _timed_ms(call)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                call()
            samples.append((time.perf_counter() - start) * 1e6 / 200)
            torch.cuda.synchronize()
        result["warm_us"] = statistics.median(samples)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """Parse the arguments and run; errors end as one line (see command.call_handler)."""
    parser = OneLineParser(prog="python -m cute_moe.tools.first_call", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("masked", "contiguous", "ragged"), default="masked")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="rows per group (masked: also expected_m)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("--phase", choices=("cold", "disk"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("n", "k", "groups", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    return call_handler(parser.prog, run, args)


def run(args: argparse.Namespace) -> int:
    """Check for a GPU, then time the phases in fresh processes (or, in one, time its phase)."""
    require_gpu("timing first calls")
    if args.phase:
        print(json.dumps(child(args)))
        return 0
    forwarded = [f"--kind={args.kind}", f"--n={args.n}", f"--k={args.k}", f"--groups={args.groups}",
                 f"--rows={args.rows}", *(["--debug"] if args.debug else [])]
    results = {}
    with tempfile.TemporaryDirectory(prefix="cute-moe-first-call-") as cache_dir:
        env = {**os.environ, "CUTE_MOE_CACHE_DIR": cache_dir, "CUTE_MOE_CACHE": "1"}
        for phase in ("cold", "disk"):
            proc = subprocess.run([sys.executable, "-m", "cute_moe.tools.first_call", f"--phase={phase}",
                                   *forwarded], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr.strip(), file=sys.stderr)
                return proc.returncode
            results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
    cold, disk = results["cold"], results["disk"]
    print(f"{args.kind} n={args.n} k={args.k} groups={args.groups} rows={args.rows}")
    print(f"  DSL import (once per process, before the first call): {disk['dsl_import_ms']:.0f} ms")
    print(f"  empty cache (compile + export): {cold['first_ms']:8.1f} ms  (compiled {cold['compiled']})")
    verdict = "ok" if disk["first_ms"] <= TARGET_DISK_MS else "OVER TARGET"
    print(f"  from disk (load_module):        {disk['first_ms']:8.1f} ms  (loaded {disk['loaded']}, compiled "
          f"{disk['compiled']}; target <= {TARGET_DISK_MS:.0f} ms: {verdict})")
    print(f"  from memory (new launch entry): {disk['memory_ms']:8.2f} ms")
    print(f"  warm call (host):               {disk['warm_us']:8.1f} us")
    return 0 if disk["compiled"] == 0 and disk["loaded"] == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
