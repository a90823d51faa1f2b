"""Benchmark the hyper-connection ops on one GPU: the prenorm GEMM and hc_pre + hc_post.

    python3 -m cute_moe.tools.bench_hc --out DIR [--quick]

Prenorm GEMM (a [M, K] bf16, b [24, K] fp32) at K = 4 * hidden for hidden 4096 and 7168, plus K = 7168
(DeepGEMM's published shape), M in {1, 128, 4096, 16384}, with num_splits=None (the automatic split count
and the sum of the partials), 16 splits and 1 split (full run only): time and achieved bandwidth (bytes
of a, b, d, sqr_sum per us), against an FP32 torch matmul + square-sum. hc_pre + hc_post (n = 4, identity sub-layer), forward and forward+backward,
ours eager and under torch.compile against the float32 torch reference eager and under torch.compile.
CUDA graphs after warm-up, median of interleaved replays, inputs rotated past L2 (tools/bench_common).
Rows print to stdout as they finish; writes hc_bench.md and hc_bench.json to --out. --quick: hidden 7168
(K = 7168 and 28672), GEMM at M in {128, 16384}, hc_pre + hc_post at T = 16384 against the eager and the
compiled reference (about a minute, mostly torch.compile of the reference).
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from cute_moe import hc
from cute_moe.hc_reference import hc_post_reference, hc_pre_reference, mix_width
from cute_moe.testing import calc_diff

from .bench_common import randn, report_failure, sets_for, time_pair
from .command import make_out_dir, module_main, require_gpu

N_STREAMS = 4
HIDDENS = (4096, 7168)
TOKENS = (1, 128, 4096, 16384)
COMPILE_MIN_TOKENS = 4096  # torch.compile comparisons run where the targets are stated (T >= 4096)
SPLITS = 16
QUICK_HIDDENS = (7168,)
QUICK_TOKENS = (128, 16384)  # prenorm GEMM rows of --quick
QUICK_HC_TOKENS = (16384,)  # hc_pre + hc_post rows of --quick (where the targets are stated)
GEMM_HEADER = ("| M | K | splits | ours us | FP32 torch us | TB/s | speedup | calc_diff vs FP64 |\n"
               "|---|---|---|---|---|---|---|---|")
HC_HEADER = "| pass | hidden | T | ours | us | baseline | us | speedup |\n|---|---|---|---|---|---|---|---|"


@dataclass
class GemmRow:
    m: int
    k: int
    splits: str
    ours_us: float
    base_us: float
    tbps: float
    speedup: float
    diff: float


@dataclass
class HcRow:
    pass_: str
    hidden: int
    tokens: int
    ours: str
    ours_us: float
    baseline: str
    base_us: float
    speedup: float


def gemm_bytes(m: int, n: int, k: int, splits: int) -> int:
    return m * k * 2 + n * k * 4 + splits * m * (n + 1) * 4


def bench_gemm(m: int, k: int, splits: Optional[int]) -> GemmRow:
    n = mix_width(N_STREAMS)
    count = splits or 1
    num_sets = sets_for(m * k * 2)
    sets = [(randn(m, k), torch.randn(n, k, device="cuda")) for _ in range(num_sets)]
    d_shape, s_shape = ((splits, m, n), (splits, m)) if splits else ((m, n), (m,))
    d = torch.empty(d_shape, device="cuda")
    s = torch.empty(s_shape, device="cuda")

    def ours(i):
        hc.tf32_hc_prenorm_gemm(sets[i][0], sets[i][1], d, s, num_splits=splits)

    def base(i):
        af = sets[i][0].float()
        return af @ sets[i][1].T, af.square().sum(-1)

    ours(0)
    ref_d = sets[0][0].double() @ sets[0][1].double().T
    diff = calc_diff(d.sum(0) if splits else d, ref_d)
    ours_us, base_us = time_pair(ours, base, num_sets)
    tbps = gemm_bytes(m, n, k, count) / ours_us / 1e6
    return GemmRow(m, k, str(splits) if splits else "auto", ours_us, base_us, tbps, base_us / ours_us, diff)


def make_hc_inputs(tokens: int, hidden: int, grad: bool):
    x = randn(tokens * N_STREAMS, hidden).view(tokens, N_STREAMS, hidden)
    fn = torch.randn(mix_width(N_STREAMS), N_STREAMS * hidden, device="cuda") * 0.02
    scale = torch.rand(3, device="cuda") + 0.5
    base = torch.randn(mix_width(N_STREAMS), device="cuda")
    return [t.requires_grad_(grad) for t in (x, fn, scale, base)]


def ours_block(x, fn, scale, base):
    y, post, comb = hc.hc_pre(x, fn, scale, base)
    return hc.hc_post(y, x, post, comb)


def reference_block(x, fn, scale, base):
    y, post, comb = hc_pre_reference(x, fn, scale, base)
    return hc_post_reference(y.to(x.dtype), x, post, comb).to(x.dtype)


def step(block: Callable, input_sets: list[list], backward: bool) -> Callable[[int], object]:
    """launch(i): the block on input set i (forward, or forward and the gradients of every input)."""
    def launch(i):
        inputs = input_sets[i]
        out = block(*inputs)
        if backward:
            return torch.autograd.grad(out, inputs, torch.ones_like(out))
        return out
    return launch


def bench_hc(tokens: int, hidden: int, backward: bool, compiled: Optional[dict[str, Callable]]) -> list[HcRow]:
    """Rows of one (T, hidden, pass); ``compiled`` holds the torch.compile'd blocks (None: eager only)."""
    num_sets = sets_for(tokens * N_STREAMS * hidden * 2)
    input_sets = [make_hc_inputs(tokens, hidden, backward) for _ in range(num_sets)]
    pass_ = pass_name(backward)
    candidates = {"ours eager": ours_block, "reference eager": reference_block, **(compiled or {})}
    launches = {name: step(fn, input_sets, backward) for name, fn in candidates.items()}
    rows = []
    pairs = [("ours eager", "reference eager"), ("ours eager", "reference compiled"),
             ("ours compiled", "reference compiled")]
    pairs = [(a, b) for a, b in pairs if a in launches and b in launches]
    for ours_name, base_name in pairs:
        ours_us, base_us = time_pair(launches[ours_name], launches[base_name], num_sets)
        rows.append(HcRow(pass_, hidden, tokens, ours_name, ours_us, base_name, base_us, base_us / ours_us))
    return rows


