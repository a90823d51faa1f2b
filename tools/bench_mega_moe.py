"""Benchmark Mega MoE (cute_moe.fp8_mega_moe) against our unfused pipeline and an NCCL all-to-all pipeline.

    python3 -m cute_moe.tools.bench_mega_moe --out DIR [--world N] [--quick] [--shapes flash,v3] [--tokens 8,128]
                                             [--weights fp8|fp4]
    cute-moe bench-mega-moe --out DIR [--quick]

One process per GPU (cute_moe.ep_launch.run_ranks, an NCCL group of ``--world`` ranks, default every
visible GPU). Shapes: DeepSeek-V4-Flash (hidden 4096, intermediate 2048, 256 experts, top-6) and
DeepSeek-V3 (7168, 2048, 256, top-8); tokens per rank 1, 8, 32, 128, 512, 2048, 8192 (``--quick``:
8, 128, 2048). Data (tools/mega_moe_pipelines): FP8 weights with one scale per 128 x 128 block, the
same on every rank; per rank, tokens of varied magnitudes cast to FP8 1 x 128 and uniform random
top-k routing (distinct experts, no dropped slot). ``--weights fp4``: MXFP4 expert weights (one UE8M0
exponent per 32 K), ours = ``fp8_fp4_mega_moe`` and the baselines' GEMMs the FP8 x FP4 grouped GEMMs.

Contenders per (shape, T), in the same processes, interleaved:

* ours: ``fp8_mega_moe`` on one buffer per shape built for the run's largest T (inputs written into
  its views once; the routing copied in at the head of each graph, amortized over its calls);
* unfused: ``unfused_mega_moe`` (our EP dispatch -> grouped FP8 GEMM -> SwiGLU and FP8
  re-quantization in torch -> grouped FP8 GEMM -> our EP combine) on an EPBuffer sized for each T
  (``make_ep_buffer``): masked layout and masked GEMMs up to 128 tokens per rank, psum above;
* nccl: ``nccl_mega_moe`` (NCCL all_to_all_single of every token row to every rank, then the same
  GEMMs, partial sums back over NCCL), its buffers sized for exactly T tokens (no padding waste);
* ours local: ours with a second routing in which every token goes to this rank's own experts, with
  the real routing's rows per expert (scaled to T * K): the same kernel without NVLink traffic;
* comm: the unfused pipeline's communication alone, dispatch + combine (of a zero expert output).

Timing (tools/collective_timing.py): each contender a CUDA graph of N calls, N from the slowest
rank's eager estimate (about 10 ms per replay) so every rank replays the same collectives; replays
interleaved, each after a barrier; median per rank, the slowest rank's reported. L2 is not rotated:
every call streams the FP8 weights of the experts it touches (about 150 MB at T = 1, GBs from T = 32,
against a 60 MB L2), so no weight stays resident between calls, and all contenders read their
inputs alike.

Columns: µs of each; speed-up = baseline µs / ours µs; TFLOPS = useful FLOPs 2 * slots * (2I * H +
H * I) per rank / ours µs (slots = valid (token, slot) pairs, mean over ranks); weights GB/s = FP8
bytes (with scales) of the local experts that receive rows, mean over ranks, / ours µs; NVLink hidden
= 1 - (ours - ours local) / comm (1: moving the tokens costs ours nothing over its compute; 0: as
much as the unfused pipeline's dispatch + combine). Accuracy, checked before timing: calc_diff of ours
against unfused (both routings) and of nccl against unfused, each below 1e-3, else the row is marked
FAIL (still timed) and the run exits 1. Writes mega_moe.md and mega_moe.json to --out, rewritten
after every row (a run that dies keeps its finished rows). Run time on 2 H200 (estimated): --quick
about 2 to 3 minutes, the full run 3 to 5 minutes (process start, weight generation and the first
calls' compiles included; a few seconds per token count).
"""

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch

from cute_moe.mega_moe import check_mega_moe_args
from cute_moe.testing import calc_diff

from . import bench_common
from .command import make_out_dir, module_main, require_gpu

