"""Launch each FP4-weight kernel (and our FP8 / BF16 baselines) once, each in its own NVTX range, for a
profiler: ``<kind>_<m>_<pair>`` (e.g. ``masked_16_fp8xfp4``), after three untimed warm-up launches
(compile, caches). Problems: gpt-oss-120b gate_up at EP 8 (16 experts, N = 5760, K = 2880), masked
decode at expected_m 16 and 64 and contiguous prefill at 1024 rows per expert, the rules' configs.

    ncu --nvtx --nvtx-include "masked_16_fp8xfp4/" --set full -o fp4 \\
        python3 -m cute_moe.tools.profile_fp4 [--pairs fp8xfp4,fp8] [--cases masked:16,contiguous:1024]
    nsys profile -t cuda,nvtx python3 -m cute_moe.tools.profile_fp4
"""

import argparse
import sys
from typing import Optional

import torch

from .bench_fp4 import Problem
from .command import module_main, require_gpu
from .precompile import parse_csv

PAIRS = ("fp8xfp4", "fp8", "bf16xfp4", "bf16")
CASES = "masked:16,masked:64,contiguous:1024"
GROUPS, N, K = 16, 5760, 2880  # gpt-oss-120b gate_up at EP 8
WARMUP_LAUNCHES = 3


def parse_cases(text: str) -> list[tuple[str, int]]:
    """``"masked:16,contiguous:1024"`` -> [("masked", 16), ("contiguous", 1024)]."""
    cases = []
    for item in parse_csv(text):
        kind, _, rows = item.partition(":")
        if kind not in ("masked", "contiguous") or not rows.isdigit() or int(rows) < 1:
            raise ValueError(f"--cases: expected masked:ROWS or contiguous:ROWS with ROWS >= 1, got {item!r}")
        cases.append((kind, int(rows)))
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", default=CASES, help=f"comma-separated KIND:ROWS per expert (default {CASES})")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated among {', '.join(PAIRS)}")


def run(args: argparse.Namespace) -> int:
    cases = parse_cases(args.cases)
    pairs = parse_csv(args.pairs)
    unknown = [pair for pair in pairs if pair not in PAIRS]
    if unknown:
        raise ValueError(f"--pairs: expected names among {', '.join(PAIRS)}, got {', '.join(unknown)}")
    require_gpu("profiling")
    torch.manual_seed(0)
    for kind, rows in cases:
        problem = Problem(kind, GROUPS, rows, N, K)
        for pair in pairs:
            launch = problem.op(pair)
            for i in range(WARMUP_LAUNCHES):
                launch(i)
            torch.cuda.synchronize()
            name = f"{kind}_{rows}_{pair}"
            torch.cuda.nvtx.range_push(name)
            launch(0)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            print(f"launched {name}", flush=True)
        del problem
        torch.cuda.empty_cache()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.profile_fp4``."""
    return module_main("profile-fp4", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
