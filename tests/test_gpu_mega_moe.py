"""Multi-process GPU tests of cute_moe.fp8_mega_moe, bf16_mega_moe and fp8_fp4_mega_moe (docs/mega_moe.md
section 4, tests 1-11).

One process per GPU (world 1 always, 2 when two GPUs exist), NCCL group, children joined with a
deadline (cute_moe.ep_launch.run_ranks). The Mega MoE kernel compiles once per (geometry, clamp) in
each process (about a minute), so the cases share few workers and buffers: geometry SMALL without
clamp (accuracy, baselines, routing edge cases, stats, refusals), SMALL with clamp (CUDA graph,
clamp, timeout), and FLASH (DeepSeek-V4-Flash at 128 tokens per rank).

Thresholds (calc_diff, DeepGEMM's measure):
* vs the FP32 reference with the intermediate re-quantized as the kernel does: < 2e-4 (what is left
  is FP32 accumulation order, rare FP8 rounding flips it causes, and BF16 output rounding: ~1e-5);
* vs the plain FP32 reference (no re-quantization): < 2e-3 (one 1x128 FP8 quantization of the
  intermediate alone measures ~4e-4 on these inputs: tests/test_mega_moe.py);
* vs our unfused pipeline and the NCCL baseline: < 5e-4 (they also round GEMM-1's output to BF16
  before SwiGLU, which moves some FP8 roundings of the intermediate).
"""

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned children import the workers from this file

from cute_moe.ep_launch import run_ranks  # noqa: E402
from cute_moe.testing import calc_diff  # noqa: E402

WORLDS = [1, 2] if torch.cuda.device_count() >= 2 else [1]
DEADLINE_S = 100.0  # per test: one Mega MoE compile (~1 min) plus the calls
BASELINE_DEADLINE_S = 150.0  # workers that also compile the EP kernels and the baselines' GEMMs
FP4_DEADLINE_S = 300.0  # six FP8 x FP4 Mega MoE variants, two shapes' baselines
FP4_TIMEOUT_S = 60.0  # the FP8 x FP4 buffers' cross-GPU wait limit (a peer may still compile a baseline GEMM)
SMALL = dict(num_experts=16, num_max_tokens_per_rank=256, num_topk=4, hidden=512, intermediate_hidden=256)
FLASH = dict(num_experts=256, num_max_tokens_per_rank=128, num_topk=6, hidden=4096, intermediate_hidden=2048)
WEIGHT_SEED = 1234
CLAMP = 10.0
CLAMP_MAGNITUDE = 16.0  # input magnitude at which the clamp changes most tokens' result
TIMEOUT_S = 0.5
TIMEOUT_SLACK_S = 5.0  # the raising rank must see the error well before this
THRESHOLD_QUANTIZED_REF = 2e-4
THRESHOLD_FP32_REF = 2e-3
THRESHOLD_PIPELINE = 5e-4
THRESHOLD_BF16_REF = 2e-4
FP8_NAN_BYTE = 0x7F


# ---- helpers ------------------------------------------------------------------------------------

