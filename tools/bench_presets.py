"""The model-preset section of the benchmark: every preset's expert GEMMs with uneven routing.

For each preset (at the EP degree it is served with) and each expert GEMM (gate_up, down), per-expert
row counts come from a random top-k router whose experts differ in popularity, so counts are uneven
and some experts may get none. Prefill rows (contiguous, ragged, FP8 contiguous) run at several
token counts per rank; decode rows (masked, BF16 and FP8) at several expected rows per expert.
Ours and the baseline run on the same data in the same process (``bench_common.timed_row``):
- contiguous / ragged BF16: torch._grouped_mm on the packed rows (contiguous: ours on the aligned
  layout, padding rows not counted);
- FP8 contiguous and FP8 masked: torch._scaled_grouped_mm with row-wise FP8 scales on the packed rows;
- masked BF16: torch._grouped_mm on the packed rows.
Masked rows also report the weight bytes streamed per microsecond (TB/s), the decode metric.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import cute_moe
from cute_moe.layouts.alignment import align, get_mk_alignment_for_contiguous_layout
from cute_moe.models import PRESETS, SERVING_EP, MoeModel, expert_gemms
from cute_moe.testing import calc_diff

from .bench_common import Row, quantize_rows, randn, rowwise_fp8, sets_for, timed_row

TOKENS = (512, 4096, 16384)  # tokens per rank (prefill)
DECODE_EXPECTED_M = (8, 16, 32, 64)  # mean rows per local expert (decode)
QUICK_TOKENS = (4096,)
QUICK_DECODE_EXPECTED_M = (16, 64)
PRESET_KINDS = ("contiguous", "ragged", "fp8_contiguous", "masked", "fp8_masked")
POPULARITY_SPREAD = 0.3  # std of the per-expert logit bias: busiest expert ~2-3x the mean
MASKED_ROW_MULTIPLE = 16  # masked capacity (Mmax) is the largest count rounded up to this


@dataclass(frozen=True)
class PresetGemm:
    """One expert GEMM of a preset at one load: rows per local expert (uneven)."""

    model: MoeModel
    gemm: str
    n: int
    k: int
    counts: tuple[int, ...]
    load: str  # "T=4096" (tokens per rank) or "m~16" (decode: mean rows per expert)

    @property
    def shape(self) -> str:
        return (f"{self.model.name} {self.gemm} G={len(self.counts)} n={self.n} k={self.k} {self.load} "
                f"rows={sum(self.counts)} max={max(self.counts)}")


def route_counts(model: MoeModel, tokens: int, ep: int, generator: torch.Generator) -> tuple[int, ...]:
    """Rows each local expert (experts / ep of them) receives when every rank routes ``tokens`` tokens
    top-k over all experts, with per-expert popularity drawn once per call."""
    total_tokens = tokens * ep
    bias = torch.randn(model.experts, generator=generator) * POPULARITY_SPREAD
    logits = torch.randn(total_tokens, model.experts, generator=generator) + bias
    chosen = logits.topk(model.top_k, dim=1).indices.flatten()
    counts = torch.bincount(chosen, minlength=model.experts)[: model.experts // ep]
    return tuple(int(c) for c in counts)


def decode_tokens(model: MoeModel, ep: int, expected_m: int) -> int:
    """Tokens per rank that give ``expected_m`` rows per local expert on average."""
    return max(1, math.ceil(expected_m * model.experts / (model.top_k * ep)))


def plan(names: list[str], quick: bool, seed: int = 0) -> list[tuple[str, PresetGemm]]:
    """(kind, problem) pairs of the preset section, in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    tokens_list = QUICK_TOKENS if quick else TOKENS
    decode_list = QUICK_DECODE_EXPECTED_M if quick else DECODE_EXPECTED_M
    items = []
    for name in names:
        model, ep = PRESETS[name], SERVING_EP.get(name, 1)
        for gemm in expert_gemms(model, ep):
            for tokens in tokens_list:
                problem = PresetGemm(model, gemm.name, gemm.n, gemm.k, route_counts(model, tokens, ep, generator),
                                     f"T={tokens}")
                items += [(kind, problem) for kind in ("contiguous", "ragged", "fp8_contiguous")]
            for expected_m in decode_list:
                counts = route_counts(model, decode_tokens(model, ep, expected_m), ep, generator)
                problem = PresetGemm(model, gemm.name, gemm.n, gemm.k, counts, f"m~{expected_m}")
                items += [(kind, problem) for kind in ("masked", "fp8_masked")]
    return items


