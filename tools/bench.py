"""Benchmark cute-moe's BF16 GEMMs against the torch baselines users run today, in the same process.

Times CUDA-graph replays of many launches after warm-up (median of repeats, inputs rotated so the
data of one replay is several times the L2), counts FLOPs on valid rows only, prints a table and
writes it (Markdown + JSON) under --out.

    cute-moe bench [--only contiguous,masked,...] [--config tile_m=128,...] [--out DIR]
    python -m cute_moe.tools.bench ...  (the same)
"""

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Optional

import torch

import cute_moe
from cute_moe.dispatch import CONFIG_ENV, force_config, parse_config
from cute_moe.models import PRESETS, get_preset
from cute_moe.layouts.alignment import check_alignment
from cute_moe.testing import calc_diff

from .bench_common import (HEADER, Row, format_row, quantize_rows, randn, rowwise_fp8, sets_for, time_pair,
                           timed_row)
from .bench_presets import (DECODE_EXPECTED_M, PRESET_KINDS, QUICK_DECODE_EXPECTED_M, QUICK_TOKENS, TOKENS,
                            bench_preset_rows, summary)
from .command import make_out_dir, module_main, require_gpu
from .precompile import parse_csv, parse_subset

NK_SHAPES = ((4096, 7168), (7168, 2048))
CONTIGUOUS_GM = ((4, 8192), (8, 4096), (32, 1024), (32, 256))
MASKED_EXPECTED_M = (16, 64, 256)
DENSE_M = (128, 4096)
KINDS = ("contiguous", "ragged", "masked", "dense", "fp8", "fp8_masked")
SECTIONS = ("fixed", "presets")



def bench_contiguous(kind: str, g: int, m: int, n: int, k: int) -> Row:
    """Contiguous (aligned segments, grouped_layout) or ragged (offs) vs torch._grouped_mm."""
    total = g * m
    bytes_per_set = (total * k + g * n * k + total * n) * 2
    sets = []
    for _ in range(sets_for(bytes_per_set)):
        a, w = randn(total, k), randn(g, n, k)
        layout = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(m)
        offs = torch.arange(1, g + 1, device="cuda", dtype=torch.int32) * m
        sets.append((a, w, layout, offs, torch.empty(total, n, device="cuda", dtype=torch.bfloat16)))
    outs = {}

    def ours(i):
        a, w, layout, offs, d = sets[i]
        if kind == "contiguous":
            cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d, layout)
            outs["ours"] = d
        else:
            outs["ours"] = cute_moe.grouped_mm(a, w.transpose(1, 2), offs)

    def base(i):
        a, w, layout, offs, d = sets[i]
        outs["base"] = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)

    ours(0)
    base(0)
    diff = calc_diff(outs["ours"], outs["base"])
    return timed_row(kind, f"{g}x{m} n={n} k={k}", ours, base, len(sets), 2 * total * n * k, bytes_per_set, diff,
                     "torch._grouped_mm")


def bench_masked(g: int, max_m: int, expected_m: int, n: int, k: int) -> Row:
    """Masked layout; bandwidth counts each weight byte once plus valid A and D rows."""
    rng = random.Random(expected_m * 1000 + n)
    counts = [min(max_m, max(1, int(expected_m * rng.uniform(0.7, 1.3)))) for _ in range(g)]
    valid = sum(counts)
    a, w = randn(g, max_m, k), randn(g, n, k)
    d = torch.empty(g, max_m, n, device="cuda", dtype=torch.bfloat16)
    masked_m = torch.tensor(counts, device="cuda", dtype=torch.int32)
    packed = torch.cat([a[i, :c] for i, c in enumerate(counts)])
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    outs = {}

    def ours(_):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, masked_m, expected_m)

    def base(_):
        outs["base"] = torch._grouped_mm(packed, w.transpose(1, 2), offs=offs)

    ours(0)
    base(0)
    ours_packed = torch.cat([d[i, :c] for i, c in enumerate(counts)])
    diff = calc_diff(ours_packed, outs["base"])
    bytes_moved = (g * n * k + valid * k + valid * n) * 2
    return timed_row("masked", f"{g}x{max_m} exp_m={expected_m} n={n} k={k}", ours, base, 1, 2 * valid * n * k,
                     bytes_moved, diff, "torch._grouped_mm (packed rows)")


