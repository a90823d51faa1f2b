"""Benchmark the MXFP4-weight GEMMs (FP8 x FP4, BF16 x FP4) against our FP8 and BF16 kernels and
torch._grouped_mm on the dequantized weights, in one run, at the expert GEMMs of the FP4 presets.

Per model preset (one rank under --ep), per expert GEMM (gate_up, down): masked decode with every
expert holding expected_m rows (8, 16, 64) and contiguous prefill (--tokens per rank). Rows:
FP8 x FP4 vs our FP8 (1x128 / 128x128 block scales), BF16 x FP4 vs our BF16, and BF16 x FP4 vs
torch._grouped_mm on the packed valid rows with the dequantized weights in BF16. Timing is
tools/bench_common's: CUDA-graph replays after warm-up, inputs rotated past the L2, baseline
interleaved, median. "GB/s" is the effective weight bandwidth of the FP4 kernel: (packed FP4 bytes
+ UE8M0 scale bytes) / time. calc_diff is the FP4 kernel's output against an FP64 product of the
dequantized operands. Results go to --out as bench_fp4.md and bench_fp4.json.
--tile-sweep MODELS adds, for those models' decode-target problems (masked, expected_m <= 16) and
contiguous prefill, per FP4 pair, one row per weight-row tile of the swap-AB kernel (tile_n 64 .. 256:
one to four consumer warpgroups, at the rules' token tile, forced) against the same baseline, so
that the rules' choice (fp4_rules.swap_tile_n) can be checked.

    python3 -m cute_moe.tools.bench_fp4 --out DIR [--quick] [--models gpt-oss-120b,...] [--ep 8]
        [--tile-sweep gpt-oss-120b]
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch

import cute_moe
from cute_moe.dispatch import choose_config, force_config, problem_of
from cute_moe.kernels.sm90.config import SWAP_AB_TILE_NS, Sm90Config
from cute_moe.kernels.sm90.fp4_rules import swap_max_tile_n
from cute_moe.operands import PRECISIONS
from cute_moe.layouts.alignment import align
from cute_moe.models import FP4_WEIGHT_MODELS, PRESETS, expected_rows, expert_gemms, get_preset
from cute_moe.testing import calc_diff

from .bench_common import HEADER, Row, format_row, quantize_rows, randn, sets_for, time_pair
from .command import make_out_dir, module_main, require_gpu
from .precompile import parse_csv

MODELS = ("gpt-oss-120b", "DeepSeek-V4-Flash", "Qwen3-235B-A22B")
QUICK_MODELS = ("gpt-oss-120b", "DeepSeek-V4-Flash")
DECODE_EXPECTED_M = (8, 16, 64)
QUICK_DECODE_EXPECTED_M = (8, 16, 64)  # the decode targets are at expected_m <= 16
PREFILL_TOKENS = 4096
SWEEP_MAX_EXPECTED_M = 16  # --tile-sweep: the decode targets are at expected_m <= 16
MX = 32


def mxfp4_weights(w: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(packed int8, kernel-layout UE8M0 exponents) of [G, N, K] weights, and their dequantization."""
    packed, sf = cute_moe.per_token_cast_to_fp4(w)
    g, n, k = w.shape
    sfb = cute_moe.transform_sf_into_required_layout(cute_moe.float_to_ue8m0(sf), n, k, (1, MX), g)
    return (packed, sfb), cute_moe.per_token_dequant_fp4(packed, sf)


