"""Multi-process GPU tests of cute_moe.ep: dispatch then combine against all_gather + local math.

One process per GPU (world 1 always, 2 when two GPUs exist), NCCL group, children joined with a
deadline and killed on expiry (cute_moe.ep_launch.run_ranks). The workers are module-level
functions so spawned children can import them.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned children import the workers from this file

from cute_moe.ep_launch import run_ranks  # noqa: E402
from cute_moe.testing import calc_diff  # noqa: E402

WORLDS = [1, 2] if torch.cuda.device_count() >= 2 else [1]
TEST_DEADLINE_S = 55.0
HIDDEN, TOPK, EXPERTS_PER_RANK, MAX_TOKENS = 1024, 8, 16, 64
ODD_HIDDEN = 384  # rows of 24 FP8 / 48 BF16 16-byte vectors: the predicated tail of every row loop
DROPPED_FRACTION = 0.15


# ---- routing and reference ---------------------------------------------------------------------

def _routing(num_tokens: int, num_experts: int, gen: torch.Generator, idx_dtype=torch.int64):
    """Unique top-k ids per token avoiding every 5th expert (experts with 0 tokens), some slots
    dropped (-1), one out-of-range id when there are tokens; FP32 weights of varied sign/magnitude."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    scores[:, ::5] = -1.0
    idx = scores.topk(TOPK, dim=1).indices
    drop = torch.rand(num_tokens, TOPK, generator=gen) < DROPPED_FRACTION
    idx[drop] = -1
    if num_tokens > 1:
        idx[1, 0] = num_experts + 3  # out of range: dropped by the kernel
    weights = torch.randn(num_tokens, TOPK, generator=gen) * torch.rand(num_tokens, 1, generator=gen) * 4
    return idx.to(idx_dtype).cuda(), weights.float().cuda()


def _rows(num_tokens: int, gen: torch.Generator, hidden: int = HIDDEN) -> torch.Tensor:
    scale = torch.exp(torch.randn(num_tokens, 1, generator=gen) * 2)
    return (torch.randn(num_tokens, hidden, generator=gen) * scale).to(torch.bfloat16).cuda()


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """All ranks' tensors, padded to MAX_TOKENS rows for the collective, trimmed back."""
    import torch.distributed as dist
    n = torch.tensor([t.shape[0]], device="cuda")
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    pad = torch.zeros((MAX_TOKENS,) + tuple(t.shape[1:]), dtype=t.dtype, device="cuda")
    pad[: t.shape[0]] = t
    views = [pad.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else pad]
    outs = [torch.empty_like(views[0]) for _ in range(world)]
    dist.all_gather(outs, views[0])
    outs = [o.view(t.dtype) for o in outs]
    return [o[: int(c)] for o, c in zip(outs, counts)]


def _expected_entries(all_idx: list[torch.Tensor], rank: int, num_experts: int, local: int) -> list[list[int]]:
    """Per local expert of ``rank``: sorted src_info values (src * MAX_TOKENS + token) routed to it."""
    per_expert = [[] for _ in range(local)]
    for src, idx in enumerate(all_idx):
        for t, row in enumerate(idx.tolist()):
            for e in row:
                if 0 <= e < num_experts and e // local == rank:
                    per_expert[e - rank * local].append(src * MAX_TOKENS + t)
    return [sorted(v) for v in per_expert]