class Layer:
    """One rank's view of a test layer: the buffer, all experts' weights (reference), its experts'
    weights untransformed (baselines) and transformed (the kernel)."""

    def __init__(self, rank: int, world: int, shape: dict, timeout_s: float = 10.0, weights: str = "fp8"):
        import torch.distributed as dist

        import cute_moe
        from cute_moe.tools.mega_moe_pipelines import make_layer
        torch.backends.cuda.matmul.allow_tf32 = False
        self.rank, self.world, self.shape = rank, world, shape
        mma_type = "fp8xfp4" if weights == "fp4" else "fp8"
        self.run = cute_moe.fp8_fp4_mega_moe if weights == "fp4" else cute_moe.fp8_mega_moe
        self.buf = cute_moe.get_symm_buffer_for_mega_moe(dist.group.WORLD, **shape, mma_type=mma_type,
                                                         timeout_s=timeout_s)
        from cute_moe.tools.mega_moe_pipelines import SMALL_BLOCK_SHARE
        self.weights = make_layer(shape["num_experts"], shape["hidden"], shape["intermediate_hidden"], WEIGHT_SEED,
                                  "cuda", weights=weights, small_block_share=SMALL_BLOCK_SHARE)
        self.local = self.weights.local(rank, world)
        self.l1, self.l2 = cute_moe.transform_weights_for_mega_moe(*self.local)
        self.num_local = shape["num_experts"] // world

    def inputs(self, tokens: int, seed: int, **kw):
        from cute_moe.tools.mega_moe_pipelines import make_inputs
        s = self.shape
        seed = seed * 16 + self.rank
        return make_inputs(tokens, s["hidden"], s["num_experts"], s["num_topk"], seed, "cuda", **kw)[1:]

    def fill(self, x_fp8, x_sf, idx, w) -> None:
        """Write the inputs into the buffer's views; poison the rows past T (the kernel must not read them)."""
        b, t = self.buf, x_fp8.shape[0]
        b.x[:t].copy_(x_fp8)
        b.x_sf[:t].copy_(x_sf)
        b.topk_idx[:t].copy_(idx)
        b.topk_weights[:t].copy_(w)
        b.x[t:].view(torch.uint8).fill_(FP8_NAN_BYTE)
        b.x_sf[t:].fill_(float("nan"))
        b.topk_idx[t:].fill_(0)  # a valid expert: reading these rows would show in the stats
        b.topk_weights[t:].fill_(float("nan"))

    def call(self, inputs, stats=None, clamp=None) -> torch.Tensor:
        self.fill(*inputs)
        y = torch.full((inputs[0].shape[0], self.shape["hidden"]), float("nan"), dtype=torch.bfloat16, device="cuda")
        self.run(y, self.l1, self.l2, self.buf, cumulative_local_expert_recv_stats=stats, activation_clamp=clamp)
        self.buf.synchronize()
        return y

    def check(self, y, inputs, clamp=None, what="") -> None:
        """y against the FP32 references; tokens without a valid slot exactly 0."""
        from cute_moe.tools.mega_moe_pipelines import reference_moe
        assert not y.isnan().any(), f"{what}: NaN in y (poisoned output not written, or NaN computed)"
        if y.shape[0] == 0:
            return
        ref_q = reference_moe(*inputs, self.weights, clamp, quantize_intermediate=True)
        ref = reference_moe(*inputs, self.weights, clamp)
        diff_q, diff = calc_diff(y.float(), ref_q), calc_diff(y.float(), ref)
        assert diff_q < THRESHOLD_QUANTIZED_REF, f"{what}: calc_diff vs re-quantized FP32 reference {diff_q:.3g}"
        assert diff < THRESHOLD_FP32_REF, f"{what}: calc_diff vs FP32 reference {diff:.3g}"
        idx = inputs[2]
        dead = ~((idx >= 0) & (idx < self.shape["num_experts"])).any(dim=1)
        assert bool((y[dead] == 0).all()), f"{what}: a token with every slot dropped is not exactly 0"


def _gather_idx(idx: torch.Tensor, world: int, max_tokens: int) -> list[torch.Tensor]:
    """Every rank's topk_idx (variable T), padded to max_tokens for the collective, trimmed back."""
    import torch.distributed as dist
    n = torch.tensor([idx.shape[0]], device="cuda")
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    pad = torch.full((max_tokens, idx.shape[1]), -1, dtype=idx.dtype, device="cuda")
    pad[: idx.shape[0]] = idx
    outs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(outs, pad)
    return [o[: int(c)] for o, c in zip(outs, counts)]


def _received_counts(layer: Layer, idx: torch.Tensor) -> torch.Tensor:
    """Rows each local expert of this rank receives from every rank's routing (int32 [L])."""
    all_idx = torch.cat(_gather_idx(idx, layer.world, layer.shape["num_max_tokens_per_rank"]))
    local = all_idx.reshape(-1) - layer.rank * layer.num_local
    local = local[(local >= 0) & (local < layer.num_local)]
    return torch.bincount(local, minlength=layer.num_local).to(torch.int32)


def _biased_routing(tokens: int, layer: Layer, seed: int, bias: torch.Tensor) -> torch.Tensor:
    """Distinct top-k experts per token with score ``rand + bias`` (bias -inf: never chosen)."""
    gen = torch.Generator().manual_seed(seed * 16 + layer.rank)
    scores = torch.rand(tokens, layer.shape["num_experts"], generator=gen) + bias
    return scores.topk(layer.shape["num_topk"], dim=1).indices.cuda()


