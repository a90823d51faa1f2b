"""CUDA-graph timing of collective ops: every rank of the process group captures the same number of
calls and replays the same graphs in the same order (benchmarks run by cute_moe.ep_launch.run_ranks).

bench_common.graph_of / time_pair size each graph from the local rank's own estimate, which differs
between ranks; a collective op captured a different number of times on two ranks would leave one
rank waiting for a call its peer never makes. Here the call count comes from the slowest rank's
estimate (all_reduce MAX), every sample starts after a barrier (so no rank's replay includes waiting
for a late peer), and the time reported is the slowest rank's median.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch

TARGET_REPLAY_US = 10_000.0  # one replay lasts about 10 ms, as bench_common.graph_of's graphs
MAX_CALLS = 1000  # calls captured in one graph at most
ESTIMATE_CALLS = 3  # eager calls timed to size a graph

Launch = Callable[[], object]


@dataclass
class Timed:
    """A contender ready to time: ``replay()`` runs ``calls`` calls of it."""

    replay: Callable[[], object]
    calls: int


def slowest(values: list[float]) -> list[float]:
    """Each value's maximum over the ranks of the default group (one all_reduce)."""
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def calls_for(estimate_us: float) -> int:
    """Calls per graph so that one replay lasts about TARGET_REPLAY_US (1 to MAX_CALLS)."""
    return max(1, min(MAX_CALLS, math.ceil(TARGET_REPLAY_US / max(estimate_us, 1.0))))


def timed_us(run: Callable[[], object], calls: int) -> float:
    """Microseconds per call of ``run()`` (which makes ``calls`` calls), started after a barrier."""
    import torch.distributed as dist
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def agreed_calls(launches: dict[str, Launch]) -> dict[str, int]:
    """Calls per graph of each launch, the same on every rank: one warm-up call each, then
    ESTIMATE_CALLS eager calls timed, the slowest rank's estimate sizing the graph."""
    for launch in launches.values():
        launch()

    def repeated(launch: Launch) -> Callable[[], None]:
        def run() -> None:
            for _ in range(ESTIMATE_CALLS):
                launch()
        return run
    estimates = [timed_us(repeated(launch), ESTIMATE_CALLS) for launch in launches.values()]
    return {name: calls_for(us) for name, us in zip(launches, slowest(estimates))}


def capture(launch: Launch, calls: int, prologue: Optional[Launch] = None) -> Timed:
    """A CUDA graph of ``prologue()`` (if given; e.g. writing the inputs this contender reads from a
    shared buffer) followed by ``calls`` calls of ``launch``."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if prologue is not None:
            prologue()
        for _ in range(calls):
            launch()
    return Timed(graph.replay, calls)


def time_graphs(timed: dict[str, Timed], samples: int) -> dict[str, float]:
    """Median microseconds per call of each contender over ``samples`` rounds of interleaved
    replays (one warm replay each first), the slowest rank's median."""
    for t in timed.values():
        t.replay()
    values: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(samples):
        for name, t in timed.items():
            values[name].append(timed_us(t.replay, t.calls))
    return dict(zip(timed, slowest([statistics.median(v) for v in values.values()])))