def _expert_rows(d, layout: str, e: int, count: int, alignment: int) -> slice:
    if layout == "masked":
        return slice(e * d.x.shape[1], e * d.x.shape[1] + count)
    end = int(d.psum[e])
    start = 0 if e == 0 else -(-int(d.psum[e - 1]) // alignment) * alignment
    assert end - start == count, f"expert {e}: psum segment [{start}, {end}) holds {end - start}, expected {count}"
    return slice(start, end)


def _check_dispatch(buf, d, layout, rank, world, x_all, s_all, idx_all):
    g = buf.geom
    expected = _expected_entries(idx_all, rank, g.num_experts, g.local_experts)
    counts = [len(v) for v in expected]
    assert d.expert_counts.tolist() == counts
    if layout == "masked":
        assert d.masked_m.tolist() == counts
    flat_x = d.x.reshape(-1, g.hidden)
    flat_info = d.src_info.reshape(-1)
    for e in range(g.local_experts):
        rows = _expert_rows(d, layout, e, counts[e], buf.alignment)
        info = flat_info[rows].long()
        assert sorted(info.tolist()) == expected[e], f"expert {e}: wrong (source, token) set"
        if counts[e] == 0:
            continue
        src, tok = info // MAX_TOKENS, info % MAX_TOKENS
        want = torch.stack([x_all[s][t] for s, t in zip(src.tolist(), tok.tolist())])
        assert torch.equal(flat_x[rows].view(torch.uint8), want.view(torch.uint8)), f"expert {e}: rows differ"
        if s_all is not None:
            scales = d.scales[e, : counts[e]] if layout == "masked" else d.scales[rows]
            want_s = torch.stack([s_all[s][t] for s, t in zip(src.tolist(), tok.tolist())])
            assert torch.equal(scales, want_s), f"expert {e}: scales differ"


def _expert_output(d, layout, buf) -> torch.Tensor:
    """y = received rows * (local expert + 1) in BF16; rows not in use are NaN (must never be read)."""
    g = buf.geom
    x = d.x.float()
    y = torch.full(d.x.shape, float("nan"), dtype=torch.float32, device="cuda")
    flat_y, flat_x = y.view(-1, g.hidden), x.reshape(-1, g.hidden)
    for e in range(g.local_experts):
        rows = _expert_rows(d, layout, e, int(d.expert_counts[e]), buf.alignment)
        flat_y[rows] = flat_x[rows] * (e + 1)
    return y.to(torch.bfloat16)


def _check_combine(buf, out, x, idx, weights):
    """out[t] = sum_k w_k * bf16(x[t] * (local(e_k) + 1)), within two BF16 roundings."""
    g = buf.geom
    x = x.float()
    ref = torch.zeros(x.shape[0], g.hidden, dtype=torch.float64, device="cuda")
    mag = torch.zeros_like(ref)
    for k in range(g.num_topk):
        e = idx[:, k].long()
        valid = (e >= 0) & (e < g.num_experts)
        factor = torch.where(valid, e % g.local_experts + 1, 0).double()
        y = (x.double() * factor[:, None]).to(torch.bfloat16).double()
        term = torch.where(valid[:, None], weights[:, k].double()[:, None] * y, 0.0)
        ref += term
        mag += term.abs()
    assert not out.isnan().any(), "combine left NaN (poisoned output) or read an unused row"
    err = (out.double() - ref).abs()
    bound = 2.0 ** -7 * mag + 1e-30
    assert bool((err <= bound).all()), f"combine error {float((err / (mag + 1e-30)).max())} x |sum| too large"
    assert calc_diff(out, ref) < 1e-4


def _payload(buf, x):
    if not buf.geom.fp8:
        return x, None
    import cute_moe
    data, scales = cute_moe.per_token_cast_to_fp8(x)
    return data.contiguous(), scales.float().contiguous()


def _one_round(buf, layout, rank, world, num_tokens, seed, idx_dtype=torch.int64, stats=None):
    import torch.distributed as dist
    gen = torch.Generator().manual_seed(seed * 101 + rank)
    x = _rows(num_tokens, gen, buf.geom.hidden)
    idx, weights = _routing(num_tokens, buf.geom.num_experts, gen, idx_dtype)
    data, scales = _payload(buf, x)
    payload = data if scales is None else (data, scales)
    d = buf.dispatch(payload, idx, weights, layout=layout, cumulative_local_expert_recv_stats=stats)
    torch.cuda.synchronize()
    buf.check()
    x_all = _gather(data, world)
    s_all = None if scales is None else _gather(scales, world)
    idx_all = [i.cpu() for i in _gather(idx.to(torch.int64), world)]
    _check_dispatch(buf, d, layout, rank, world, x_all, s_all, idx_all)
    y = _expert_output(d, layout, buf)
    out = torch.full((num_tokens, buf.geom.hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    buf.combine(y, d.handle, out=out)
    buf.synchronize()
    x_used = x if scales is None else data.float()
    _check_combine(buf, out, x_used, idx, weights)
    dist.barrier()
    return d


# ---- workers (run in the spawned processes) ----------------------------------------------------

def _buffer(world: int, dtype: str, hidden: int = HIDDEN, **kw):
    import torch.distributed as dist
    from cute_moe.ep import EPBuffer
    return EPBuffer(dist.group.WORLD, EXPERTS_PER_RANK * world, MAX_TOKENS, hidden, TOPK, dtype, **kw)


def worker_bf16(rank: int, world: int) -> None:
    buf = _buffer(world, "bf16")
    L = buf.geom.local_experts
    stats = torch.zeros(L, dtype=torch.int32, device="cuda")
    total = torch.zeros(L, dtype=torch.int32, device="cuda")
    # uneven counts, the maximum token count, a rank sending 0 tokens, int32 and int64 ids
    rounds = [("masked", [37, MAX_TOKENS], torch.int64), ("psum", [MAX_TOKENS, 0], torch.int32),
              ("masked", [0, 5], torch.int32), ("psum", [3, MAX_TOKENS], torch.int64), ("masked", [0, 0], torch.int64)]
    for seed, (layout, tokens, idx_dtype) in enumerate(rounds):
        d = _one_round(buf, layout, rank, world, tokens[rank % 2], seed, idx_dtype, stats)
        total += d.expert_counts
    assert torch.equal(stats, total), "cumulative_local_expert_recv_stats != sum of the rounds' counts"


def worker_fp8(rank: int, world: int) -> None:
    buf = _buffer(world, "fp8")
    for seed, layout in enumerate(["masked", "psum", "masked"]):
        _one_round(buf, layout, rank, world, [MAX_TOKENS, 29][rank % 2] - seed, seed + 50)


def worker_odd_hidden(rank: int, world: int) -> None:
    """Rows that are not a multiple of 32 vectors: the lane-predicated last batch of the FP8 send and
    layout copy, and of the BF16 combine partial and reduce."""
    buf = _buffer(world, "fp8", hidden=ODD_HIDDEN)
    for seed, layout in enumerate(["masked", "psum"]):
        _one_round(buf, layout, rank, world, [MAX_TOKENS - 3, 17][rank % 2], seed + 70)


def worker_graph(rank: int, world: int) -> None:
    """Capture dispatch -> expert stand-in (y = rows * (expert + 1)) -> combine once; replay with new
    routing and rows copied into the captured inputs, checking every replay."""
    import torch.distributed as dist
    buf = _buffer(world, "bf16")
    g = buf.geom
    num_tokens = [48, 21][rank % 2]
    gen = torch.Generator().manual_seed(7 + rank)
    x = _rows(num_tokens, gen)
    idx, weights = _routing(num_tokens, g.num_experts, gen)
    factors = torch.arange(1, g.local_experts + 1, dtype=torch.float32, device="cuda")[:, None, None]
    y = torch.empty(g.local_experts, g.max_m, HIDDEN, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")

    def layer():
        d = buf.dispatch(x, idx, weights)
        y.copy_((d.x.float() * factors).to(torch.bfloat16))
        buf.combine(y, d.handle, out=out)
        return d

    layer()  # warm-up: compiles, allocates the outputs
    buf.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            d = layer()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        new_idx, new_w = _routing(num_tokens, g.num_experts, gen)
        x.copy_(_rows(num_tokens, gen))
        idx.copy_(new_idx)
        weights.copy_(new_w)
        out.fill_(float("nan"))
        torch.cuda.synchronize()
        dist.barrier()
        graph.replay()
        buf.synchronize()
        x_all, idx_all = _gather(x, world), [i.cpu() for i in _gather(idx, world)]
        _check_dispatch(buf, d, "masked", rank, world, x_all, None, idx_all)
        _check_combine(buf, out, x, idx, weights)
        dist.barrier()


def worker_timeout(rank: int, world: int) -> None:
    """Rank 1 skips a dispatch: rank 0 must raise a RuntimeError naming dispatch and rank 1, not hang."""
    import torch.distributed as dist
    buf = _buffer(world, "bf16")
    _one_round(buf, "masked", rank, world, 8, 99)
    buf.timeout_s = 0.5
    if rank == 0:
        gen = torch.Generator().manual_seed(3)
        idx, weights = _routing(8, buf.geom.num_experts, gen)
        buf.dispatch(_rows(8, gen), idx, weights)
        with pytest.raises(RuntimeError, match=r"dispatch.*rank 0.*\[1\]"):
            buf.synchronize()
        with pytest.raises(RuntimeError, match="dispatch"):  # the buffer stays unusable
            buf.dispatch(_rows(8, gen), idx, weights)
    dist.barrier()


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLDS)
def test_dispatch_combine_bf16(world):
    run_ranks(worker_bf16, world, timeout_s=TEST_DEADLINE_S)


@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLDS)
def test_dispatch_combine_fp8(world):
    run_ranks(worker_fp8, world, timeout_s=TEST_DEADLINE_S)


@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLDS)
def test_dispatch_combine_odd_hidden(world):
    run_ranks(worker_odd_hidden, world, timeout_s=TEST_DEADLINE_S)


@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLDS)
def test_cuda_graph_replay_with_new_routing(world):
    run_ranks(worker_graph, world, timeout_s=TEST_DEADLINE_S)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_timeout_when_a_rank_skips_the_call():
    run_ranks(worker_timeout, 2, timeout_s=TEST_DEADLINE_S)