def _compare_baselines(layer: Layer, inputs, y, clamp=None) -> None:
    """The unfused pipeline (our EP dispatch / GEMMs / combine) and the NCCL baseline on the same inputs."""
    import torch.distributed as dist

    from cute_moe.tools.mega_moe_pipelines import make_ep_buffer, make_nccl_state, nccl_mega_moe, unfused_mega_moe
    s = layer.shape
    if not hasattr(layer, "ep"):  # SMALL (256 tokens): the psum layout; FLASH (128): masked
        layer.ep = make_ep_buffer(dist.group.WORLD, s["num_experts"], s["num_max_tokens_per_rank"], s["hidden"],
                                  s["num_topk"], timeout_s=layer.buf.timeout_s)
        layer.nccl = make_nccl_state(dist.group.WORLD, s["num_experts"], s["num_max_tokens_per_rank"],
                                     s["num_topk"], s["hidden"], s["intermediate_hidden"], "cuda")
    x_fp8, x_sf, idx, w = inputs
    unfused = unfused_mega_moe(layer.ep, x_fp8, x_sf, idx, w, layer.local, clamp)
    layer.ep.synchronize()
    nccl = nccl_mega_moe(layer.nccl, x_fp8, x_sf, idx, w, layer.local, clamp)
    torch.cuda.synchronize()
    if y.shape[0]:
        for name, other in (("unfused", unfused), ("NCCL", nccl)):
            assert not other.isnan().any(), f"{name} pipeline: NaN"
            diff = calc_diff(y.float(), other.float())
            assert diff < THRESHOLD_PIPELINE, f"calc_diff vs the {name} pipeline {diff:.3g}"


def _refusals(layer: Layer) -> None:
    """Test 11: every bad argument raises before launch (the buffer keeps working afterwards)."""
    import torch.distributed as dist

    import cute_moe
    s, buf = layer.shape, layer.buf
    h, tm = s["hidden"], s["num_max_tokens_per_rank"]
    y = torch.empty(4, h, dtype=torch.bfloat16, device="cuda")
    (w1, s1), (w2, s2) = layer.l1, layer.l2
    cases = [
        (ValueError, r"^y: expected at most num_max_tokens_per_rank",
         dict(y=torch.empty(tm + 1, h, dtype=torch.bfloat16, device="cuda"))),
        (ValueError, r"^y: expected a tensor on cuda", dict(y=torch.empty(4, h, dtype=torch.bfloat16))),
        (ValueError, r"^y: expected a 16-byte aligned",
         dict(y=torch.empty(4 * h + 8, dtype=torch.bfloat16, device="cuda")[1:1 + 4 * h].view(4, h))),
        (TypeError, r"^y: expected dtype bfloat16", dict(y=y.float())),
        (ValueError, r"^l1_weights: expected shape",  # one expert too few for this rank
         dict(l1_weights=(w1[1:], s1[1:]), l2_weights=(w2[1:], s2[1:]))),
        (TypeError, r"^l1_scales: expected dtype float32", dict(l1_weights=(w1, s1.double()))),
        (ValueError, r"^l2_scales: expected shape", dict(l2_weights=(w2, s2[:, :1]))),
        (TypeError, r"^l2_weights: expected dtype float8_e4m3fn", dict(l2_weights=(w2.view(torch.uint8), s2))),
        (ValueError, r"^activation_clamp: expected a positive", dict(activation_clamp=-1.0)),
        (ValueError, r"^cumulative_local_expert_recv_stats: expected shape",
         dict(cumulative_local_expert_recv_stats=torch.zeros(layer.num_local + 1, dtype=torch.int32, device="cuda"))),
    ]
    for error, match, change in cases:
        args = dict(y=y, l1_weights=layer.l1, l2_weights=layer.l2, buffer=buf)
        args.update(change)
        with pytest.raises(error, match=match):
            cute_moe.fp8_mega_moe(**args)
    with pytest.raises(ValueError, match=r"^buffer: expected a buffer built with mma_type='bf16'"):
        cute_moe.bf16_mega_moe(y, w1.float().bfloat16(), w2.float().bfloat16(), buf)
    other = cute_moe.get_symm_buffer_for_mega_moe(dist.group.WORLD, **s, mma_type="bf16")
    with pytest.raises(ValueError, match=r"^buffer: expected a buffer built with mma_type='fp8'"):
        cute_moe.fp8_mega_moe(y, layer.l1, layer.l2, other)


# ---- workers (run in the spawned processes) ----------------------------------------------------