class Problem:
    """One benchmarked problem: every operand format of ``sets`` rotating input sets."""

    def __init__(self, kind: str, g: int, rows: int, n: int, k: int):
        self.kind, self.g, self.rows, self.n, self.k = kind, g, rows, n, k
        alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
        self.seg = rows if kind == "masked" else align(rows, alignment)
        total = g * self.seg
        self.valid = g * rows
        self.sets = []
        for _ in range(sets_for(g * n * k // 2 + total * k)):
            x = randn(g, self.seg, k) if kind == "masked" else randn(total, k)
            fp4, w = mxfp4_weights(randn(g, n, k))
            w16 = w.to(torch.bfloat16)
            self.sets.append(dict(x=x, x8=quantize_rows(x), fp4=fp4, w=w, w16=w16,
                                  w8=cute_moe.per_block_cast_to_fp8(w16)))
        shape = (g, self.seg, n) if kind == "masked" else (total, n)
        self.d = {name: torch.empty(shape, device="cuda", dtype=torch.bfloat16) for name in ("fp4", "ref")}
        if kind == "masked":
            self.aux = torch.full((g,), rows, device="cuda", dtype=torch.int32)
        else:
            ids = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(self.seg)
            self.aux = torch.where(torch.arange(total, device="cuda") % self.seg < rows, ids, -1).to(torch.int32)
        self.offs = (torch.arange(1, g + 1, device="cuda", dtype=torch.int32) * rows)
        self.packed_rows = [s["x"].reshape(g, self.seg, k)[:, :rows].reshape(-1, k).contiguous() for s in self.sets]

    @property
    def weight_bytes(self) -> int:
        return self.g * self.n * (self.k // 2 + self.k // MX)

    def op(self, pair: str) -> Callable[[int], None]:
        """A launch of set i for ``pair``: fp8xfp4, bf16xfp4, fp8, bf16, or torch (dequantized BF16)."""
        masked = self.kind == "masked"

        def launch(i: int) -> None:
            s = self.sets[i % len(self.sets)]
            d = self.d["fp4" if pair.endswith("xfp4") else "ref"]
            a = s["x8"] if pair.startswith("fp8") else s["x"]
            b = {"fp8xfp4": s["fp4"], "bf16xfp4": s["fp4"], "fp8": s["w8"], "bf16": s["w16"]}.get(pair)
            if pair == "torch":
                torch._grouped_mm(self.packed_rows[i % len(self.sets)], s["w16"].transpose(1, 2), offs=self.offs)
            elif masked:
                {"fp8xfp4": cute_moe.m_grouped_fp8_fp4_gemm_nt_masked,
                 "bf16xfp4": cute_moe.m_grouped_bf16_fp4_gemm_nt_masked,
                 "fp8": cute_moe.m_grouped_fp8_gemm_nt_masked,
                 "bf16": cute_moe.m_grouped_bf16_gemm_nt_masked}[pair](a, b, d, self.aux, self.rows)
            else:
                {"fp8xfp4": cute_moe.m_grouped_fp8_fp4_gemm_nt_contiguous,
                 "bf16xfp4": cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous,
                 "fp8": cute_moe.m_grouped_fp8_gemm_nt_contiguous,
                 "bf16": cute_moe.m_grouped_bf16_gemm_nt_contiguous}[pair](a, b, d, self.aux)
        return launch

    def fp4_diff(self, pair: str) -> float:
        """calc_diff of set 0's FP4 output against FP64 on the dequantized operands (valid rows)."""
        self.op(pair)(0)
        s = self.sets[0]
        a = (cute_moe.per_token_dequant(*cute_moe.per_token_cast_to_fp8(s["x"])) if pair.startswith("fp8")
             else s["x"].float())
        a = a.view(self.g, self.seg, self.k)[:, :self.rows]
        ref = a.double() @ s["w"].double().transpose(1, 2)
        out = self.d["fp4"].view(self.g, self.seg, self.n)[:, :self.rows]
        return calc_diff(out, ref)


def bench_problem(label: str, p: Problem) -> list[Row]:
    """The three rows of one problem (see the module docstring)."""
    rows = []
    flops = 2 * p.valid * p.n * p.k
    shape = f"{label} G={p.g} m={p.rows} n={p.n} k={p.k}"
    for ours, base, baseline in (("fp8xfp4", "fp8", "our FP8"), ("bf16xfp4", "bf16", "our BF16"),
                                 ("bf16xfp4", "torch", "torch._grouped_mm (dequantized BF16)")):
        diff = p.fp4_diff(ours)
        t_ours, t_base = time_pair(p.op(ours), p.op(base), len(p.sets))
        note = "ships FP4" if label.split("/")[0] in FP4_WEIGHT_MODELS else ""
        rows.append(Row(f"{p.kind} {ours}", shape, t_ours, t_base, flops / t_ours / 1e6,
                        p.weight_bytes / t_ours / 1e3, t_base / t_ours, diff, baseline, note))
    return rows


def sweep_rows(label: str, p: Problem) -> list[Row]:
    """Per FP4 pair, every swap-AB weight-row tile the rules' token tile allows, forced, against the
    pair's baseline (our FP8 / BF16 kernel); the rules' own tile is marked."""
    rows = []
    flops = 2 * p.valid * p.n * p.k
    shape = f"{label} G={p.g} m={p.rows} n={p.n} k={p.k}"
    masked = p.kind == "masked"
    for ours, base, baseline in (("fp8xfp4", "fp8", "our FP8"), ("bf16xfp4", "bf16", "our BF16")):
        a, b = PRECISIONS[ours]
        rule = choose_config(p.kind, p.n, p.k, p.g, p.rows if masked else 0,
                             0 if masked else cute_moe.get_mk_alignment_for_contiguous_layout(), a=a, b=b)
        if not rule.swap_ab:
            continue
        problem = problem_of(p.kind, p.n, p.k, p.g, 0, 0, a=a, b=b)
        for tile_n in (t for t in SWAP_AB_TILE_NS if t <= swap_max_tile_n(problem, rule.tile_m)):
            config = Sm90Config(tile_m=rule.tile_m, tile_n=tile_n, swap_ab=1)
            launch = p.op(ours)

            def forced(i: int, launch=launch, config=config) -> None:  # the baseline keeps its own rules
                with force_config(config):
                    launch(i)

            with force_config(config):
                diff = p.fp4_diff(ours)
            t_ours, t_base = time_pair(forced, p.op(base), len(p.sets))
            note = "rules' tile" if tile_n == rule.tile_n else ""
            rows.append(Row(f"{p.kind} {ours} swap {rule.tile_m}x{tile_n}", shape, t_ours, t_base,
                            flops / t_ours / 1e6, p.weight_bytes / t_ours / 1e3, t_base / t_ours, diff, baseline,
                            note))
    return rows


def bench_rows(models: list[str], ep: int, quick: bool, emit: Callable[[Row], None],
               tile_sweep: tuple[str, ...] = ()) -> list[Row]:
    rows = []
    for name in models:
        model = get_preset(name)
        gemms = expert_gemms(model, ep)[:1] if quick else expert_gemms(model, ep)
        for gemm in gemms:
            label = f"{model.name}/{gemm.name}"
            plans = [("masked", m) for m in (QUICK_DECODE_EXPECTED_M if quick else DECODE_EXPECTED_M)]
            plans.append(("contiguous", max(1, expected_rows(model, PREFILL_TOKENS, ep))))
            for kind, m in plans:
                problem = Problem(kind, gemm.num_groups, m, gemm.n, gemm.k)
                swept = name in tile_sweep and (kind == "contiguous" or m <= SWEEP_MAX_EXPECTED_M)
                sweep = sweep_rows(label, problem) if swept else []
                for row in bench_problem(label, problem) + sweep:
                    emit(row)
                    rows.append(row)
                del problem
                torch.cuda.empty_cache()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None,
                        help=f"comma-separated presets among {', '.join(PRESETS)} (default: {', '.join(MODELS)}; "
                        f"--quick: {', '.join(QUICK_MODELS)})")
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel ranks: experts per rank = experts / ep")
    parser.add_argument("--quick", action="store_true",
                        help=f"gate_up only, expected_m {QUICK_DECODE_EXPECTED_M}, models {', '.join(QUICK_MODELS)} "
                        f"(default both GEMMs, {DECODE_EXPECTED_M}); about 2 minutes with compiles")
    parser.add_argument("--tile-sweep", default="", metavar="MODELS",
                        help="comma-separated presets among --models whose problems also time every "
                        "swap-AB weight-row tile (tile_n 64..256)")
    parser.add_argument("--out", default="bench_results", help="folder for bench_fp4.md and bench_fp4.json")


def run(args: argparse.Namespace) -> int:
    names = args.models or ",".join(QUICK_MODELS if args.quick else MODELS)
    models = [get_preset(name).name for name in parse_csv(names)]
    tile_sweep = tuple(get_preset(name).name for name in parse_csv(args.tile_sweep)) if args.tile_sweep else ()
    if set(tile_sweep) - set(models):
        raise ValueError(f"--tile-sweep: expected models among --models ({', '.join(models)}), "
                         f"got {', '.join(sorted(set(tile_sweep) - set(models)))}")
    if args.ep < 1:
        raise ValueError(f"--ep: expected a positive integer, got {args.ep}")
    for name in models:
        expert_gemms(get_preset(name), args.ep)  # --ep must divide every model's experts
    require_gpu("benchmarking")
    make_out_dir(args.out)
    torch.manual_seed(0)
    print(HEADER, flush=True)
    rows = bench_rows(models, args.ep, args.quick, lambda row: print(format_row(row), flush=True), tile_sweep)
    note = (f"{time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}, torch {torch.__version__}, ep={args.ep}; "
            f"GB/s = FP4 weight bandwidth ((K/2 + K/32) bytes per weight row per expert) / time; "
            f"ours/baseline speed = baseline time / ours")
    table = "\n".join([HEADER] + [format_row(r) for r in rows])
    with open(os.path.join(args.out, "bench_fp4.md"), "w") as f:
        f.write(f"{note}\n\n{table}\n")
    with open(os.path.join(args.out, "bench_fp4.json"), "w") as f:
        json.dump({"note": note, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"\n{note}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_fp4``."""
    return module_main("bench-fp4", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