def bench_fp8_contiguous(g: int, m: int, n: int, k: int) -> Row:
    """FP8 contiguous (1x128 / 128x128 block scales) vs torch._scaled_grouped_mm (row-wise FP8), and
    vs this project's BF16 contiguous kernel on the same data."""
    total = g * m
    a, w = randn(total, k), randn(g, n, k)
    layout = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(m)
    offs = torch.arange(1, g + 1, device="cuda", dtype=torch.int32) * m
    a_q, sfa = quantize_rows(a)
    w_q, sfb = cute_moe.per_block_cast_to_fp8(w)
    d = torch.empty(total, n, device="cuda", dtype=torch.bfloat16)
    d_bf16 = torch.empty_like(d)
    a_row, w_row, scale_a, scale_b = rowwise_fp8(a, w)
    outs = {}

    def ours(_):
        cute_moe.m_grouped_fp8_gemm_nt_contiguous((a_q, sfa), (w_q, sfb), d, layout)

    def base(_):
        outs["base"] = torch._scaled_grouped_mm(a_row, w_row.transpose(1, 2), scale_a, scale_b, offs=offs,
                                                out_dtype=torch.bfloat16)

    def ours_bf16(_):
        cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, w, d_bf16, layout)

    ours(0)
    ref = torch.cat([a[i * m:(i + 1) * m].float() @ w[i].float().T for i in range(g)])
    diff = calc_diff(d, ref)
    t_fp8, t_bf16 = time_pair(ours, ours_bf16, 1)
    return timed_row("fp8 contiguous", f"{g}x{m} n={n} k={k}", ours, base, 1, 2 * total * n * k,
                     total * k + g * n * k + total * n * 2, diff, "torch._scaled_grouped_mm (row-wise)",
                     f"{t_bf16 / t_fp8:.2f}x our bf16", operand="fp8")