def worker_small(rank: int, world: int) -> None:
    """Tests 1-6, 8, 11 at the small shape, one buffer, many calls: refusals first (nothing may be
    launched), then each call against the FP32 references and the two baseline pipelines."""
    import torch.distributed as dist
    layer = Layer(rank, world, SMALL)
    _refusals(layer)
    tm, L, E = SMALL["num_max_tokens_per_rank"], layer.num_local, SMALL["num_experts"]
    stats = torch.zeros(L, dtype=torch.int32, device="cuda")
    expected = torch.zeros_like(stats)
    half_local = torch.zeros(E)
    half_local[(torch.arange(E) % L) % 2 == 1] = float("-inf")  # odd local experts of every rank: 0 rows
    hot = torch.zeros(E)
    hot[torch.arange(world) * L] = 10.0  # local expert 0 of every rank in every token's top-k
    rounds = [  # (name, tokens per rank [rank 0, rank 1], drop fraction, routing bias)
        ("uniform", [200, 137], 0.0, None),
        ("dropped slots", [tm, 61], 0.2, None),
        ("empty experts", [96, 250], 0.1, half_local),
        ("rank 1 with 0 tokens", [tm, 0], 0.0, None),
        ("0 tokens everywhere", [0, 0], 0.0, None),
        ("T = Tm, hot expert", [tm, tm], 0.0, hot),
        ("after the edge cases", [33, 7], 0.05, None),
    ]
    for seed, (name, tokens, drop, bias) in enumerate(rounds):
        t = tokens[rank % 2]
        inputs = list(layer.inputs(t, seed, drop_fraction=drop))
        if bias is not None:
            inputs[2] = _biased_routing(t, layer, seed, bias)
        if name == "dropped slots" and t:
            inputs[2][0] = torch.tensor([-1, E, E + 77, -1][:SMALL["num_topk"]], device="cuda")  # all dropped
        y = layer.call(inputs, stats)
        expected += _received_counts(layer, inputs[2])
        layer.check(y, inputs, what=f"{name} (rank {rank})")
        if name in ("uniform", "dropped slots", "empty experts", "T = Tm, hot expert"):
            _compare_baselines(layer, inputs, y)
        dist.barrier()
    assert torch.equal(stats, expected), f"stats {stats.tolist()} != received rows {expected.tolist()}"


def _graph_replays(layer: Layer, y: torch.Tensor, call, tokens: int, seeds, what: str):
    """Capture ``call`` (a clamped Mega MoE op writing ``y``) in a CUDA graph, then for each seed write
    new routing and data into the buffer's views, poison ``y`` with NaN, replay and check it against the
    clamped reference; yields each replay's inputs after its check. The graph is released at the end."""
    import torch.distributed as dist

    dist.barrier()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    for replay, seed in enumerate(seeds):
        inputs = layer.inputs(tokens, seed, drop_fraction=0.1, magnitude=CLAMP_MAGNITUDE)
        layer.fill(*inputs)
        y.fill_(float("nan"))
        torch.cuda.synchronize()
        dist.barrier()
        graph.replay()
        layer.buf.synchronize()
        layer.check(y, inputs, CLAMP, f"{what} {replay}")
        yield inputs
        dist.barrier()
    del graph


def worker_graph_clamp(rank: int, world: int) -> None:
    """Tests 7, 9 and (world 2) 10: a CUDA graph of one clamped call replayed with new routing and data
    written into the buffer's views, stats accumulated by the replays; then the timeout."""
    import cute_moe
    layer = Layer(rank, world, SMALL)
    t = [200, 77][rank % 2]
    inputs = layer.inputs(t, 0, drop_fraction=0.1, magnitude=CLAMP_MAGNITUDE)
    from cute_moe.tools.mega_moe_pipelines import reference_moe
    clamped = reference_moe(*inputs, layer.weights, CLAMP)
    assert calc_diff(clamped, reference_moe(*inputs, layer.weights)) > 1e-2, "inputs too small for the clamp test"
    y0 = layer.call(inputs, clamp=CLAMP)  # warm-up: compiles
    layer.check(y0, inputs, CLAMP, "clamp, eager")
    stats = torch.zeros(layer.num_local, dtype=torch.int32, device="cuda")
    expected = torch.zeros_like(stats)
    y = torch.empty(t, SMALL["hidden"], dtype=torch.bfloat16, device="cuda")
    replays = _graph_replays(layer, y, lambda: cute_moe.fp8_mega_moe(y, layer.l1, layer.l2, layer.buf, stats, CLAMP),
                             t, seeds=range(10, 13), what="graph replay")
    for inputs in replays:
        expected += _received_counts(layer, inputs[2])
    assert torch.equal(stats, expected), f"stats after replays {stats.tolist()} != {expected.tolist()}"
    if world >= 2:
        _timeout(rank, world)


