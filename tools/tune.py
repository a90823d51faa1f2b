"""Measure the candidate kernel configs of a model's expert GEMMs on the GPU; write a tuned table.

Each measured launch takes its per-expert row counts from the benchmark's random top-k router (uneven,
as in serving), so its rows-per-group hint, and with it the table key, is the one a real launch of that
load carries. For each problem (kind, N, K, rows-per-group bucket) the candidates are compiled first, in parallel
CPU processes, into the disk cache; then each candidate runs through the public op under
``force_config``, timed with CUDA-graph replays after warm-up (median), interleaved with the
baseline: what the dispatcher takes without the key's entry (``dispatch.fallback_choice``: the
hint-free key's entry, else the rules). A candidate whose output differs from the baseline's
(calc_diff > 1e-5) is rejected. The winner of a table key is the config with the lowest mean time
relative to the baseline over the key's loads. Entries are merged into --out (default: the user's table,
``$XDG_CONFIG_HOME/cute-moe/tuned/<arch>.json``, which the dispatcher reads over the shipped one).

    cute-moe tune --model Qwen3-30B-A3B --ep 8 --tokens 16,128,1024,8192
    cute-moe tune --model all --dtype bf16,fp8 --kinds contiguous,ragged,masked --decode-m 8,16,32,64 --space near

``--model all`` tunes every preset at the expert-parallel degree it is served at (``SERVING_EP``);
``--decode-m`` measures masked (decode) launches at these mean rows per expert instead of at the
token counts; ``--space near`` measures only the rules' and the baseline's choices and their
neighbours (one of tile rows, tile columns or cluster shape changed), about a third of the full space.
"""

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from cute_moe import cache
from cute_moe.arch import default_arch, get_backend
from cute_moe.dispatch import (KINDS_WITH_ROW_HINT, TABLE_KEY_FIELDS, TUNED_TABLE_FORMAT, Problem, fallback_choice,
                               format_config, problem_of, read_tuned_table, reload_tuned_table, rows_per_group,
                               spec_of, table_entry, table_key, user_table_path)
from cute_moe.layouts.alignment import align, get_mk_alignment_for_contiguous_layout
from cute_moe.models import (PRESETS, SERVING_EP, MoeModel, expected_rows, expert_gemms, get_preset, load_shapes,
                             model_errors)
from cute_moe.operands import torch_dtype
from cute_moe.specs import ALIGNED_KINDS

from .bench_presets import MASKED_ROW_MULTIPLE, aligned_segments, decode_tokens, route_counts
from .command import module_main, require_gpu
from .precompile import PRECISIONS, Task, build, check_positive, model_help, parse_dtypes, parse_kinds

DEFAULT_TOKENS = "16,128,1024,8192"
ALL_MODELS = "all"  # --model all: every preset at its serving EP degree
SPACES = ("all", "near")  # --space: every admitted config, or the rules' / baseline's and their one-field neighbours
MAX_DIFF = 1e-5
WIN_MARGIN = 0.02  # a tuned entry must beat the baseline by this fraction of its time, same run
KernelConfig = Any  # the arch backend's config type
ROUTER_SEED = 0  # the per-expert counts of a tuning run are reproducible


@dataclass(frozen=True)
class Workload:
    """One measured launch: ``counts[g]`` rows in group g (a random top-k router's uneven counts) and
    the rows-per-group hint the launch carries (``launch_hint``)."""

    kind: str
    n: int
    k: int
    counts: tuple[int, ...]
    hint: int
    dtype: str  # a --dtype name
    d_dtype: str

    @property
    def groups(self) -> int:
        return len(self.counts)


def candidate_configs(p: Problem, space: str = "all") -> list[KernelConfig]:
    """The search space: the arch backend's candidates for the problem; ``near``: only the rules' and
    the baseline's choices and the candidates that differ from one of them in one of tile rows, tile
    columns, cluster shape."""
    backend = get_backend(p.arch)
    candidates = backend.candidate_configs(p)
    if space == "all":
        return candidates
    centres = (backend.rule_config(p), fallback_choice(p)[0])

    def traits(c: KernelConfig) -> tuple:
        return c.tile_m, c.tile_n, (c.cluster_m, c.cluster_n)

    return [c for c in candidates
            if any(sum(a != b for a, b in zip(traits(c), traits(centre))) <= 1 for centre in centres)]