def pass_name(backward: bool) -> str:
    return "fwd+bwd" if backward else "fwd"


def gemm_line(r: GemmRow) -> str:
    return (f"| {r.m} | {r.k} | {r.splits} | {r.ours_us:.1f} | {r.base_us:.1f} | {r.tbps:.2f} | {r.speedup:.2f}x | "
            f"{r.diff:.1e} |")


def hc_line(r: HcRow) -> str:
    return (f"| {r.pass_} | {r.hidden} | {r.tokens} | {r.ours} | {r.ours_us:.1f} | {r.baseline} | {r.base_us:.1f} | "
            f"{r.speedup:.2f}x |")


def write_report(out: str, gemm_rows: list[GemmRow], hc_rows: list[HcRow], failures: list[str]) -> None:
    lines = ["# Hyper-connection benchmark", "", f"GPU: {torch.cuda.get_device_name()}", "",
             "## Prenorm GEMM (N = 24; bandwidth = bytes of a, b, d, sqr_sum per us; splits auto = the",
             "automatic internal split + sum: num_splits=None)", "", GEMM_HEADER]
    lines += [gemm_line(r) for r in gemm_rows]
    lines += ["", "## hc_pre + hc_post (n = 4, identity sub-layer)", "", HC_HEADER]
    lines += [hc_line(r) for r in hc_rows]
    if failures:
        lines += ["", "## Rows that failed", ""] + [f"- {f}" for f in failures]
    with open(os.path.join(out, "hc_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "hc_bench.json"), "w") as f:
        json.dump({"gemm": [asdict(r) for r in gemm_rows], "hc": [asdict(r) for r in hc_rows], "failures": failures}, f,
                  indent=1)
    print(f"wrote {os.path.join(out, 'hc_bench.md')} and hc_bench.json", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"hidden {QUICK_HIDDENS}, T {QUICK_TOKENS} only")
    parser.add_argument("--out", default="bench_results", help="folder for hc_bench.md and hc_bench.json")


def run(args: argparse.Namespace) -> int:
    require_gpu("benchmarking")
    make_out_dir(args.out)
    hiddens, tokens = (QUICK_HIDDENS, QUICK_TOKENS) if args.quick else (HIDDENS, TOKENS)
    hc_tokens = QUICK_HC_TOKENS if args.quick else TOKENS
    ks = sorted({N_STREAMS * h for h in hiddens} | {7168})
    gemm_rows, hc_rows, failures = [], [], []
    print(GEMM_HEADER, flush=True)
    for k in ks:
        for m in tokens:
            # The automatic split (num_splits=None), DeepGEMM's 16, and in the full run no split at all.
            variants = (None, SPLITS) if args.quick else (None, SPLITS, 1)
            for splits in variants:
                print(f"prenorm gemm M={m} K={k} splits={splits}", file=sys.stderr, flush=True)
                try:
                    gemm_rows.append(bench_gemm(m, k, splits))
                    print(gemm_line(gemm_rows[-1]), flush=True)
                except Exception as e:  # noqa: BLE001 - one failed row is reported, the others still run
                    report_failure(e, f"gemm M={m} K={k} splits={splits}", failures)
    # One dynamic-shape compile of each block serves every (T, hidden); --quick compares with the
    # compiled reference only.
    compiled = {"reference compiled": torch.compile(reference_block, fullgraph=True, dynamic=True)}
    if not args.quick:
        compiled["ours compiled"] = torch.compile(ours_block, fullgraph=True, dynamic=True)
    print(HC_HEADER, flush=True)
    for hidden in hiddens:
        for t in hc_tokens:
            for backward in (False, True):
                print(f"hc_pre + hc_post hidden={hidden} T={t} backward={backward}", file=sys.stderr, flush=True)
                try:
                    new_rows = bench_hc(t, hidden, backward, compiled if t >= COMPILE_MIN_TOKENS else None)
                    hc_rows += new_rows
                    for row in new_rows:
                        print(hc_line(row), flush=True)
                except Exception as e:  # noqa: BLE001 - one failed row is reported, the others still run
                    report_failure(e, f"hc {pass_name(backward)} hidden={hidden} T={t}", failures)
                torch.cuda.empty_cache()
    write_report(args.out, gemm_rows, hc_rows, failures)
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_hc``."""
    return module_main("bench_hc", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
