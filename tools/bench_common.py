"""Measurement pieces shared by the benchmark's sections: rows, interleaved CUDA-graph timing, inputs."""

import functools
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import cute_moe

from .command import make_out_dir, require_gpu
from .gpu_telemetry import Sample, sample, summarize

L2_BYTES = 60 * 2**20
FP8_MAX = 448.0  # largest finite E4M3 value
# Dense tensor-core FLOPs per SM per clock, by compute capability and operand type (H100 / H200 WGMMA:
# 989 TFLOPS BF16 at 1830 MHz over 132 SMs).
TENSOR_FLOPS_PER_SM_CLOCK = {(9, 0): {"bf16": 4096, "fp8": 8192}}
READ_BYTES = 2**30  # buffer of the DRAM read-rate measurement (many times the L2)


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
    sm_mhz: float = 0.0  # median SM clock while ours ran (0: not read)
    base_sm_mhz: float = 0.0  # the same while the baseline ran
    watts: float = 0.0  # median board power while ours ran
    power_capped: float = 0.0  # share of ours' samples whose clock the power cap held down
    thermal: float = 0.0  # share of ours' samples whose clock heat (or a hardware slowdown) held down
    roofline: float = 0.0  # ours' share of its ceiling at that clock (0: unknown)
    bound: str = ""  # the ceiling: "tensor" (FLOPs at the clock) or "memory" (bytes at the read rate)


@dataclass(frozen=True)
class Roofline:
    """A device's ceilings: dense tensor FLOPs per SM clock over all SMs (per operand type), and the
    DRAM read rate measured on it (bytes per second)."""

    flops_per_clock: dict[str, float]
    read_bytes_per_s: float

    def ceiling(self, operand: str, flops: float, bytes_moved: float, sm_mhz: float) -> tuple[float, str]:
        """Microseconds of the work at the higher of the two ceilings (tensor at ``sm_mhz``, memory at
        the read rate), and which one it is."""
        tensor_us = flops / (self.flops_per_clock[operand] * sm_mhz)
        memory_us = bytes_moved / self.read_bytes_per_s * 1e6
        return (tensor_us, "tensor") if tensor_us >= memory_us else (memory_us, "memory")


@functools.lru_cache(maxsize=None)
def device_roofline(device_index: int) -> Optional[Roofline]:
    """The ceilings of a device this module knows the tensor rate of (else ``None``); the read rate is
    measured on the first call (a graph of reductions over 1 GiB run by the SMs, median of five
    replays; a graph-captured 1 GiB device-to-device copy measured only 2.7 TB/s read plus written on an
    H200, likely a copy engine's rate rather than the SMs')."""
    properties = torch.cuda.get_device_properties(device_index)
    per_sm = TENSOR_FLOPS_PER_SM_CLOCK.get((properties.major, properties.minor))
    if per_sm is None:
        return None
    with torch.cuda.device(device_index):
        src = torch.zeros(READ_BYTES // 4, dtype=torch.float32, device="cuda")
        graph, calls = graph_of(lambda _: src.amax(), 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        seconds = []
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3 / calls)
    return Roofline({operand: rate * properties.multi_processor_count for operand, rate in per_sm.items()},
                    READ_BYTES / statistics.median(seconds))


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
              repeats: int = 20, telemetry: Optional[tuple[list, list]] = None) -> tuple[float, float]:
    """Median microseconds per launch of ours and of the baseline, their graph replays interleaved so
    clock and thermal drift hit both alike. ``telemetry``: two lists that receive a clock / power
    ``Sample`` (or ``None``) taken during each replay of ours and of the baseline."""
    graphs = [graph_of(ours, num_sets), graph_of(base, num_sets)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: list[list[float]] = [[], []]
    for _ in range(repeats):
        for which, (graph, calls) in enumerate(graphs):
            start.record()
            graph.replay()
            end.record()
            if telemetry is not None:  # the replay runs on while the host reads the clock
                telemetry[which].append(sample())
            end.synchronize()
            samples[which].append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples[0]), statistics.median(samples[1])


def timed_row(kind: str, shape: str, ours: Callable[[int], object], base: Callable[[int], object], num_sets: int,
              flops: float, bytes_moved: float, diff: float, baseline: str, note: str = "",
              operand: str = "bf16") -> Row:
    """Time ours against the baseline (``time_pair``) and make their row: speed from ``flops`` and
    ``bytes_moved`` (the bytes the problem must move), the clock and power while each ran, and ours'
    share of its roofline at its clock (``operand``: "bf16" or "fp8" tensor rate)."""
    telemetry: tuple[list[Optional[Sample]], list[Optional[Sample]]] = ([], [])
    t_ours, t_base = time_pair(ours, base, num_sets, telemetry=telemetry)
    row = Row(kind, shape, t_ours, t_base, flops / t_ours / 1e6, bytes_moved / t_ours / 1e3, t_base / t_ours, diff,
              baseline, note)
    mine, theirs = summarize(telemetry[0]), summarize(telemetry[1])
    if theirs is not None:
        row.base_sm_mhz = theirs.sm_mhz
    if mine is not None:
        row.sm_mhz, row.watts = mine.sm_mhz, mine.watts
        row.power_capped, row.thermal = mine.power_capped, mine.thermal
        roofline = device_roofline(torch.cuda.current_device())
        if roofline is not None:
            ceiling_us, row.bound = roofline.ceiling(operand, flops, bytes_moved, mine.sm_mhz)
            row.roofline = ceiling_us / t_ours
    return row


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
          "note | SM MHz ours / base, W, power-capped | of roofline |\n" + "|---" * 12 + "|")


def format_row(r: Row) -> str:
    clock = (f"{r.sm_mhz:.0f} / {r.base_sm_mhz:.0f}, {r.watts:.0f} W, {r.power_capped:.0%}" if r.sm_mhz else "—")
    if r.thermal:
        clock += f", thermal {r.thermal:.0%}"
    roofline = f"{r.roofline:.0%} {r.bound}" if r.roofline else "—"
    return (f"| {r.kind} | {r.shape} | {r.ours_us:.1f} | {r.base_us:.1f} | {r.tflops:.0f} | {r.gbps:.0f} | "
            f"{r.ratio:.3f}x | {r.diff:.1e} | {r.baseline} | {r.note} | {clock} | {roofline} |")


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