def bench_fp8_masked(g: int, max_m: int, expected_m: int, n: int, k: int) -> Row:
    """FP8 masked; bandwidth counts each weight and scale byte once plus valid A and D rows."""
    rng = random.Random(expected_m * 1000 + n)
    counts = [min(max_m, max(1, int(expected_m * rng.uniform(0.7, 1.3)))) for _ in range(g)]
    valid = sum(counts)
    a, w = randn(g, max_m, k), randn(g, n, k)
    a_q, sfa = quantize_rows(a)
    w_q, sfb = cute_moe.per_block_cast_to_fp8(w)
    d = torch.empty(g, max_m, n, device="cuda", dtype=torch.bfloat16)
    d_bf16 = torch.empty_like(d)
    masked_m = torch.tensor(counts, device="cuda", dtype=torch.int32)

    def ours(_):
        cute_moe.m_grouped_fp8_gemm_nt_masked((a_q, sfa), (w_q, sfb), d, masked_m, expected_m)

    def ours_bf16(_):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d_bf16, masked_m, expected_m)

    ours(0)
    diff = max(calc_diff(d[i, :c], a[i, :c].float() @ w[i].float().T) for i, c in enumerate(counts[:4]))
    bytes_moved = g * n * k + sfb.numel() * 4 + valid * k + valid * (k // 128) * 4 + valid * n * 2
    return timed_row("fp8 masked", f"{g}x{max_m} exp_m={expected_m} n={n} k={k}", ours, ours_bf16, 1,
                     2 * valid * n * k, bytes_moved, diff, "our bf16 masked", operand="fp8")


def bench_dense(m: int, n: int, k: int) -> Row:
    bytes_per_set = (m * k + n * k + m * n) * 2
    sets = [(randn(m, k), randn(n, k), torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
            for _ in range(sets_for(bytes_per_set))]
    outs = {}

    def ours(i):
        a, b, d = sets[i]
        cute_moe.bf16_gemm_nt(a, b, d)
        outs["ours"] = d

    def base(i):
        a, b, _ = sets[i]
        outs["base"] = torch.matmul(a, b.T)

    ours(0)
    base(0)
    diff = calc_diff(outs["ours"], outs["base"])
    return timed_row("dense", f"m={m} n={n} k={k}", ours, base, len(sets), 2 * m * n * k, bytes_per_set, diff,
                     "torch.matmul")


def host_overhead_us(calls: int = 2000) -> float:
    """Host microseconds of one warm masked call (tiny problem, so the GPU keeps up)."""
    g, max_m, n, k = 4, 64, 384, 320
    a, w = randn(g, max_m, k), randn(g, n, k)
    d = torch.empty(g, max_m, n, device="cuda", dtype=torch.bfloat16)
    masked_m = torch.full((g,), 8, device="cuda", dtype=torch.int32)
    for _ in range(10):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, masked_m, 8)
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, masked_m, 8)
        samples.append((time.perf_counter() - t0) * 1e6 / (calls // 5))
        torch.cuda.synchronize()
    return statistics.median(samples)


def bench_rows(only: set[str], nk_shapes: tuple[tuple[int, int], ...]) -> list[Row]:
    """Benchmark the ``only`` kinds on every N x K shape, printing each row as it is measured."""
    rows = []
    for n, k in nk_shapes:
        for g, m in CONTIGUOUS_GM:
            for kind in ("contiguous", "ragged"):
                if kind in only:
                    rows.append(bench_contiguous(kind, g, m, n, k))
                    print(format_row(rows[-1]), flush=True)
        if "masked" in only:
            for expected_m in MASKED_EXPECTED_M:
                rows.append(bench_masked(32, 4096, expected_m, n, k))
                print(format_row(rows[-1]), flush=True)
        if "dense" in only:
            for m in DENSE_M:
                rows.append(bench_dense(m, n, k))
                print(format_row(rows[-1]), flush=True)
        if "fp8" in only:
            for g, m in CONTIGUOUS_GM:
                rows.append(bench_fp8_contiguous(g, m, n, k))
                print(format_row(rows[-1]), flush=True)
        if "fp8_masked" in only:
            for expected_m in MASKED_EXPECTED_M:
                rows.append(bench_fp8_masked(32, 4096, expected_m, n, k))
                print(format_row(rows[-1]), flush=True)
    return rows


def parse_only(text: str) -> set[str]:
    """--only: comma-separated kinds among KINDS."""
    return set(parse_subset("--only", text, list(KINDS)))


def parse_nk(text: str) -> tuple[tuple[int, int], ...]:
    """--nk: comma-separated positive N x K pairs."""
    matches = [re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", item) for item in parse_csv(text)]
    if not matches or not all(matches):
        raise ValueError(f"--nk: expected NxK pairs like 4096x7168, got {text!r}")
    return tuple((int(m[1]), int(m[2])) for m in matches)


def parse_forced_config(text: str) -> Any:
    """--config: parse_config's config, its errors naming --config instead of the environment variable."""
    try:
        return parse_config(text)
    except ValueError as e:
        raise ValueError(f"--config: {str(e).removeprefix(f'{CONFIG_ENV}: ')}") from None


def parse_presets(text: str) -> list[str]:
    """--presets: comma-separated preset names (case-insensitive), or all."""
    if text == "all":
        return list(PRESETS)
    try:
        return [get_preset(name).name for name in parse_csv(text)] or list(PRESETS)
    except ValueError as e:
        raise ValueError(f"--presets: {str(e).removeprefix('--model: ')}") from None


def load_compare(path: str) -> dict[tuple[str, str, str], dict]:
    """--compare: the rows of an earlier bench.json, keyed by (section, kind, shape)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return {(section, r["kind"], r["shape"]): r for section in SECTIONS
                for r in data.get("rows" if section == "fixed" else "preset_rows", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--compare: cannot read an earlier bench.json from {path}: {e}") from None


def comparison(old: dict, section: str, rows: list[Row]) -> list[str]:
    """Each row's change against the earlier run: our time and our ratio to the baseline."""
    lines = []
    for r in rows:
        before = old.get((section, r.kind, r.shape))
        if before is None:
            lines.append(f"{section} | {r.kind} | {r.shape} | new row")
            continue
        lines.append(f"{section} | {r.kind} | {r.shape} | ours {before['ours_us']:.1f} -> {r.ours_us:.1f} us "
                     f"({before['ours_us'] / r.ours_us:.3f}x speed) | ratio {before['ratio']:.3f} -> {r.ratio:.3f}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--section", default=",".join(SECTIONS),
                        help="comma-separated sections: fixed (the DeepSeek shapes below), presets (every "
                        "model preset's expert GEMMs with uneven routing); default both")
    parser.add_argument("--only", default=",".join(KINDS),
                        help=f"fixed section: comma-separated kinds among {', '.join(KINDS)} (default: all)")
    parser.add_argument("--presets", default="all", help=f"presets section: comma-separated among "
                        f"{', '.join(PRESETS)} (default: all)")
    parser.add_argument("--preset-kinds", default=",".join(PRESET_KINDS),
                        help=f"presets section: comma-separated among {', '.join(PRESET_KINDS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"presets section: {QUICK_TOKENS} tokens per rank and expected rows "
                        f"{QUICK_DECODE_EXPECTED_M} only (default {TOKENS} and {DECODE_EXPECTED_M})")
    parser.add_argument("--compare", metavar="OLD.json", help="print every row's change against an earlier bench.json")
    parser.add_argument("--config", default=None, help="force a KernelConfig, e.g. tile_m=128,tile_n=256,cluster_m=2")
    parser.add_argument("--nk", default=None, help="only these N x K shapes, e.g. 4096x7168,7168x2048")
    parser.add_argument("--alignment", type=int, default=None,
                        help="contiguous-layout segment alignment, a positive multiple of 64")
    parser.add_argument("--no-host", action="store_true", help="skip the host-overhead measurement")
    parser.add_argument("--out", default="bench_results", help="folder for bench.md and bench.json")


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, check for a GPU, benchmark, print and write the table; returns the exit
    status. Bad arguments: ValueError; no GPU: NoGpuError (both before anything is printed)."""
    sections = parse_subset("--section", args.section, list(SECTIONS))
    only = parse_only(args.only)
    presets = parse_presets(args.presets)
    preset_kinds = set(parse_subset("--preset-kinds", args.preset_kinds, list(PRESET_KINDS)))
    old = load_compare(args.compare) if args.compare else None
    nk_shapes = NK_SHAPES if args.nk is None else parse_nk(args.nk)
    config = None if args.config is None else parse_forced_config(args.config)
    if args.alignment is not None:
        check_alignment(args.alignment, "--alignment")
    require_gpu("benchmarking")
    make_out_dir(args.out)
    if args.alignment is not None:
        cute_moe.set_mk_alignment_for_contiguous_layout(args.alignment)
    torch.manual_seed(0)
    emit = lambda row: print(format_row(row), flush=True)  # noqa: E731
    print(HEADER, flush=True)
    with force_config(config) if config is not None else contextlib.nullcontext():
        rows = bench_rows(only, nk_shapes) if "fixed" in sections else []
        preset_rows = bench_preset_rows(presets, preset_kinds, args.quick, emit) if "presets" in sections else []
    host = None if args.no_host else host_overhead_us()
    device = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%d")
    table = "\n".join([HEADER] + [format_row(r) for r in rows])
    if preset_rows:
        table += "\n\nModel presets, uneven routing:\n\n" + "\n".join(
            [HEADER] + [format_row(r) for r in preset_rows] + [""] + summary(preset_rows))
    note = f"{stamp}, {device}, torch {torch.__version__}, config {args.config or 'dispatcher'}"
    if host is not None:
        note += f", warm-call host time {host:.1f} us"
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"{note}\n\n{table}\n")
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"note": note, "rows": [asdict(r) for r in rows], "preset_rows": [asdict(r) for r in preset_rows],
                   "host_us": host}, f, indent=1)
    print()
    print(note)
    print(table)
    if old is not None:
        print(f"\nChange against {args.compare}:")
        print("\n".join(comparison(old, "fixed", rows) + comparison(old, "presets", preset_rows)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench``: the same as ``cute-moe bench``."""
    return module_main("bench", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
