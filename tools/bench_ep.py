"""Benchmark EP dispatch / combine (cute_moe.ep) against NCCL all_to_all_single, on every visible GPU.

Launches one process per GPU (NCCL group, multicast off). Low-latency mode (masked layout): latency
of dispatch and of combine at 1, 8, 32, 128, 256 tokens per rank; throughput mode (psum layout):
algorithm bandwidth at 1024, 4096, 8192 tokens. Hidden 7168, top-8 of 256 experts, BF16 and FP8.
Baselines in the same run: NCCL all_to_all_single with the count exchange (and the host sync its
split sizes need), and a padded sync-free all_to_all_single of T rows to every rank. Timing: CUDA
events around a batch of calls (ours: a CUDA graph of the batch) after a barrier, median over samples,
the slowest rank reported. Algorithm bytes: each token row (payload + scales) once per destination
rank that owns one of its experts; combine returns one BF16 row per (token, destination rank).
Writes ep.md and ep.json to --out.
"""

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .collective_timing import timed_us
from .command import make_out_dir, module_main, require_gpu

HIDDEN, EXPERTS, TOPK = 7168, 256, 8
LATENCY_TOKENS = (1, 8, 32, 128, 256)
THROUGHPUT_TOKENS = (1024, 4096, 8192)
QUICK_LATENCY_TOKENS, QUICK_THROUGHPUT_TOKENS = (1, 128), (4096,)
CALLS_PER_SAMPLE = 10
SAMPLES, QUICK_SAMPLES = 20, 8
RUN_TIMEOUT_S = 600.0


@dataclass
class Row:
    mode: str
    dtype: str
    tokens: int
    op: str
    ours_us: float
    nccl_us: float
    padded_us: float
    bytes_per_rank: int
    fixed_us: float  # ours with 0 tokens (same buffer, graph): launch + signalling + barriers, no rows
    eager_us: float  # ours called eagerly (no graph): adds the host path (checks, TVM-FFI launch)


def _runner(fn, graph: bool):
    """A callable running fn CALLS_PER_SAMPLE times: replay of a CUDA graph of them, or eagerly."""
    if not graph:
        def run():
            for _ in range(CALLS_PER_SAMPLE):
                fn()
        return run
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        for _ in range(CALLS_PER_SAMPLE):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    return g.replay


def _time_us(cases: list[tuple], samples: int) -> list[float]:
    """Median µs per call of each (fn, graph) case; samples interleaved between the cases, each a
    batch of CALLS_PER_SAMPLE calls timed with CUDA events after a barrier; the slowest rank's median."""
    import torch.distributed as dist
    runs = [_runner(fn, graph) for fn, graph in cases]
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(samples):
        for run, samples_of in zip(runs, times):
            samples_of.append(timed_us(run, CALLS_PER_SAMPLE))
    t = torch.tensor([statistics.median(x) for x in times], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _inputs(tokens: int, fp8: bool, gen: torch.Generator):
    import cute_moe
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16).cuda()
    idx = torch.rand(tokens, EXPERTS, generator=gen).topk(TOPK, dim=1).indices.cuda()
    weights = torch.rand(tokens, TOPK, generator=gen).cuda()
    if fp8:
        q, s = cute_moe.per_token_cast_to_fp8(x)
        return (q.contiguous(), s.float().contiguous()), idx, weights
    return x, idx, weights