REPORT_STEM = "mega_moe"
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
QUICK_TOKENS = (8, 128, 2048)
SAMPLES, QUICK_SAMPLES = 20, 10  # interleaved replays per contender (median)
DIFF_LIMIT = 1e-3  # calc_diff of ours against the unfused pipeline (and of the NCCL one against it)
TARGETS = ((128, 1.3), (8192, 1.1))  # issue 13: (tokens per rank, minimum speed-up of ours vs unfused)
WEIGHT_SEED, INPUT_SEED = 0, 1
RANK_SEED_STRIDE = 1009  # input seed of rank r at T tokens: INPUT_SEED + r * stride + T
DEFAULT_TIMEOUT_S = 1200.0
SCALE_BLOCK = 128  # FP8 weights: one FP32 scale per 128 x 128 block
MX_BLOCK = 32  # MXFP4 weights: one UE8M0 exponent per 32 K
WEIGHT_FORMATS = {"fp8": "fp8", "fp4": "fp8xfp4"}  # --weights -> the buffer's mma_type
# Cross-GPU wait limit of both buffers: a shape's first calls compile kernels on each rank while a
# peer's kernel may already wait for it (the default 10 s could expire on a cold compile cache).
BUFFER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class MegaShape:
    """One MoE layer: ``experts`` experts of hidden ``hidden`` and intermediate ``intermediate``, top-``top_k``."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int

    def flops(self, slots: float) -> float:
        """Useful FLOPs of ``slots`` (token, slot) rows: GEMM-1 (2I x H) and GEMM-2 (H x I)."""
        return 2 * slots * (2 * self.intermediate * self.hidden + self.hidden * self.intermediate)

    def expert_bytes(self, weights: str) -> int:
        """Weight bytes of one expert (W1 [2I, H] and W2 [H, I]) with their scales: FP8 with one FP32
        scale per 128 x 128 block, or MXFP4 (half a byte per weight, one byte per 32)."""
        elements = 3 * self.hidden * self.intermediate
        if weights == "fp4":
            return elements // 2 + elements // MX_BLOCK
        return elements + 4 * elements // (SCALE_BLOCK * SCALE_BLOCK)


SHAPES = {"flash": MegaShape("DeepSeek-V4-Flash", 4096, 2048, 256, 6),
          "v3": MegaShape("DeepSeek-V3", 7168, 2048, 256, 8)}


# ---- arguments ----------------------------------------------------------------------------------

def parse_shapes(text: Optional[str]) -> list[str]:
    """Shape keys of ``--shapes`` (comma-separated, case-insensitive, ``all``; default all), in order, once each."""
    if text is None:
        return list(SHAPES)
    keys = []
    for part in text.split(","):
        key = part.strip().lower()
        if key == "all":
            keys += list(SHAPES)
        elif key in SHAPES:
            keys.append(key)
        else:
            raise ValueError(f"--shapes: unknown shape {part.strip()!r}; expected among {', '.join(SHAPES)} or all")
    return list(dict.fromkeys(keys))


def parse_tokens(text: Optional[str], quick: bool) -> list[int]:
    """Tokens per rank of ``--tokens`` (comma-separated, each >= 1), ascending, once each; default
    TOKENS, or QUICK_TOKENS with ``quick``."""
    if text is None:
        return list(QUICK_TOKENS if quick else TOKENS)
    values = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"--tokens: expected comma-separated integers, got {text!r}") from None
        if value < 1:
            raise ValueError(f"--tokens: expected >= 1, got {value}")
        values.append(value)
    return sorted(set(values))


def check_plan(world: int, shape_keys: list[str], tokens: list[int]) -> None:
    """ValueError naming the option when a shape cannot run on ``world`` ranks with ``max(tokens)``
    tokens per rank (the buffer's own checks, and the local routing's: top-k distinct local experts)."""
    if world < 1:
        raise ValueError(f"--world: expected >= 1, got {world}")
    for key in shape_keys:
        s = SHAPES[key]
        try:
            check_mega_moe_args(world, s.experts, max(tokens), s.top_k, s.hidden, s.intermediate, "fp8", "swiglu")
        except ValueError as e:
            raise ValueError(f"--world {world} / --tokens up to {max(tokens)}: {s.name}: {e}") from None
        if s.experts % world == 0 and s.experts // world < s.top_k:
            raise ValueError(f"--world: {s.name} has {s.experts // world} experts per rank at world {world}, fewer "
                             f"than top-{s.top_k} (the local routing needs {s.top_k} distinct local experts)")


# ---- routing of the "ours local" measurement ----------------------------------------------------

def apportion(weights: list[int], total: int, cap: int) -> list[int]:
    """``total`` split over the entries in proportion to ``weights`` (largest remainders first, then
    round-robin), no share above ``cap``; all-zero weights split evenly."""
    n = len(weights)
    if total > cap * n:
        raise ValueError(f"total: expected at most {cap} x {n} entries, got {total}")
    w = list(weights) if sum(weights) > 0 else [1] * n
    w_sum = sum(w)
    shares = [min(cap, wi * total // w_sum) for wi in w]
    order = sorted(range(n), key=lambda i: (-(w[i] * total % w_sum), i))
    left = total - sum(shares)
    while left > 0:  # terminates: total <= cap * n, so some share is below cap while left > 0
        for i in order:
            if left > 0 and shares[i] < cap:
                shares[i] += 1
                left -= 1
    return shares


def local_routing(expert_rows: list[int], tokens: int, top_k: int, first_expert: int) -> torch.Tensor:
    """int64 ``[tokens, top_k]`` routing onto the experts ``first_expert + e`` only (e < len(expert_rows)):
    every token on top_k distinct experts, expert e receiving a share of the tokens * top_k slots
    proportional to ``expert_rows[e]`` (``apportion``, at most ``tokens`` each).

    The slots sorted by expert fill the matrix column by column (slot k of token t = sorted entry
    k * tokens + t): an expert's run of at most ``tokens`` entries covers disjoint token ranges of at
    most two adjacent columns, so no token gets an expert twice."""
    counts = apportion(expert_rows, tokens * top_k, tokens)
    ids = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int64) + first_expert, torch.tensor(counts))
    return ids.view(top_k, tokens).t().contiguous()


def received_rows(all_topk_idx: torch.Tensor, rank: int, local_experts: int) -> torch.Tensor:
    """int64 ``[local_experts]``: rows each of ``rank``'s experts receives from the routing of every
    rank (``all_topk_idx``, any shape; ids outside the rank's experts are not counted)."""
    rel = all_topk_idx.reshape(-1).long() - rank * local_experts
    return torch.bincount(rel[(rel >= 0) & (rel < local_experts)], minlength=local_experts)


# ---- one row ------------------------------------------------------------------------------------

@dataclass
class MegaRow:
    """One (shape, tokens per rank) measurement; times in µs are the slowest rank's medians."""

    shape: str
    tokens: int
    ours_us: float
    unfused_us: float
    nccl_us: float
    local_us: float  # ours with every token routed to this rank's own experts
    comm_us: float  # the unfused pipeline's dispatch + combine alone
    vs_unfused: float  # unfused / ours: > 1 is ours faster
    vs_nccl: float
    tflops: float
    weights_gbps: float
    nvlink_hidden: float  # 1 - (ours - local) / comm
    diff_unfused: float  # calc_diff of ours against unfused (real routing)
    diff_local: float  # the same on the local routing
    diff_nccl: float  # nccl against unfused
    status: str  # "ok" or "FAIL: ..."
    note: str = ""


def make_row(shape: MegaShape, tokens: int, times: dict[str, float], diffs: dict[str, float], slots: float,
             touched_experts: float, weights: str = "fp8", note: str = "") -> MegaRow:
    """The row of one measurement: ``times`` µs of ours, ours_local, unfused, nccl, comm; ``diffs``
    calc_diff of unfused (ours vs it), local, nccl; ``slots`` / ``touched_experts`` per rank (means)."""
    ours = times["ours"]
    failed = [f"{name} {value:.1e}" for name, value in diffs.items() if not value < DIFF_LIMIT]
    status = "ok" if not failed else f"FAIL: calc_diff {', '.join(failed)} (limit {DIFF_LIMIT:g})"
    return MegaRow(shape.name, tokens, ours, times["unfused"], times["nccl"], times["ours_local"], times["comm"],
                   times["unfused"] / ours, times["nccl"] / ours, shape.flops(slots) / ours / 1e6,
                   touched_experts * shape.expert_bytes(weights) / ours / 1e3,
                   1 - (ours - times["ours_local"]) / times["comm"], diffs["unfused"], diffs["local"],
                   diffs["nccl"], status, note)


# ---- the report ---------------------------------------------------------------------------------

HEADER = ("| shape | tokens/rank | ours µs | unfused µs | NCCL µs | vs unfused | vs NCCL | TFLOPS | weights GB/s | "
          "ours local µs | comm µs | NVLink hidden | calc_diff | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
LEGEND = ("ours = fp8_mega_moe (fp8_fp4_mega_moe for MXFP4 weights); unfused = our EP dispatch (psum) + grouped FP8 "
          "(or FP8 x FP4) GEMMs + SwiGLU/FP8 in torch + our "
          "EP combine; NCCL = all_to_all_single rows + the same GEMMs + partial sums back. vs = baseline µs / ours "
          "µs. TFLOPS: 2 * slots * (2I*H + H*I) per rank / ours. weights GB/s: FP8 bytes of the local experts that "
          "receive rows / ours. ours local: ours with every token routed to this rank's own experts (same rows "
          "per expert); comm: the unfused pipeline's dispatch + combine alone; NVLink hidden = 1 - (ours - ours "
          f"local) / comm. calc_diff: the largest of ours vs unfused (both routings) and NCCL vs unfused (limit "
          f"{DIFF_LIMIT:g}). Times: CUDA graphs, median of interleaved replays, slowest rank.")


def format_row(r: MegaRow) -> str:
    diff = max(r.diff_unfused, r.diff_local, r.diff_nccl)
    return (f"| {r.shape} | {r.tokens} | {r.ours_us:.1f} | {r.unfused_us:.1f} | {r.nccl_us:.1f} | "
            f"{r.vs_unfused:.2f}x | {r.vs_nccl:.2f}x | {r.tflops:.0f} | {r.weights_gbps:.0f} | {r.local_us:.1f} | "
            f"{r.comm_us:.1f} | {100 * r.nvlink_hidden:.0f}% | {diff:.1e} | {r.status} |")


def target_results(rows: list[MegaRow]) -> list[dict]:
    """Each target of TARGETS against every shape measured at its token count (``met`` is None when
    no row has that token count)."""
    results = []
    for tokens, minimum in TARGETS:
        matching = [r for r in rows if r.tokens == tokens]
        for r in matching:
            results.append({"tokens": tokens, "target": minimum, "shape": r.shape, "speedup": r.vs_unfused,
                            "met": r.vs_unfused >= minimum and r.status == "ok"})
        if not matching:
            results.append({"tokens": tokens, "target": minimum, "shape": None, "speedup": None, "met": None})
    return results


def summary_lines(rows: list[MegaRow], failures: list[str]) -> list[str]:
    """The summary: each issue target (met / not met / not measured), FAIL rows, failed jobs."""
    lines = ["## Targets (issue 13, set for 2 H200: ours vs unfused, same run)", ""]
    for t in target_results(rows):
        goal = f">= {t['target']:g}x vs unfused at {t['tokens']} tokens per rank"
        if t["met"] is None:
            lines.append(f"- {goal}: not measured in this run")
        else:
            lines.append(f"- {goal}: {t['shape']} {t['speedup']:.2f}x, {'met' if t['met'] else 'NOT met'}")
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        lines += ["", "Accuracy FAIL: " + "; ".join(f"{r.shape} T={r.tokens}: {r.status}" for r in failed)]
    if failures:
        lines += ["", "Failed jobs: " + "; ".join(failures)]
    return lines


def write_report(out: str, settings: dict, rows: list[MegaRow], failures: list[str], device: str) -> None:
    """``<out>/mega_moe.md`` (settings, table, legend, targets, failures) and ``<out>/mega_moe.json``
    (the same as data)."""
    lines = ["# Mega MoE vs the unfused and NCCL pipelines", "",
             f"GPU: {device}. " + "; ".join(f"{k}: {v}" for k, v in settings.items()), "",
             HEADER, *map(format_row, rows), "", LEGEND, "", *summary_lines(rows, failures)]
    with open(os.path.join(out, f"{REPORT_STEM}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"{REPORT_STEM}.json"), "w") as f:
        json.dump({"settings": settings, "rows": [asdict(r) for r in rows], "targets": target_results(rows),
                   "failures": failures, "device": device}, f, indent=1)


# ---- the measurement (one process per rank) -----------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What every rank runs (picklable: sent to the spawned processes)."""

    shapes: tuple[str, ...]
    tokens: tuple[int, ...]
    samples: int
    out: str
    settings: tuple[tuple[str, str], ...]
    weights: str = "fp8"  # a key of WEIGHT_FORMATS


@dataclass
class ShapeSetup:
    """One shape's state on one rank, built once and reused by every token count."""

    shape: MegaShape
    local_weights: tuple  # ((w1, s1), (w2, s2)) of this rank's experts, untransformed (the baselines')
    mega_weights: tuple  # transform_weights_for_mega_moe of them (ours)
    buffer: object  # MegaMoEBuffer for the run's largest T


def build_shape(shape: MegaShape, rank: int, world: int, max_tokens: int, weights: str) -> ShapeSetup:
    """This rank's weights (copies of its experts only; ``weights`` 'fp8' or 'fp4') and the Mega MoE buffer."""
    import torch.distributed as dist

    import cute_moe
    from .mega_moe_pipelines import make_layer
    layer = make_layer(shape.experts, shape.hidden, shape.intermediate, WEIGHT_SEED, "cuda", weights=weights)
    local = tuple((w.clone(), s.clone()) for w, s in layer.local(rank, world))  # views would keep all experts
    del layer
    torch.cuda.empty_cache()
    group = dist.group.WORLD
    buffer = cute_moe.get_symm_buffer_for_mega_moe(group, shape.experts, max_tokens, shape.top_k, shape.hidden,
                                                   shape.intermediate, WEIGHT_FORMATS[weights],
                                                   timeout_s=BUFFER_TIMEOUT_S)
    return ShapeSetup(shape, local, cute_moe.transform_weights_for_mega_moe(*local), buffer)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def measure(setup: ShapeSetup, tokens: int, rank: int, world: int, samples: int, weight_format: str,
            progress: Callable[[str], None]) -> MegaRow:
    """Accuracy, then the interleaved timing of the five contenders at ``tokens`` tokens per rank."""
    import torch.distributed as dist

    import cute_moe

    from .collective_timing import agreed_calls, capture, slowest, time_graphs
    from .mega_moe_pipelines import (make_ep_buffer, make_inputs, make_nccl_state, nccl_mega_moe, unfused_dispatch,
                                     unfused_expert_output, unfused_mega_moe)
    s, buf = setup.shape, setup.buffer
    group, local_experts, dev = dist.group.WORLD, s.experts // world, torch.device("cuda")
    ep = make_ep_buffer(group, s.experts, tokens, s.hidden, s.top_k, BUFFER_TIMEOUT_S)
    _, x_fp8, x_sf, idx, weights = make_inputs(tokens, s.hidden, s.experts, s.top_k,
                                               INPUT_SEED + RANK_SEED_STRIDE * rank + tokens, dev)
    all_idx = torch.empty(world * tokens, s.top_k, dtype=idx.dtype, device=dev)
    dist.all_gather_into_tensor(all_idx, idx)
    rows_here = received_rows(all_idx, rank, local_experts).tolist()
    own_idx = local_routing(rows_here, tokens, s.top_k, rank * local_experts).to(dev)
    valid = all_idx[(all_idx >= 0) & (all_idx < s.experts)]
    slots, touched = valid.numel() / world, valid.unique().numel() / world
    buf.x[:tokens].copy_(x_fp8)
    buf.x_sf[:tokens].copy_(x_sf)
    nccl_state = make_nccl_state(group, s.experts, tokens, s.top_k, s.hidden, s.intermediate, dev)
    out = {name: torch.empty(tokens, s.hidden, dtype=torch.bfloat16, device=dev)
           for name in ("ours", "ours_local", "unfused", "unfused_local", "nccl", "comm")}
    expert_out = unfused_expert_output(ep)

    def routing_of(topk_idx: torch.Tensor) -> Callable[[], None]:
        def write() -> None:
            buf.topk_idx[:tokens].copy_(topk_idx)
            buf.topk_weights[:tokens].copy_(weights)
        return write

    def ours(name: str) -> Callable[[], None]:
        run = cute_moe.fp8_fp4_mega_moe if weight_format == "fp4" else cute_moe.fp8_mega_moe
        return lambda: run(out[name], *setup.mega_weights, buf)

    def unfused(topk_idx: torch.Tensor, name: str) -> Callable[[], object]:
        return lambda: unfused_mega_moe(ep, x_fp8, x_sf, topk_idx, weights, setup.local_weights, out=out[name])

    def comm() -> None:  # unfused_mega_moe without its GEMMs
        d = unfused_dispatch(ep, x_fp8, x_sf, idx, weights)
        ep.combine(expert_out, d.handle, out=out["comm"])

    calls = {"ours": ours("ours"), "ours_local": ours("ours_local"), "unfused": unfused(idx, "unfused"),
             "nccl": lambda: nccl_mega_moe(nccl_state, x_fp8, x_sf, idx, weights, setup.local_weights,
                                           out=out["nccl"]), "comm": comm}
    prologues = {"ours": routing_of(idx), "ours_local": routing_of(own_idx)}

    progress("accuracy (a shape's first call compiles its kernels)")
    for name in ("ours", "ours_local"):
        out[name].fill_(float("nan"))
        prologues[name]()
        calls[name]()
    calls["unfused"]()
    unfused(own_idx, "unfused_local")()
    calls["nccl"]()
    diffs = dict(zip(("unfused", "local", "nccl"), slowest([
        _finite(calc_diff(out["ours"], out["unfused"])), _finite(calc_diff(out["ours_local"], out["unfused_local"])),
        _finite(calc_diff(out["nccl"], out["unfused"]))])))

    progress("timing")

    def with_prologue(name: str) -> Callable[[], None]:
        def run() -> None:
            if name in prologues:
                prologues[name]()
            calls[name]()
        return run
    counts = agreed_calls({name: with_prologue(name) for name in calls})
    timed = {name: capture(calls[name], counts[name], prologues.get(name)) for name in calls}
    times = time_graphs(timed, samples)
    del timed
    torch.cuda.empty_cache()
    buf.check()
    ep.check()
    calls_note = "calls per graph: " + ", ".join(f"{name} {count}" for name, count in counts.items())
    return make_row(s, tokens, times, diffs, slots, touched, weight_format, note=calls_note)


def bench_shape(key: str, plan: Plan, rank: int, world: int, progress: Callable[[str], None]) -> Iterator[MegaRow]:
    """Rows of one shape, one per token count, on buffers built for the largest."""
    shape = SHAPES[key]
    progress(f"{shape.name}: weights and buffers")
    setup = build_shape(shape, rank, world, max(plan.tokens), plan.weights)
    try:
        for tokens in plan.tokens:
            yield measure(setup, tokens, rank, world, plan.samples, plan.weights,
                          lambda stage, tokens=tokens: progress(f"{shape.name} T={tokens}: {stage}"))
            gc.collect()  # this T's EPBuffer and NCCL buffers
            torch.cuda.empty_cache()
    finally:
        del setup
        gc.collect()
        torch.cuda.empty_cache()


def bench_rank(rank: int, world: int, plan: Plan) -> dict:
    """Every shape of the plan on this rank; rank 0 prints the rows and rewrites the report after each.
    Returns the rows (the same on every rank: all-reduced), this rank's failed jobs and the device name."""
    device = torch.cuda.get_device_name()
    settings = dict(plan.settings)
    rows: list[MegaRow] = []
    failures: list[str] = []
    began = time.monotonic()

    def progress(stage: str) -> None:
        if rank == 0:
            print(f"[bench_mega_moe {time.monotonic() - began:.0f} s] {stage}", file=sys.stderr, flush=True)
    if rank == 0:
        print(HEADER, flush=True)
    for key in plan.shapes:
        try:
            for row in bench_shape(key, plan, rank, world, progress):
                rows.append(row)
                if rank == 0:
                    print(format_row(row), flush=True)
                    write_report(plan.out, settings, rows, failures, device)
        except Exception as e:  # noqa: BLE001 - one failed shape is reported, the others still run
            bench_common.report_failure(e, f"rank {rank} {SHAPES[key].name}", failures)
    return {"rows": [asdict(r) for r in rows], "failures": failures, "device": device}


# ---- the command --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_common.add_arguments(parser, REPORT_STEM, f"tokens per rank {', '.join(map(str, QUICK_TOKENS))} and "
                               f"{QUICK_SAMPLES} replays (about 2 to 3 minutes on 2 H200)")
    parser.add_argument("--world", type=int, help="ranks, one GPU each (default: every visible GPU)")
    parser.add_argument("--shapes", help=f"comma-separated among {', '.join(SHAPES)}, or all (default: all)")
    parser.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="fp8",
                        help="expert weights: fp8 (fp8_mega_moe, default) or fp4 (MXFP4, fp8_fp4_mega_moe)")
    parser.add_argument("--tokens", help="comma-separated tokens per rank (default: "
                        f"{','.join(map(str, TOKENS))}; --quick: {','.join(map(str, QUICK_TOKENS))})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds before the ranks are killed (default {DEFAULT_TIMEOUT_S:g})")


def _short(error: RuntimeError) -> str:
    """run_ranks' error in a few words: each failing rank's header and its exception's last line."""
    parts = []
    for block in re.split(r"\n(?=rank \d+ )", str(error)):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        parts.append(" ".join(lines[:1] + lines[1:][-1:]))
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from cute_moe.ep_launch import run_ranks
    shape_keys = parse_shapes(args.shapes)
    tokens = parse_tokens(args.tokens, args.quick)
    if args.timeout <= 0:
        raise ValueError(f"--timeout: expected > 0, got {args.timeout:g}")
    if args.world is not None:
        check_plan(args.world, shape_keys, tokens)
    require_gpu("benchmarking")
    visible = torch.cuda.device_count()
    if args.world is None:
        check_plan(visible, shape_keys, tokens)
    elif args.world > visible:
        raise ValueError(f"--world: expected at most {visible} (visible GPUs), got {args.world}")
    world = visible if args.world is None else args.world
    make_out_dir(args.out)
    samples = QUICK_SAMPLES if args.quick else SAMPLES
    settings = {"ranks": str(world), "tokens per rank": ", ".join(map(str, tokens)),
                "buffers sized for": f"{max(tokens)} tokens per rank", "replays": str(samples),
                "routing": "uniform random top-k, distinct experts, no dropped slot",
                "unfused": "EPBuffer sized for each T; masked layout up to 128 tokens per rank, psum above",
                "seeds": f"weights {WEIGHT_SEED}, inputs {INPUT_SEED} + {RANK_SEED_STRIDE} * rank + T"}
    settings["expert weights"] = "MXFP4 (fp8_fp4_mega_moe)" if args.weights == "fp4" else "FP8 128 x 128 blocks"
    plan = Plan(tuple(shape_keys), tuple(tokens), samples, args.out, tuple(settings.items()), args.weights)
    print(f"[bench_mega_moe] {world} rank(s), shapes {', '.join(SHAPES[k].name for k in shape_keys)}, "
          f"tokens {', '.join(map(str, tokens))}", file=sys.stderr, flush=True)
    try:
        results = run_ranks(bench_rank, world, (plan,), timeout_s=args.timeout)
    except RuntimeError as e:
        raise RuntimeError(f"{_short(e)} (rows finished before are in {args.out}/{REPORT_STEM}.md)") from None
    rows = [MegaRow(**r) for r in results[0]["rows"]]
    failures = [f for result in results for f in result["failures"]]
    write_report(args.out, settings, rows, failures, results[0]["device"])
    print("\n".join(summary_lines(rows, failures)), flush=True)
    print(f"[bench_mega_moe] wrote {args.out}/{REPORT_STEM}.md and .json", file=sys.stderr, flush=True)
    return 1 if failures or any(r.status != "ok" for r in rows) else 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("bench-mega-moe", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
