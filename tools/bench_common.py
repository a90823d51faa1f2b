"""Measurement pieces shared by the benchmark's sections: rows, interleaved CUDA-graph timing, inputs."""

import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import cute_moe

from .command import make_out_dir, require_gpu

L2_BYTES = 60 * 2**20
FP8_MAX = 448.0  # largest finite E4M3 value


@dataclass
class Row:
    kind: str
    shape: str
    ours_us: float
    base_us: float
    tflops: float
    gbps: float
    ratio: float
    diff: float
    baseline: str
    note: str = ""


def graph_of(launch: Callable[[int], object], num_sets: int) -> tuple[torch.cuda.CUDAGraph, int]:
    """Capture enough rotating launches that one replay lasts about 10 ms."""
    for i in range(num_sets):
        launch(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(num_sets):
        launch(i)
    end.record()
    end.synchronize()
    estimate_us = max(start.elapsed_time(end) * 1e3 / num_sets, 1.0)
    calls = max(num_sets, min(1000, math.ceil(10000 / estimate_us)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            launch(i % num_sets)
    graph.replay()
    return graph, calls


def time_pair(ours: Callable[[int], object], base: Callable[[int], object], num_sets: int,
              repeats: int = 20) -> tuple[float, float]:
    """Median microseconds per launch of ours and of the baseline, their graph replays interleaved so
    clock and thermal drift hit both alike."""
    graphs = [graph_of(ours, num_sets), graph_of(base, num_sets)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: list[list[float]] = [[], []]
    for _ in range(repeats):
        for which, (graph, calls) in enumerate(graphs):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples[which].append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples[0]), statistics.median(samples[1])


def sets_for(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(3 * L2_BYTES / bytes_per_set)))


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(torch.bfloat16)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 FP8 cast with scales in the kernel's MN-major layout (DeepSeek activation recipe)."""
    flat = x.reshape(-1, x.shape[-1])
    q, sf = cute_moe.per_token_cast_to_fp8(flat)
    return q.view(*x.shape), cute_moe.get_mn_major_tma_aligned_tensor(sf.view(*x.shape[:-1], sf.shape[-1]))


def rowwise_fp8(a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Operands of torch._scaled_grouped_mm's row-wise FP8 recipe: A [M, K] and W [G, N, K] cast to
    E4M3 with one FP32 scale per row of A and per row of each W (a column of B)."""
    a_amax = a.float().abs().amax(dim=1).clamp_min(1e-4)
    w_amax = w.float().abs().amax(dim=2).clamp_min(1e-4)
    a_row = (a.float() * (FP8_MAX / a_amax[:, None])).to(torch.float8_e4m3fn)
    w_row = (w.float() * (FP8_MAX / w_amax[:, :, None])).to(torch.float8_e4m3fn)
    return a_row, w_row, (a_amax / FP8_MAX).contiguous(), (w_amax / FP8_MAX).contiguous()


HEADER = ("| kind | shape | ours us | baseline us | TFLOPS | GB/s | ours/baseline speed | calc_diff | baseline | "
          "note |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: Row) -> str:
    return (f"| {r.kind} | {r.shape} | {r.ours_us:.1f} | {r.base_us:.1f} | {r.tflops:.0f} | {r.gbps:.0f} | "
            f"{r.ratio:.3f}x | {r.diff:.1e} | {r.baseline} | {r.note} |")


def add_arguments(parser, stem: str, quick: str) -> None:
    """A benchmark's options: ``--quick`` (help ``quick``) and ``--out`` (the folder for <stem>.md/.json)."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default="bench_results", help=f"folder for {stem}.md and .json")


def run_jobs(jobs: list[tuple[Callable[..., list[Row]], tuple]]) -> tuple[list[Row], list[str]]:
    """Run each ``(rows function, shape arguments)`` job, printing the table as its rows come; a job
    that raises is reported in one line on stderr and listed as a failure, the others still run."""
    rows, failures = [], []
    print(HEADER, flush=True)
    for fn, shape in jobs:
        print(f"{fn.__name__} {shape}", file=sys.stderr, flush=True)
        try:
            for row in fn(*shape):
                rows.append(row)
                print(format_row(row), flush=True)
        except Exception as e:  # noqa: BLE001 - one failed row is reported, the others still run
            report_failure(e, f"{fn.__name__} {shape}", failures)
        torch.cuda.empty_cache()
    return rows, failures


def report_failure(error: Exception, job: str, failures: list[str]) -> None:
    """A benchmark job that raised: one line on stderr (its error's type and first line), and
    ``"<job>: <error type>"`` appended to ``failures``."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    print(f"  skipped: {type(error).__name__}: {first_line}", file=sys.stderr, flush=True)
    failures.append(f"{job}: {type(error).__name__}")


def run_report(out: str, stem: str, title: str, jobs: list[tuple[Callable[..., list[Row]], tuple]]) -> int:
    """A benchmark's whole run: require a GPU, make ``out``, run the jobs (``run_jobs``) and write
    the report ``stem`` (``write_report``); returns 1 when a job failed, else 0."""
    require_gpu("benchmarking")
    make_out_dir(out)
    rows, failures = run_jobs(jobs)
    write_report(out, stem, title, rows, failures)
    return 1 if failures else 0


def write_report(out: str, stem: str, title: str, rows: list[Row], failures: list[str]) -> None:
    """``<out>/<stem>.md`` (the title, the table, the failed jobs) and ``<out>/<stem>.json`` (rows,
    failures, device name)."""
    lines = [f"# {title}", "", HEADER, *map(format_row, rows)]
    if failures:
        lines += ["", "Failed rows: " + "; ".join(failures)]
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"rows": [asdict(r) for r in rows], "failures": failures,
                   "device": torch.cuda.get_device_name()}, f, indent=1)
