"""Benchmark the MoE training layer (cute_moe.moe) against the torch._grouped_mm layer on one GPU.

    python3 -m cute_moe.tools.bench_moe_layer --out DIR [--quick] [--shapes NAMES] [--tokens T]
    cute-moe bench-layer --out DIR [--quick]

Contenders, the same data in the same process: ours (``cute_moe.moe``); the reference, the layer as
torch users write it (tools/grouped_mm_moe.py: torchtitan's permutation by argsort + index ops,
torch._grouped_mm for both GEMMs, SwiGLU in torch, FP32-weighted scatter_add combine, autograd
through torch), eager; and the reference under ``torch.compile`` (default mode, dynamic shapes,
compiled once per run during warm-up: compile time not timed).

Per shape: forward (the forward of a training step: inputs require grad, autograd records) and
forward + backward (gradients of x, topk_weights, w13, w2 for a fixed random output gradient), each
timed as CUDA graphs after warm-up (a contender whose capture fails is timed eagerly with events and
the row says so), median of interleaved replays, inputs rotated past L2; TFLOPS count
2 * slots * (H * 2I + I * H) per forward and three times that for forward + backward. Memory, one
eager forward + backward per contender: the peak allocated above what was held before (weights,
inputs), the memory held after the forward (output + what autograd saved) and the bytes autograd
saves per token (distinct storages, the inputs and weights not counted; tools/autograd_memory.py).
The largest calc_diff of ours against the reference (output and the four gradients) is reported.

Shapes (``SHAPES``): OLMoE-1B-7B (T=32768), Qwen3-30B-A3B (T=32768), gpt-oss-120b (T=16384) and
DeepSeek-V3 EP8-local (32 of its 256 experts, top-8 over them, T=16384); ``--tokens`` sets T for all.
Routing: a random softmax top-k router with uneven expert popularity (the logit bias of
bench_presets), the last expert never chosen (an expert with 0 tokens in every run).
Writes layer_bench.md and layer_bench.json to --out. --quick: OLMoE-1B-7B and DeepSeek-V3-EP8 with
fewer replays, 2 to 3 minutes on a fresh machine (mostly compiling: torch.compile of the reference,
about a minute, and our kernels); the full run 4 to 5 minutes.
"""

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import cute_moe
from cute_moe.models import PRESETS
from cute_moe.testing import calc_diff

from . import bench_common
from .autograd_memory import MemoryUse, cuda_memory_use, saved_tensor_bytes
from .bench_common import graph_of, sets_for
from .bench_presets import POPULARITY_SPREAD
from .command import make_out_dir, module_main, require_gpu
from .grouped_mm_moe import BF16_GROUP_ALIGNMENT, grouped_mm_moe

REPORT_STEM = "layer_bench"
REPEATS = 20  # interleaved replays per contender (median)
QUICK_REPEATS = 10
EMPTY_EXPERTS = 1  # the last experts get a -inf logit bias: no token is routed to them
SEED = 0
MIB = 2**20
GRADIENTS = ("x", "topk_weights", "w13", "w2")


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer problem: T tokens routed top-k over E (local) experts of hidden H, intermediate I."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    tokens: int

    @property
    def label(self) -> str:
        return (f"{self.name} T={self.tokens} E={self.experts} H={self.hidden} I={self.intermediate} "
                f"k={self.top_k}")