def _nccl_baselines(payload, idx, world: int, row_bytes: int):
    """(dispatch with count exchange, combine, padded dispatch) closures on uint8 row views."""
    import torch.distributed as dist
    rows = payload if isinstance(payload, torch.Tensor) else torch.cat(
        [payload[0].view(torch.uint8), payload[1].view(torch.uint8)], dim=1)
    rows = rows.view(torch.uint8)
    local = EXPERTS // world
    owners = torch.zeros(rows.shape[0], world, dtype=torch.bool, device="cuda")
    owners.scatter_(1, (idx // local).long(), True)
    dst_rank, token = owners.t().nonzero(as_tuple=True)  # grouped by destination rank
    send = rows[token]
    back = torch.empty(send.shape[0], HIDDEN * 2, dtype=torch.uint8, device="cuda")
    padded_in = rows.repeat(world, 1)
    padded_out = torch.empty_like(padded_in)
    state = {}

    def dispatch():
        send_counts = owners.sum(0).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        s_list, r_list = send_counts.tolist(), recv_counts.tolist()  # the host sync NCCL needs
        recv = torch.empty(sum(r_list), row_bytes, dtype=torch.uint8, device="cuda")
        dist.all_to_all_single(recv, send, r_list, s_list)
        state["splits"] = (s_list, r_list)

    def combine():
        s_list, r_list = state["splits"]
        y = torch.empty(sum(r_list), HIDDEN * 2, dtype=torch.uint8, device="cuda")
        dist.all_to_all_single(back, y, s_list, r_list)

    def padded():
        dist.all_to_all_single(padded_out, padded_in)

    return dispatch, combine, padded, int(owners.sum()) * row_bytes


def _measure(buf, rank: int, world: int, mode: str, layout: str, dtype: str, tokens: int, samples: int) -> list[dict]:
    """Rows (dispatch, combine) of one token count on one buffer."""
    fp8 = dtype == "fp8"
    row_bytes = HIDDEN + HIDDEN // 32 if fp8 else HIDDEN * 2
    gen = torch.Generator().manual_seed(1000 * rank + tokens)
    payload, idx, weights = _inputs(tokens, fp8, gen)
    d = buf.dispatch(payload, idx, weights, layout=layout)
    y = torch.empty(d.x.shape, dtype=torch.bfloat16, device="cuda").normal_()
    out = torch.empty(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    n_dispatch, n_combine, padded, sent = _nccl_baselines(payload, idx, world, row_bytes)
    empty = (payload[0][:0], payload[1][:0]) if fp8 else payload[:0]
    dispatch = lambda: buf.dispatch(payload, idx, weights, layout=layout)  # noqa: E731
    dispatch_empty = lambda: buf.dispatch(empty, idx[:0], weights[:0], layout=layout)  # noqa: E731
    ours_d, fixed_d, eager_d, nccl_d, pad = _time_us(
        [(dispatch, True), (dispatch_empty, True), (dispatch, False), (n_dispatch, False), (padded, False)], samples)
    # Combine reads the latest dispatch on the device: time the T-token combine after a T-token
    # dispatch, and the 0-token combine (fixed cost) separately after a 0-token dispatch.
    d = dispatch()
    ours_c, eager_c, nccl_c = _time_us([(lambda: buf.combine(y, d.handle, out=out), True),
                                        (lambda: buf.combine(y, d.handle, out=out), False), (n_combine, False)],
                                       samples)
    d0, out0 = dispatch_empty(), out[:0]
    (fixed_c,) = _time_us([(lambda: buf.combine(y, d0.handle, out=out0), True)], samples)
    buf.synchronize()
    back_bytes = sent // row_bytes * HIDDEN * 2
    if rank == 0:
        print(f"[bench_ep] {mode} {dtype} T={tokens}: dispatch {ours_d:.1f} us (fixed {fixed_d:.1f} at T=0, "
              f"eager {eager_d:.1f}), combine {ours_c:.1f} us (fixed {fixed_c:.1f}, eager {eager_c:.1f}); "
              f"NCCL {nccl_d:.1f} / {nccl_c:.1f} us, padded {pad:.1f} us", flush=True)
    return [asdict(Row(mode, dtype, tokens, "dispatch", ours_d, nccl_d, pad, sent, fixed_d, eager_d)),
            asdict(Row(mode, dtype, tokens, "combine", ours_c, nccl_c, pad, back_bytes, fixed_c, eager_c))]


def _bench_rank(rank: int, world: int, quick: bool) -> list[dict]:
    import torch.distributed as dist

    from cute_moe.ep import EPBuffer
    samples = QUICK_SAMPLES if quick else SAMPLES
    modes = [("low-latency", "masked", QUICK_LATENCY_TOKENS if quick else LATENCY_TOKENS),
             ("throughput", "psum", QUICK_THROUGHPUT_TOKENS if quick else THROUGHPUT_TOKENS)]
    rows = []
    for dtype in ("bf16", "fp8"):
        for mode, layout, token_list in modes:
            buf = EPBuffer(dist.group.WORLD, EXPERTS, max(token_list), HIDDEN, TOPK, dtype)
            for tokens in token_list:
                rows += _measure(buf, rank, world, mode, layout, dtype, tokens, samples)
            del buf
            torch.cuda.empty_cache()
    return rows


def _markdown(rows: list[dict], world: int) -> str:
    lines = [f"# EP dispatch / combine, {world} GPU(s), hidden {HIDDEN}, top-{TOPK} of {EXPERTS} experts", "",
             "| mode | dtype | tokens/rank | op | ours µs | fixed µs (T=0) | eager µs | NCCL (count exchange) µs | "
             "NCCL padded µs | ours GB/s per rank | speed-up vs NCCL | vs padded |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbps = r["bytes_per_rank"] / r["ours_us"] / 1e3
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['tokens']} | {r['op']} | {r['ours_us']:.1f} | "
                     f"{r['fixed_us']:.1f} | {r['eager_us']:.1f} | {r['nccl_us']:.1f} | {r['padded_us']:.1f} | "
                     f"{gbps:.0f} | {r['nccl_us'] / r['ours_us']:.1f}x | {r['padded_us'] / r['ours_us']:.1f}x |")
    lines += ["", "NCCL padded: a sync-free all_to_all_single of the T dispatch rows to every rank (shown on both "
              "rows). GB/s: algorithm bytes (each row once per destination rank owning one of its experts) / ours µs.",
              "Where the time goes: fixed = the same op with 0 tokens (kernel launch in a graph, the cross-rank "
              "signal round trip, the grid barrier); ours - fixed = moving and laying out "
              "rows; eager - ours = the host path per call (argument checks, TVM-FFI launch) when not captured.",
              "torch symmetric memory's own all-to-all op (all_to_all_vdev) needs NVSHMEM and is not measured."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for ep.md and ep.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and samples (about 1 minute)")


def run(args: argparse.Namespace) -> int:
    from cute_moe.ep_launch import run_ranks
    require_gpu("bench_ep")
    world = torch.cuda.device_count()
    make_out_dir(args.out)
    print(f"[bench_ep] {world} GPU(s), {'quick' if args.quick else 'full'} run", flush=True)
    rows = run_ranks(_bench_rank, world, (args.quick,), timeout_s=RUN_TIMEOUT_S)[0]
    with open(os.path.join(args.out, "ep.json"), "w") as f:
        json.dump({"world": world, "hidden": HIDDEN, "experts": EXPERTS, "topk": TOPK, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "ep.md"), "w") as f:
        f.write(_markdown(rows, world))
    print(f"[bench_ep] wrote {args.out}/ep.md and ep.json", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("bench_ep", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