def _packed_offsets(counts: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)


def aligned_segments(counts: tuple[int, ...], alignment: int) -> tuple[list[int], int]:
    """First row of each group's segment in the aligned contiguous layout, and the layout's rows (at
    least one segment)."""
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += align(c, alignment)
    return starts, max(total, alignment)


def _aligned_layout(counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(grouped_layout of the aligned contiguous layout, index of each packed row in it, its rows)."""
    starts, total = aligned_segments(counts, get_mk_alignment_for_contiguous_layout())
    layout = torch.full((total,), -1, dtype=torch.int32)
    rows = []
    for g, (start, c) in enumerate(zip(starts, counts)):
        layout[start:start + c] = g
        rows.append(torch.arange(start, start + c))
    return layout.cuda(), torch.cat(rows).cuda(), total


def torch_baseline(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, rowwise: Optional[tuple] = None) -> torch.Tensor:
    """torch's grouped GEMM of packed rows: BF16 torch._grouped_mm, or with ``rowwise`` (rowwise_fp8's
    operands) torch._scaled_grouped_mm."""
    if rowwise is None:
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    a_row, w_row, scale_a, scale_b = rowwise
    return torch._scaled_grouped_mm(a_row, w_row.transpose(1, 2), scale_a, scale_b, offs=offs,
                                    out_dtype=torch.bfloat16)


def _row(kind: str, p: PresetGemm, ours: Callable[[int], object], base: Callable[[int], object], num_sets: int,
         diff: float, baseline: str, weight_bytes: int) -> Row:
    """Time the pair; GB/s counts the weights, the valid A rows (in their operand type) and D (BF16)."""
    valid = sum(p.counts)
    fp8 = kind.startswith("fp8")
    bytes_moved = weight_bytes + valid * (p.k * (1 if fp8 else 2) + p.n * 2)
    row = timed_row(kind, p.shape, ours, base, num_sets, 2 * valid * p.n * p.k, bytes_moved, diff, baseline,
                    operand="fp8" if fp8 else "bf16")
    if kind.endswith("masked"):
        row.note = f"{weight_bytes / row.ours_us / 1e6:.2f} TB/s weights"
    return row


def bench_prefill(kind: str, p: PresetGemm) -> Row:
    """contiguous / ragged (BF16) against torch._grouped_mm, fp8_contiguous against row-wise
    torch._scaled_grouped_mm, all on the same rows."""
    g, valid = len(p.counts), sum(p.counts)
    offs = _packed_offsets(p.counts)
    layout, packed_rows, total = _aligned_layout(p.counts)
    weight_bytes = g * p.n * p.k * (1 if kind.startswith("fp8") else 2)
    sets = []
    for _ in range(sets_for(weight_bytes + valid * (p.k + p.n) * 2)):
        a, w = randn(valid, p.k), randn(g, p.n, p.k)
        padded = torch.zeros(total, p.k, device="cuda", dtype=torch.bfloat16)
        padded[packed_rows] = a
        sets.append((a, w, padded, torch.empty(total, p.n, device="cuda", dtype=torch.bfloat16)))
    outs = {}
    if kind == "fp8_contiguous":
        fp8_sets = [(quantize_rows(padded), cute_moe.per_block_cast_to_fp8(w), rowwise_fp8(a, w))
                    for a, w, padded, _ in sets]

    def ours(i):  # the launch alone: it is what the CUDA graph times
        a, w, padded, d = sets[i]
        if kind == "contiguous":
            cute_moe.m_grouped_bf16_gemm_nt_contiguous(padded, w, d, layout)
            outs["ours"] = d
        elif kind == "ragged":
            outs["ours"] = cute_moe.grouped_mm(a, w.transpose(1, 2), offs)
        else:
            a_q, w_q, _ = fp8_sets[i]
            cute_moe.m_grouped_fp8_gemm_nt_contiguous(a_q, w_q, d, layout)
            outs["ours"] = d

    def base(i):
        a, w, _, _ = sets[i]
        outs["base"] = torch_baseline(a, w, offs, fp8_sets[i][2] if kind == "fp8_contiguous" else None)

    ours(0)
    base(0)
    diff = calc_diff(outs["ours"] if kind == "ragged" else outs["ours"][packed_rows], outs["base"])
    baseline = "torch._scaled_grouped_mm (row-wise)" if kind == "fp8_contiguous" else "torch._grouped_mm"
    return _row(kind, p, ours, base, len(sets), diff, baseline, weight_bytes)


def bench_decode(kind: str, p: PresetGemm) -> Row:
    """masked (BF16) against torch._grouped_mm, fp8_masked against row-wise torch._scaled_grouped_mm,
    on the packed rows of the same data."""
    g = len(p.counts)
    max_m = max(MASKED_ROW_MULTIPLE, align(max(p.counts), MASKED_ROW_MULTIPLE))
    expected_m = max(1, round(sum(p.counts) / g))
    fp8 = kind == "fp8_masked"
    weight_bytes = g * p.n * p.k * (1 if fp8 else 2)
    masked_m = torch.tensor(p.counts, device="cuda", dtype=torch.int32)
    offs = _packed_offsets(p.counts)
    valid = torch.arange(max_m)[None, :] < torch.tensor(p.counts)[:, None]
    sets = []
    for _ in range(sets_for(weight_bytes)):
        a, w = randn(g, max_m, p.k), randn(g, p.n, p.k)
        packed = a[valid.cuda()]
        extra = (quantize_rows(a), cute_moe.per_block_cast_to_fp8(w), rowwise_fp8(packed, w)) if fp8 else None
        sets.append((a, w, packed, torch.empty(g, max_m, p.n, device="cuda", dtype=torch.bfloat16), extra))
    outs = {}

    def ours(i):
        a, w, _, d, extra = sets[i]
        if fp8:
            cute_moe.m_grouped_fp8_gemm_nt_masked(extra[0], extra[1], d, masked_m, expected_m)
        else:
            cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, masked_m, expected_m)
        outs["ours"] = d

    def base(i):
        _, w, packed, _, extra = sets[i]
        outs["base"] = torch_baseline(packed, w, offs, extra[2] if fp8 else None)

    ours(0)
    base(0)
    diff = calc_diff(outs["ours"][valid.cuda()], outs["base"])
    baseline = "torch._scaled_grouped_mm (row-wise, packed)" if fp8 else "torch._grouped_mm (packed rows)"
    return _row(kind, p, ours, base, len(sets), diff, baseline, weight_bytes)


def bench_preset_rows(names: list[str], kinds: set[str], quick: bool, emit: Callable[[Row], None]) -> list[Row]:
    """Measure the preset section; ``emit`` sees each row as it is measured."""
    rows = []
    for kind, problem in plan(names, quick):
        if kind not in kinds:
            continue
        bench = bench_decode if kind.endswith("masked") else bench_prefill
        try:
            rows.append(bench(kind, problem))
        except RuntimeError as e:  # e.g. a baseline that refuses the shape: report the row, go on
            print(f"| {kind} | {problem.shape} | not measured: {' '.join(str(e).split())[:200]} |", flush=True)
            continue
        emit(rows[-1])
    return rows


def summary(rows: list[Row]) -> list[str]:
    """Per kind: rows, geometric mean and minimum of ours/baseline speed, and the medians of ours' SM
    clock and of its share of the roofline (over the rows where they were read)."""
    lines = ["| kind | rows | geomean ours/baseline | min ours/baseline (row) | median SM MHz | median of roofline |",
             "|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r.kind for r in rows):
        ratios = [r for r in rows if r.kind == kind]
        geomean = math.exp(sum(math.log(r.ratio) for r in ratios) / len(ratios))
        worst = min(ratios, key=lambda r: r.ratio)
        clocks = [r.sm_mhz for r in ratios if r.sm_mhz]
        shares = [r.roofline for r in ratios if r.roofline]
        clock = f"{statistics.median(clocks):.0f}" if clocks else "—"
        share = f"{statistics.median(shares):.0%}" if shares else "—"
        lines.append(f"| {kind} | {len(ratios)} | {geomean:.3f}x | {worst.ratio:.3f}x ({worst.shape}) | {clock} | "
                     f"{share} |")
    return lines