def launch_hint(kind: str, counts: tuple[int, ...], alignment: int, expected_m: int) -> int:
    """The rows-per-group hint of a launch with these group counts: masked the caller's ``expected_m``;
    contiguous and ragged what the launcher derives (``rows_per_group`` of A's rows: contiguous A holds
    whole aligned segments); psum none."""
    if kind == "masked":
        return expected_m
    if kind not in KINDS_WITH_ROW_HINT:
        return 0
    rows = aligned_segments(counts, alignment)[1] if kind in ALIGNED_KINDS else sum(counts)
    return rows_per_group(rows, len(counts))


def parse_counts(option: str, text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (sorted, duplicates dropped)."""
    try:
        counts = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return counts


def models_and_ep(args: argparse.Namespace) -> list[tuple[MoeModel, int]]:
    """The models to tune with their expert-parallel degree: --ep if given, else a preset's serving EP
    under --model all and 1 otherwise."""
    if args.model and args.model.lower() == ALL_MODELS:
        return [(m, args.ep or SERVING_EP.get(m.name, 1)) for m in PRESETS.values()]
    models = [get_preset(args.model)] if args.model else load_shapes(args.shapes)
    return [(m, args.ep or 1) for m in models]


def plan_workloads(args: argparse.Namespace, alignment: int) -> dict[tuple, list[tuple[Problem, Workload]]]:
    """Tuned-table key -> the (problem, workload) pairs measured for it (model GEMMs x kinds x loads).
    Each load's per-expert counts come from the benchmark's top-k router (uneven, some experts may be
    empty); a load that leaves the rank's experts no row is skipped."""
    dtypes = parse_dtypes(args.dtype)
    kinds = parse_kinds(args.kinds, dtypes)
    tokens = parse_counts("--tokens", args.tokens)
    decode_m = parse_counts("--decode-m", args.decode_m) if args.decode_m else None
    generator = torch.Generator().manual_seed(ROUTER_SEED)
    keyed: dict[tuple, list[tuple[Problem, Workload]]] = {}
    for (model, ep), dtype in itertools.product(models_and_ep(args), dtypes):
        precision = PRECISIONS[dtype]
        with model_errors(model):
            for gemm, kind in itertools.product(expert_gemms(model, ep, args.tp), precision.kinds):
                if kinds is not None and kind not in kinds:
                    continue
                if kind == "masked" and decode_m:
                    loads = [(decode_tokens(model, ep, m), m) for m in decode_m]
                else:
                    loads = [(count, max(1, expected_rows(model, count, ep))) for count in tokens]
                for count, expected_m in loads:
                    counts = route_counts(model, count, ep, generator)
                    if not any(counts):
                        continue
                    hint = launch_hint(kind, counts, alignment, expected_m)
                    problem = problem_of(kind, gemm.n, gemm.k, gemm.num_groups, hint,
                                         alignment if kind in ALIGNED_KINDS else 0, arch=args.arch,
                                         a=precision.a, b=precision.b, d_dtype=precision.d_dtype)
                    get_backend(args.arch).check_spec(problem)  # e.g. too many groups: refused before any work
                    item = (problem, Workload(kind, gemm.n, gemm.k, counts, hint, dtype, precision.d_dtype))
                    items = keyed.setdefault(table_key(problem), [])
                    if item not in items:
                        items.append(item)
    return keyed


class Bench:
    """Rotating input sets of one workload and a launcher per config through the public op."""

    def __init__(self, w: Workload, alignment: int):
        from .bench_common import randn, sets_for

        self.w = w
        self.out_dtype = torch_dtype(w.d_dtype)
        counts = torch.tensor(w.counts, dtype=torch.int32)
        if w.kind == "masked":
            self.shape = (w.groups, align(max(w.counts), MASKED_ROW_MULTIPLE))
            self.valid = (torch.arange(self.shape[1])[None, :] < counts[:, None]).flatten()
            aux = counts
        elif w.kind in ALIGNED_KINDS:
            starts, total = aligned_segments(w.counts, alignment)
            self.shape = (total,)
            self.valid = torch.zeros(total, dtype=torch.bool)
            layout = torch.full((total,), -1, dtype=torch.int32)
            for g, (start, count) in enumerate(zip(starts, w.counts)):
                self.valid[start:start + count] = True
                layout[start:start + count] = g
            aux = layout if w.kind == "contiguous" else torch.tensor(starts, dtype=torch.int32) + counts
        else:
            self.shape, self.valid = (sum(w.counts),), None
            aux = counts.cumsum(0).to(torch.int32)
        aux = aux.cuda()
        self.valid = None if self.valid is None else self.valid.cuda()
        rows = math.prod(self.shape)
        self.sets = []
        for _ in range(sets_for((rows * w.k + w.groups * w.n * w.k + rows * w.n) * 2)):
            a = randn(*self.shape, w.k)
            d = torch.empty(*self.shape, w.n, device="cuda", dtype=self.out_dtype)
            self.sets.append((self._operand(a, False), self._operand(randn(w.groups, w.n, w.k), True), d, aux))
        self.out = None

    def _operand(self, x, weights: bool):
        """bf16 as is; fp8: (E4M3, scales) with per-token (activations) or 128x128 (weights) scales;
        fp8xfp4 / bf16xfp4: MXFP4 weights (packed E2M1, UE8M0 exponents) and fp8 / bf16 activations."""
        if weights and self.w.dtype.endswith("xfp4"):
            from .bench_fp4 import mxfp4_weights

            return mxfp4_weights(x)[0]
        if self.w.dtype.startswith("bf16"):
            return x
        import cute_moe

        if weights:
            return cute_moe.per_block_cast_to_fp8(x)
        q, sf = cute_moe.per_token_cast_to_fp8(x.reshape(-1, x.shape[-1]))
        return q.view(x.shape), cute_moe.get_mn_major_tma_aligned_tensor(sf.view(*x.shape[:-1], sf.shape[-1]))

    def launcher(self, config: KernelConfig) -> Callable[[int], None]:
        import cute_moe
        from cute_moe.dispatch import force_config

        w = self.w
        prefix = {"bf16": "bf16", "fp8": "fp8", "fp8xfp4": "fp8_fp4", "bf16xfp4": "bf16_fp4"}[w.dtype]
        masked = getattr(cute_moe, f"m_grouped_{prefix}_gemm_nt_masked")
        contiguous = getattr(cute_moe, f"m_grouped_{prefix}_gemm_nt_contiguous")

        def launch(i: int) -> None:
            a, weights, d, aux = self.sets[i % len(self.sets)]
            with force_config(config):
                if w.kind == "masked":
                    masked(a, weights, d, aux, w.hint)
                elif w.kind in ALIGNED_KINDS:
                    contiguous(a, weights, d, aux, use_psum_layout=w.kind == "psum")
                else:
                    d = cute_moe.grouped_mm(a, weights.transpose(1, 2), aux, self.out_dtype)
            self.out = d
        return launch

    def valid_rows(self):
        """The rows of the last output that the op defines (not the padding of aligned or masked kinds)."""
        if self.valid is None:
            return self.out
        return self.out.reshape(-1, self.w.n)[self.valid]


def measure(items: list[tuple[Problem, Workload]], candidates: list[KernelConfig], baseline: KernelConfig,
            alignment: int, repeats: int) -> tuple[dict[KernelConfig, float], float]:
    """Mean time relative to the baseline config per valid candidate, and the baseline's mean microseconds."""
    from cute_moe.testing import calc_diff

    from .bench_common import time_pair

    scores: dict[KernelConfig, list[float]] = {c: [] for c in candidates}
    baseline_us = []
    for problem, workload in items:
        bench = Bench(workload, alignment)
        bench.launcher(baseline)(0)
        reference = bench.valid_rows().clone()
        for config in list(scores):
            try:
                bench.launcher(config)(0)
                diff = calc_diff(bench.valid_rows(), reference)
                if diff > MAX_DIFF:
                    raise ValueError(f"calc_diff {diff:.1e} against the baseline config")
                t_config, t_baseline = time_pair(bench.launcher(config), bench.launcher(baseline), len(bench.sets),
                                                 repeats)
            except Exception as e:  # noqa: BLE001 - a failing candidate is dropped, the search goes on
                print(f"  {format_config(config)}: rejected ({type(e).__name__}: {e})", file=sys.stderr)
                del scores[config]
                continue
            scores[config].append(t_config / t_baseline)
            baseline_us.append(t_baseline)
    means = {c: statistics.fmean(s) for c, s in scores.items() if s}
    return means, statistics.fmean(baseline_us) if baseline_us else 0.0


def beats_baseline(relative_time: float) -> bool:
    """Whether a candidate's mean time relative to the baseline's (same run) earns a table entry: faster
    by at least WIN_MARGIN, so an entry can never make a shape slower than the dispatcher's choice
    without it, within noise."""
    return relative_time <= 1.0 - WIN_MARGIN


def write_table(path: Path, entries: list[dict], dropped: frozenset = frozenset()) -> None:
    """Merge ``entries`` into the table at ``path`` (same key: replaced) and remove the entries whose
    key is in ``dropped`` (table keys where the baseline won); written atomically."""
    old = json.loads(path.read_text())["entries"] if path.exists() else []

    def key(entry: dict) -> tuple:
        return tuple(entry[f] for f in TABLE_KEY_FIELDS)

    replaced = {key(e) for e in entries} | dropped
    merged = sorted([e for e in old if key(e) not in replaced] + entries, key=lambda e: tuple(map(str, key(e))))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"format": TUNED_TABLE_FORMAT, "entries": merged}, indent=1) + "\n")
    tmp.replace(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=f"{model_help()}; or {ALL_MODELS}: every preset at its serving EP degree")
    source.add_argument("--shapes", metavar="FILE", help="JSON file of models (see precompile --help)")
    parser.add_argument("--ep", type=int, default=None,
                        help="expert-parallel ranks (default: 1; under --model all each preset's serving EP)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--dtype", default="bf16", help="comma-separated operand precisions (default bf16)")
    parser.add_argument("--kinds", help="comma-separated subset of contiguous,psum,masked,ragged (default: all)")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS,
                        help=f"token counts per rank to measure (default {DEFAULT_TOKENS})")
    parser.add_argument("--decode-m", help="masked kind: mean rows per expert to measure, comma-separated "
                        "(default: the rows the --tokens counts give)")
    parser.add_argument("--space", choices=SPACES, default="all",
                        help="candidates: all the backend admits, or near: the rules' and the baseline's "
                        "choices and their neighbours "
                        "(one of tile rows, tile columns, cluster shape changed)")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays per timing (median)")
    parser.add_argument("--jobs", type=int, default=8, help="parallel compile processes for the candidates")
    parser.add_argument("--out", help="tuned table to merge into (default: the user's table "
                        "$XDG_CONFIG_HOME/cute-moe/tuned/<arch>.json, XDG_CONFIG_HOME defaulting to ~/.config; "
                        "the dispatcher reads it over the table shipped in the package)")