def _timeout(rank: int, world: int) -> None:
    """Test 10: rank 1 skips a call; rank 0 raises within about timeout_s and its buffer stays broken."""
    import torch.distributed as dist

    import cute_moe
    from cute_moe import mega_moe
    layer = Layer(rank, world, SMALL, timeout_s=TIMEOUT_S)
    inputs = layer.inputs(8, 99)
    # The first call of a (block height, clamp) variant compiles it (seconds, differing per rank):
    # compile before the barrier so both ranks launch the healthy call well within TIMEOUT_S.
    mega_moe._kernel_fn(layer.buf.geom, True, mega_moe.block_height(layer.buf.geom, 8))
    torch.cuda.synchronize()
    dist.barrier()
    layer.check(layer.call(inputs, clamp=CLAMP), inputs, CLAMP, "before the timeout")
    dist.barrier()
    if rank == 0:
        y = torch.empty(8, SMALL["hidden"], dtype=torch.bfloat16, device="cuda")
        layer.fill(*inputs)
        start = time.monotonic()
        cute_moe.fp8_mega_moe(y, layer.l1, layer.l2, layer.buf, activation_clamp=CLAMP)
        with pytest.raises(RuntimeError, match=r"mega_moe \(waiting for peers' inputs\) on rank 0 .*\[1\]"):
            layer.buf.synchronize()
        assert time.monotonic() - start < TIMEOUT_S + TIMEOUT_SLACK_S
        with pytest.raises(RuntimeError, match="mega_moe"):  # the buffer refuses every later call
            cute_moe.fp8_mega_moe(y, layer.l1, layer.l2, layer.buf, activation_clamp=CLAMP)
    dist.barrier()


def worker_flash(rank: int, world: int) -> None:
    """Tests 1-2 at DeepSeek-V4-Flash's shape (the real tile counts), 128 tokens per rank, two calls."""
    import torch.distributed as dist
    layer = Layer(rank, world, FLASH)
    for seed, tokens in enumerate([[128, 128], [128, 93]]):
        inputs = layer.inputs(tokens[rank % 2], seed, drop_fraction=0.05)
        y = layer.call(inputs)
        layer.check(y, inputs, what=f"Flash call {seed}")
        _compare_baselines(layer, inputs, y)
        dist.barrier()


def worker_bf16(rank: int, world: int) -> None:
    """bf16_mega_moe against the FP32 reference on BF16 operands (the intermediate stays BF16)."""
    import torch.distributed as dist

    import cute_moe
    from cute_moe.layouts import per_block_dequant
    from cute_moe.moe_layer import moe_reference
    from cute_moe.tools.mega_moe_pipelines import make_inputs, make_layer
    s = SMALL
    buf = cute_moe.get_symm_buffer_for_mega_moe(dist.group.WORLD, **s, mma_type="bf16")
    w = make_layer(s["num_experts"], s["hidden"], s["intermediate_hidden"], WEIGHT_SEED, "cuda")
    w13 = torch.stack([per_block_dequant(w.w1[e], w.s1[e]) for e in range(w.num_experts)]).bfloat16()
    w2 = torch.stack([per_block_dequant(w.w2[e], w.s2[e]) for e in range(w.num_experts)]).bfloat16()
    L = s["num_experts"] // world
    l1, l2 = cute_moe.transform_weights_for_mega_moe(w13[rank * L:(rank + 1) * L].contiguous(),
                                                     w2[rank * L:(rank + 1) * L].contiguous())
    for seed, tokens in enumerate([[200, 0], [s["num_max_tokens_per_rank"], 31]]):
        t = tokens[rank % 2]
        x, _, _, idx, tw = make_inputs(t, s["hidden"], s["num_experts"], s["num_topk"], seed * 16 + rank, "cuda",
                                       drop_fraction=0.1)
        buf.x[:t].copy_(x)
        buf.topk_idx[:t].copy_(idx)
        buf.topk_weights[:t].copy_(tw)
        y = torch.full((t, s["hidden"]), float("nan"), dtype=torch.bfloat16, device="cuda")
        cute_moe.bf16_mega_moe(y, l1, l2, buf)
        buf.synchronize()
        assert not y.isnan().any()
        if t:
            ref = moe_reference(x, idx, tw, w13, w2)
            assert calc_diff(y.float(), ref) < THRESHOLD_BF16_REF
        dist.barrier()