def _preset_shape(name: str, preset: str, tokens: int, ep: int = 1) -> LayerShape:
    """A preset's layer with experts / ep local experts (top-k over them)."""
    model = PRESETS[preset]
    return LayerShape(name, model.hidden, model.moe_intermediate, model.experts // ep, model.top_k, tokens)


SHAPES: dict[str, LayerShape] = {s.name: s for s in (
    LayerShape("OLMoE-1B-7B", 2048, 1024, 64, 8, 32768),
    _preset_shape("Qwen3-30B-A3B", "Qwen3-30B-A3B", 32768),
    _preset_shape("gpt-oss-120b", "gpt-oss-120b", 16384),
    _preset_shape("DeepSeek-V3-EP8", "DeepSeek-V3", 16384, ep=8),
)}
QUICK_SHAPES = ("OLMoE-1B-7B", "DeepSeek-V3-EP8")


def select_shapes(names: Optional[str], quick: bool, tokens: Optional[int]) -> list[LayerShape]:
    """The shapes of a run: ``names`` (comma-separated, case-insensitive, or "all"; default: all, or the
    quick pair with ``quick``), each with ``tokens`` tokens when given."""
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens: expected >= 1, got {tokens}")
    if names is None:
        chosen = list(QUICK_SHAPES if quick else SHAPES)
    elif names.strip().lower() == "all":
        chosen = list(SHAPES)
    else:
        by_lower = {name.lower(): name for name in SHAPES}
        chosen = []
        for part in names.split(","):
            if part.strip().lower() not in by_lower:
                raise ValueError(f"--shapes: unknown shape {part.strip()!r}; expected among {', '.join(SHAPES)} "
                                 f"or all")
            chosen.append(by_lower[part.strip().lower()])
    shapes = [SHAPES[name] for name in dict.fromkeys(chosen)]
    if tokens is not None:
        shapes = [LayerShape(s.name, s.hidden, s.intermediate, s.experts, s.top_k, tokens) for s in shapes]
    return shapes


def layer_flops(routed_slots: int, hidden: int, intermediate: int, backward: bool) -> int:
    """FLOPs of the two expert GEMMs, 2 * slots * (H * 2I + I * H); forward + backward is three times
    the forward (each GEMM's input gradient and weight gradient cost one forward GEMM each)."""
    forward = 2 * routed_slots * (hidden * 2 * intermediate + intermediate * hidden)
    return 3 * forward if backward else forward


def route(tokens: int, experts: int, top_k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx int32 [T, k], topk_weights fp32 [T, k]) of a softmax top-k router over random logits
    plus a per-expert popularity bias (uneven loads); the last ``EMPTY_EXPERTS`` experts get none."""
    if top_k > experts - EMPTY_EXPERTS:
        raise ValueError(f"top_k: expected <= {experts - EMPTY_EXPERTS} (experts that receive tokens), got {top_k}")
    bias = torch.randn(experts, generator=generator) * POPULARITY_SPREAD
    bias[experts - EMPTY_EXPERTS:] = float("-inf")
    logits = torch.randn(tokens, experts, generator=generator) + bias
    weights, idx = torch.softmax(logits, dim=1).topk(top_k, dim=1)
    return idx.to(torch.int32), weights


@dataclass
class InputSet:
    """One rotating set of a layer's token inputs (leaves requiring grad) and output gradient."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    grad_out: torch.Tensor

    def forward(self, layer: "Layer", w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return layer(self.x, self.topk_idx, self.topk_weights, w13, w2)

    def gradients(self, out: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradients of x, topk_weights, w13 and w2 for the output gradient ``grad_out``."""
        return torch.autograd.grad(out, (self.x, self.topk_weights, w13, w2), self.grad_out)


Layer = Callable[..., torch.Tensor]


def make_inputs(shape: LayerShape, generator: torch.Generator) -> tuple[list[InputSet], torch.Tensor, torch.Tensor]:
    """(rotating input sets, w13 [E, 2I, H], w2 [E, H, I]): bf16 weights scaled by 1/sqrt(fan-in),
    every floating tensor a leaf that requires grad."""
    s = shape
    num_sets = sets_for(2 * s.tokens * s.hidden * 2)
    sets = []
    for _ in range(num_sets):
        idx, weights = route(s.tokens, s.experts, s.top_k, generator)
        sets.append(InputSet(bench_common.randn(s.tokens, s.hidden).requires_grad_(True), idx.cuda(),
                             weights.cuda().requires_grad_(True), bench_common.randn(s.tokens, s.hidden)))
    w13 = (bench_common.randn(s.experts, 2 * s.intermediate, s.hidden) * s.hidden ** -0.5).requires_grad_(True)
    w2 = (bench_common.randn(s.experts, s.hidden, s.intermediate) * s.intermediate ** -0.5).requires_grad_(True)
    return sets, w13, w2


def step_launch(layer: Layer, sets: list[InputSet], w13: torch.Tensor, w2: torch.Tensor,
                backward: bool) -> Callable[[int], object]:
    """launch(i): the layer's forward on set i, and with ``backward`` the four gradients."""
    def launch(i: int):
        out = sets[i].forward(layer, w13, w2)
        return sets[i].gradients(out, w13, w2) if backward else out
    return launch


def outputs_and_gradients(layer: Layer, s: InputSet, w13: torch.Tensor, w2: torch.Tensor) -> list[torch.Tensor]:
    """[out, d x, d topk_weights, d w13, d w2] of one forward + backward."""
    out = s.forward(layer, w13, w2)
    return [out.detach(), *s.gradients(out, w13, w2)]


@dataclass
class Timed:
    """A contender ready to time: ``replay()`` runs ``calls`` launches; ``mode`` says how."""

    replay: Callable[[], object]
    calls: int
    mode: str


def prepare_timing(launch: Callable[[int], object], num_sets: int) -> Timed:
    """A CUDA graph of rotating launches (bench_common's); if the capture fails, eager launches."""
    try:
        graph, calls = graph_of(launch, num_sets)
        return Timed(graph.replay, calls, "graph")
    except Exception as e:  # noqa: BLE001 - a capture that fails is timed eagerly, the row says so
        torch.cuda.synchronize()  # raises if the device itself is broken, not only the capture

        def replay():
            for i in range(num_sets):
                launch(i)
        return Timed(replay, num_sets, f"eager (graph capture failed: {type(e).__name__})")


def time_interleaved(timers: dict[str, Timed], repeats: int) -> dict[str, float]:
    """Median microseconds per launch of each contender, their replays interleaved so clock and
    thermal drift hit all alike."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timed in timers.items():
            start.record()
            timed.replay()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / timed.calls)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class TimingRow:
    shape: str
    step: str  # "fwd" or "fwd+bwd"
    ours_us: float
    reference_us: float
    compiled_us: Optional[float]
    ours_tflops: float
    reference_tflops: float
    compiled_tflops: Optional[float]
    vs_reference: float  # reference time / ours: > 1 is ours faster
    vs_compiled: Optional[float]
    note: str = ""


@dataclass
class MemoryRow:
    shape: str
    ours_peak_mib: float
    reference_peak_mib: float
    compiled_peak_mib: Optional[float]
    peak_ratio: float  # ours / reference
    ours_held_mib: float
    reference_held_mib: float
    compiled_held_mib: Optional[float]
    ours_saved_bytes_per_token: float
    reference_saved_bytes_per_token: float
    saved_ratio: float  # ours / reference
    max_calc_diff: float  # ours against the reference: output and the four gradients, the largest
    note: str = ""


def _warm_up(layers: dict[str, Layer], sets: list[InputSet], w13, w2, notes: list[str]) -> dict[str, list]:
    """One forward + backward of each contender on set 0 (compiles our kernels and the compiled
    reference); a compiled reference that fails is dropped from ``layers`` with a note."""
    results = {}
    for name in list(layers):
        try:
            results[name] = outputs_and_gradients(layers[name], sets[0], w13, w2)
        except Exception as e:  # noqa: BLE001 - only the optional compiled baseline may fail and be dropped
            if name != "compiled":
                raise
            del layers[name]
            reason = str(e).splitlines()[0][:120] if str(e) else ""
            notes.append(f"compiled reference failed: {type(e).__name__}: {reason}")
    torch.cuda.synchronize()
    return results


def _mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / MIB


def measure_memory(shape: LayerShape, layers: dict[str, Layer], s: InputSet, w13, w2, diff: float,
                   note: str) -> MemoryRow:
    """Peak and held memory of one eager forward + backward of each contender, saved bytes per token."""
    use: dict[str, MemoryUse] = {}
    for name, layer in layers.items():
        use[name] = cuda_memory_use(lambda: s.forward(layer, w13, w2), lambda out: s.gradients(out, w13, w2))
    saved = {}
    for name in ("ours", "reference"):
        saved[name], out = saved_tensor_bytes(lambda: s.forward(layers[name], w13, w2),
                                              exclude=(s.x, s.topk_idx, s.topk_weights, w13, w2))
        del out
    compiled = use.get("compiled")
    return MemoryRow(shape.label, _mib(use["ours"].peak), _mib(use["reference"].peak),
                     _mib(compiled.peak if compiled else None), use["ours"].peak / use["reference"].peak,
                     _mib(use["ours"].held), _mib(use["reference"].held), _mib(compiled.held if compiled else None),
                     saved["ours"] / shape.tokens, saved["reference"] / shape.tokens,
                     saved["ours"] / saved["reference"], diff, note)


def measure_times(shape: LayerShape, layers: dict[str, Layer], sets: list[InputSet], w13, w2, backward: bool,
                  repeats: int, note: str) -> TimingRow:
    """Forward (or forward + backward) time of each contender: graphs captured one after the other,
    then their replays interleaved; the row's note names any contender timed eagerly."""
    timers = {name: prepare_timing(step_launch(layer, sets, w13, w2, backward), len(sets))
              for name, layer in layers.items()}
    times = time_interleaved(timers, repeats)
    modes = [f"{name}: {t.mode}" for name, t in timers.items() if t.mode != "graph"]
    del timers
    torch.cuda.empty_cache()
    flops = layer_flops(shape.tokens * shape.top_k, shape.hidden, shape.intermediate, backward)
    compiled = times.get("compiled")
    return TimingRow(shape.label, "fwd+bwd" if backward else "fwd", times["ours"], times["reference"], compiled,
                     flops / times["ours"] / 1e6, flops / times["reference"] / 1e6,
                     flops / compiled / 1e6 if compiled else None, times["reference"] / times["ours"],
                     compiled / times["ours"] if compiled else None, "; ".join(modes + [note] if note else modes))


def bench_shape(shape: LayerShape, layers: dict[str, Layer], repeats: int,
                progress: Callable[[str], None]) -> tuple[list[TimingRow], MemoryRow]:
    """Warm-up and accuracy, memory, then forward and forward + backward timing of one shape."""
    sets, w13, w2 = make_inputs(shape, torch.Generator().manual_seed(SEED))
    layers = dict(layers)
    notes: list[str] = []
    progress("warm-up (the first call of a shape compiles our kernels; the compiled reference compiles once)")
    results = _warm_up(layers, sets, w13, w2, notes)
    diff = max(calc_diff(a, b) for a, b in zip(results["ours"], results["reference"]))
    del results
    note = "; ".join(notes)
    progress("memory")
    memory = measure_memory(shape, layers, sets[0], w13, w2, diff, note)
    rows = []
    for backward in (False, True):
        progress(f"timing {'fwd+bwd' if backward else 'fwd'}")
        rows.append(measure_times(shape, layers, sets, w13, w2, backward, repeats, note))
    return rows, memory


def _f(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TIMING_HEADER = ("| shape | pass | ours us | reference us | compiled ref us | ours TFLOPS | ref TFLOPS | "
                 "compiled TFLOPS | speedup vs ref | speedup vs compiled | note |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|")
MEMORY_HEADER = ("| shape | ours peak MiB | ref peak MiB | compiled peak MiB | ours/ref peak | ours held MiB | "
                 "ref held MiB | compiled held MiB | ours saved B/token | ref saved B/token | ours/ref saved | "
                 "max calc_diff | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def timing_line(r: TimingRow) -> str:
    return (f"| {r.shape} | {r.step} | {r.ours_us:.1f} | {r.reference_us:.1f} | {_f(r.compiled_us, '.1f')} | "
            f"{r.ours_tflops:.0f} | {r.reference_tflops:.0f} | {_f(r.compiled_tflops, '.0f')} | "
            f"{r.vs_reference:.2f}x | {_f(r.vs_compiled, '.2f')}{'x' if r.vs_compiled else ''} | {r.note} |")


def memory_line(r: MemoryRow) -> str:
    return (f"| {r.shape} | {r.ours_peak_mib:.0f} | {r.reference_peak_mib:.0f} | {_f(r.compiled_peak_mib, '.0f')} | "
            f"{r.peak_ratio:.2f} | {r.ours_held_mib:.0f} | {r.reference_held_mib:.0f} | "
            f"{_f(r.compiled_held_mib, '.0f')} | {r.ours_saved_bytes_per_token:.0f} | "
            f"{r.reference_saved_bytes_per_token:.0f} | {r.saved_ratio:.2f} | {r.max_calc_diff:.1e} | {r.note} |")


def write_report(out: str, settings: dict, timing: list[TimingRow], memory: list[MemoryRow],
                 failures: list[str], device: str) -> None:
    """``<out>/layer_bench.md`` (settings, the timing and memory tables, failed shapes) and
    ``<out>/layer_bench.json`` (the same as data)."""
    lines = ["# MoE layer: cute_moe.moe against the torch._grouped_mm reference layer", "",
             f"GPU: {device}. " + "; ".join(f"{k}: {v}" for k, v in settings.items()), "",
             "## Time (CUDA graphs, median of interleaved replays; speedup = reference time / ours)", "",
             TIMING_HEADER, *map(timing_line, timing), "",
             "## Memory (one eager forward + backward; peak and held above the memory before the forward; "
             "saved = bytes autograd keeps for backward per token, inputs and weights not counted)", "",
             MEMORY_HEADER, *map(memory_line, memory)]
    if failures:
        lines += ["", "Failed shapes: " + "; ".join(failures)]
    with open(os.path.join(out, f"{REPORT_STEM}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"{REPORT_STEM}.json"), "w") as f:
        json.dump({"settings": settings, "timing": [asdict(r) for r in timing], "memory": [asdict(r) for r in memory],
                   "failures": failures, "device": device}, f, indent=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_common.add_arguments(parser, REPORT_STEM, f"shapes {', '.join(QUICK_SHAPES)} and {QUICK_REPEATS} replays "
                               "(2 to 3 minutes, mostly compiling)")
    parser.add_argument("--shapes", help=f"comma-separated among {', '.join(SHAPES)}, or all (default: all; "
                        "--quick: the quick pair)")
    parser.add_argument("--tokens", type=int, help="tokens T of every shape (default: each shape's own, "
                        + ", ".join(f"{s.name} {s.tokens}" for s in SHAPES.values()) + ")")
    parser.add_argument("--reference-alignment", type=int, default=BF16_GROUP_ALIGNMENT,
                        help="rows each expert group of the reference is padded to a multiple of (torchtitan's "
                        f"BF16 alignment, default {BF16_GROUP_ALIGNMENT}; 1: no padding)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd reference")


def run(args: argparse.Namespace) -> int:
    shapes = select_shapes(args.shapes, args.quick, args.tokens)
    if args.reference_alignment < 1:
        raise ValueError(f"--reference-alignment: expected >= 1, got {args.reference_alignment}")
    require_gpu("benchmarking")
    make_out_dir(args.out)
    reference = functools.partial(grouped_mm_moe, alignment=args.reference_alignment)
    layers: dict[str, Layer] = {"ours": cute_moe.moe, "reference": reference}
    if not args.no_compile:
        layers["compiled"] = torch.compile(reference, dynamic=True)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    settings = {"reference group alignment": args.reference_alignment, "replays": repeats,
                "compiled reference": "no" if args.no_compile else "torch.compile(dynamic=True), default mode",
                "routing": f"softmax top-k, popularity bias std {POPULARITY_SPREAD}, {EMPTY_EXPERTS} expert(s) "
                           "without tokens"}
    timing, memory, failures = [], [], []
    began = time.monotonic()
    print(TIMING_HEADER, flush=True)
    for number, shape in enumerate(shapes, 1):
        def progress(stage: str, shape=shape, number=number) -> None:
            print(f"[{number}/{len(shapes)} {time.monotonic() - began:.0f} s] {shape.label}: {stage}",
                  file=sys.stderr, flush=True)
        try:
            rows, mem = bench_shape(shape, layers, repeats, progress)
            timing += rows
            memory.append(mem)
            for row in rows:
                print(timing_line(row), flush=True)
            print(f"memory: {memory_line(mem)}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failed shape is reported, the others still run
            print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr,
                  flush=True)
            failures.append(f"{shape.label}: {type(e).__name__}")
        gc.collect()  # captured graphs and autograd graphs sit in reference cycles: free their pools
        torch.cuda.empty_cache()
    write_report(args.out, settings, timing, memory, failures, torch.cuda.get_device_name())
    print(f"wrote {os.path.join(args.out, REPORT_STEM)}.md and .json ({time.monotonic() - began:.0f} s)",
          file=sys.stderr, flush=True)
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_moe_layer``."""
    return module_main("bench-layer", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