def output_path(out: Optional[str], arch: str) -> Path:
    """--out, else the user's tuned table of ``arch`` (never the installed package's)."""
    return Path(out).expanduser() if out else user_table_path(arch)


def run(args: argparse.Namespace) -> int:
    """Validate, check for a GPU, compile the candidates, measure, write; returns the exit status. Bad
    arguments: ValueError; no GPU: NoGpuError (both before anything is printed)."""
    alignment = get_mk_alignment_for_contiguous_layout()
    args.arch = default_arch()
    if args.ep is not None:
        check_positive("--ep", args.ep)
    keyed = plan_workloads(args, alignment)
    check_positive("--repeats", args.repeats)
    check_positive("--jobs", args.jobs)
    out = output_path(args.out, args.arch)
    if out.exists():
        read_tuned_table(out)  # refuse to merge into a broken table before measuring anything
    require_gpu(f"measuring {args.arch} kernels")
    if cache.cache_enabled():
        tasks = {(spec_of(p), c)
                 for items in keyed.values() for p, _ in items for c in candidate_configs(p, args.space)}
        print(f"compiling {len(tasks)} candidate specializations with {args.jobs} processes", file=sys.stderr)
        build([Task(spec, config, ()) for spec, config in tasks], cache.cache_root(), args.jobs)
    torch.manual_seed(0)
    written = removed = 0
    for number, items in enumerate(keyed.values(), 1):
        problem = items[0][0]
        print(f"[{number}/{len(keyed)}] {problem}: {len(items)} workload(s)", file=sys.stderr, flush=True)
        baseline, source = fallback_choice(problem)
        means, baseline_us = measure(items, candidate_configs(problem, args.space), baseline, alignment,
                                     args.repeats)
        if not means:
            print("  no valid candidate; keeping the baseline", file=sys.stderr)
            continue
        best = min(means, key=means.get)
        print(f"  best {format_config(best)}: {means[best]:.3f}x the baseline's time "
              f"(baseline {format_config(baseline)} from the {source}, {baseline_us:.1f} us); all: "
              + ", ".join(f"{format_config(c)} {t:.3f}" for c, t in sorted(means.items(), key=lambda item: item[1])),
              flush=True)
        # Written key by key, so an interrupted run keeps what it measured. The baseline's own config
        # (a candidate of its space) never becomes an entry: its time against itself is noise.
        if best != baseline and beats_baseline(means[best]):
            write_table(out, [table_entry(problem, best, baseline_us=round(baseline_us, 2),
                                          relative_time=round(means[best], 4))])
            written += 1
        else:
            print(f"  not {WIN_MARGIN:.0%} faster than the baseline: no entry", flush=True)
            write_table(out, [], frozenset({table_key(problem)}))
            removed += 1
    reload_tuned_table()
    print(f"wrote {written} entries to {out}" + (f", removed {removed} keys where the baseline won" if removed else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.tune``: the same as ``cute-moe tune``."""
    return module_main("tune", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