def _precompile(layer: Layer, clamps: tuple) -> None:
    """Compile every block height's kernel before the first call: the ranks pick their block heights
    per call, so one rank's first call of a variant may otherwise compile while its peers wait."""
    from cute_moe import mega_moe
    from cute_moe.mega_moe_layout import BLOCK_SIZES
    for block_m in BLOCK_SIZES:
        for clamp in clamps:
            mega_moe._kernel_fn(layer.buf.geom, clamp, block_m)


def worker_fp4(rank: int, world: int) -> None:
    """fp8_fp4_mega_moe (MXFP4 weights, 32-blocks up to 2^12 apart: both widening paths) at the small
    shape (block heights 128 and 64) and at DeepSeek-V4-Flash's: against the FP32 references on the
    dequantized weights and the unfused / NCCL pipelines on our FP8 x FP4 grouped GEMMs; a CUDA graph
    replayed with new inputs, with the clamp; stats."""
    import torch.distributed as dist

    import cute_moe
    tm = SMALL["num_max_tokens_per_rank"]
    layer = Layer(rank, world, SMALL, timeout_s=FP4_TIMEOUT_S, weights="fp4")
    _precompile(layer, (False, True))
    stats = torch.zeros(layer.num_local, dtype=torch.int32, device="cuda")
    expected = torch.zeros_like(stats)
    rounds = [("uniform", [200, 137], 0.0), ("dropped slots", [tm, 61], 0.2), ("rank 1 with 0 tokens", [33, 0], 0.0),
              ("few rows per expert", [7, 33], 0.05)]
    for seed, (name, tokens, drop) in enumerate(rounds):
        inputs = layer.inputs(tokens[rank % 2], seed, drop_fraction=drop)
        y = layer.call(inputs, stats)
        expected += _received_counts(layer, inputs[2])
        layer.check(y, inputs, what=f"FP4 {name} (rank {rank})")
        _compare_baselines(layer, inputs, y)
        dist.barrier()
    assert torch.equal(stats, expected), f"stats {stats.tolist()} != received rows {expected.tolist()}"
    t = [150, 20][rank % 2]
    y = torch.empty(t, SMALL["hidden"], dtype=torch.bfloat16, device="cuda")
    layer.call(layer.inputs(t, 9, magnitude=CLAMP_MAGNITUDE), clamp=CLAMP)  # compiles the clamped variant
    for _ in _graph_replays(layer, y, lambda: cute_moe.fp8_fp4_mega_moe(y, layer.l1, layer.l2, layer.buf,
                                                                        activation_clamp=CLAMP),
                            t, seeds=range(20, 22), what="FP4 graph replay"):
        pass
    flash = Layer(rank, world, FLASH, timeout_s=FP4_TIMEOUT_S, weights="fp4")
    _precompile(flash, (False,))
    for seed, tokens in enumerate([[128, 93], [8, 128]]):
        inputs = flash.inputs(tokens[rank % 2], seed, drop_fraction=0.05)
        y = flash.call(inputs)
        flash.check(y, inputs, what=f"FP4 Flash call {seed}")
        _compare_baselines(flash, inputs, y)
        dist.barrier()


# ---- tests -------------------------------------------------------------------------------------

# (worker, deadline) of each test: the accuracy / baselines / routing cases, the CUDA graph + clamp +
# timeout cases, DeepSeek-V4-Flash's shape, and the BF16 kernel.
CASES = {"small_against_references_and_baselines": (worker_small, BASELINE_DEADLINE_S),
         "cuda_graph_clamp_and_timeout": (worker_graph_clamp, DEADLINE_S),
         "deepseek_v4_flash_shape": (worker_flash, BASELINE_DEADLINE_S),
         "bf16": (worker_bf16, DEADLINE_S),
         "fp8_fp4": (worker_fp4, FP4_DEADLINE_S)}


@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_mega_moe(case, world):
    worker, deadline = CASES[case]
    run_ranks(worker, world, timeout_s=deadline)
