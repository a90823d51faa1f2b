"""CPU tests of the Mega MoE host side (cute_moe.mega_moe, cute_moe.mega_moe_layout) and of the test /
benchmark pipelines (cute_moe.tools.mega_moe_pipelines): geometry, the weight transform, every
argument check (each names its argument, all before any launch), timeout messages of ops 4-7, the
FP32 reference and the NCCL baseline's routing arithmetic (world 1, gloo, a CPU stand-in GEMM)."""

import pytest
import torch

import cute_moe
from cute_moe import ep, mega_moe, ops
from cute_moe.ep_launch import free_port
from cute_moe.layouts import (per_block_cast_to_fp8, per_block_dequant, per_token_dequant, per_token_dequant_fp4,
                              ue8m0_to_float)
from cute_moe.mega_moe_layout import (ALIGN, BLOCK_M, BLOCK_SIZES, ENTRY_POSITION_BITS, MIN_BLOCK_M, PARITIES, TILE_N, MegaMoEGeometry,
                                      align_up)
from cute_moe.testing import calc_diff
from cute_moe.tools import mega_moe_pipelines as pipes

FP8 = torch.float8_e4m3fn
FLASH = dict(num_experts=256, max_tokens=8192, num_topk=6, hidden=4096, intermediate=2048)
GEOMS = [
    MegaMoEGeometry(2, fp8=True, num_ctas=132, **FLASH),
    MegaMoEGeometry(8, 256, 8192, 8, 7168, 2048, True, 132),  # V3 at 8 ranks
    MegaMoEGeometry(1, 16, 256, 4, 512, 256, True, 132),  # the GPU tests' small shape
    MegaMoEGeometry(8, 16, 3, 6, 256, 128, False, 4),  # K > L: a token reaches at most L experts of a rank
]


# ---- geometry -------------------------------------------------------------------------------------

def _symmetric_sizes(g: MegaMoEGeometry) -> dict:
    r, tm, k, h = g.num_ranks, g.max_tokens, g.num_topk, g.hidden
    return {"input_arrive": 8 * r, "combine_arrive": 8 * r, "x": tm * h * g.act_bytes,
            "x_sf": tm * (h // 128) * 4 if g.fp8 else 0, "topk_idx": tm * k * 8, "topk_weights": tm * k * 4,
            "combine": tm * k * h * 2}


def _work_sizes(g: MegaMoEGeometry) -> dict:
    return {"counts": 4 * PARITIES * g.local_experts, "block_rows": 4 * PARITIES * g.pool_blocks,
            "l1_done": 4 * PARITIES * g.pool_blocks, "grid_barrier": 8, "abort": 4, "entry_slot": 4 * g.entries,
            "row_src": 4 * g.pool_rows}


def _assert_packed(off: dict, sizes: dict) -> None:
    spans = sorted((off[name], off[name] + size) for name, size in sizes.items())
    for (_, a_end), (b_start, _) in zip(spans, spans[1:]):
        assert a_end <= b_start, "regions overlap"
    assert all(off[name] % ALIGN == 0 for name in sizes), "a region is not 128-byte aligned"
    assert spans[-1][1] <= off["total"]


@pytest.mark.parametrize("g", GEOMS)
def test_regions_are_aligned_disjoint_and_sized(g):
    _assert_packed(g.symmetric_offsets(), _symmetric_sizes(g))
    _assert_packed(g.work_offsets(), _work_sizes(g))


@pytest.mark.parametrize("g", GEOMS)
def test_tile_and_scale_arithmetic(g):
    assert g.pool_rows % BLOCK_M == 0 and g.pool_blocks * MIN_BLOCK_M == g.pool_rows
    assert g.scale_pitch % 4 == 0 and g.scale_pitch >= g.pool_rows
    assert g.l1_tiles * TILE_N == 2 * g.intermediate and g.l2_tiles * TILE_N == g.hidden
    assert g.hidden_blocks * 128 == g.hidden and g.inter_blocks * 128 == g.intermediate
    assert g.num_ranks * g.max_tokens < 1 << ENTRY_POSITION_BITS  # positions fit the entry_slot field


def _pool_rows_needed(idx_per_source: list, rank: int, local: int) -> int:
    """Pool rows a routing needs on ``rank``: each local expert's received entries, padded to BLOCK_M."""
    counts = torch.zeros(local, dtype=torch.int64)
    for idx in idx_per_source:
        ids = idx.reshape(-1) - rank * local
        counts += torch.bincount(ids[(ids >= 0) & (ids < local)], minlength=local)
    return int(((counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M).sum())


def _distinct_routing(tokens: int, num_experts: int, k: int, gen: torch.Generator, weights=None) -> torch.Tensor:
    scores = torch.rand(tokens, num_experts, generator=gen)
    if weights is not None:
        scores = scores + weights
    return scores.topk(k, dim=1).indices


@pytest.mark.parametrize("g", [MegaMoEGeometry(2, 16, 300, 4, 256, 128, True, 4),
                               MegaMoEGeometry(4, 16, 129, 6, 256, 128, True, 4),
                               MegaMoEGeometry(1, 8, 257, 8, 256, 128, True, 4)])
def test_pool_rows_hold_every_routing(g):
    """Uniform, one hot expert (every token of every rank), all of a token's slots on rank 0, and
    counts of 1 mod 128 (the most padding): the psum rows fit ``pool_rows`` and the bound is tight."""
    gen = torch.Generator().manual_seed(0)
    r, tm, k, E, L = g.num_ranks, g.max_tokens, g.num_topk, g.num_experts, g.local_experts
    bias_hot = torch.zeros(E)
    bias_hot[0] = 10.0  # expert 0 in every token's top-k
    bias_rank0 = torch.zeros(E)
    bias_rank0[:L] = 10.0  # as many slots as possible on rank 0's experts
    routings = [[_distinct_routing(tm, E, k, gen) for _ in range(r)],
                [_distinct_routing(tm, E, k, gen, bias_hot) for _ in range(r)],
                [_distinct_routing(tm, E, k, gen, bias_rank0) for _ in range(r)]]
    worst = routings[2]
    assert _pool_rows_needed(worst, 0, L) >= r * tm * min(k, L)
    for routing in routings:
        assert _pool_rows_needed(routing, 0, L) <= g.pool_rows
    # padding-heavy: each local expert gets 1 mod BLOCK_M rows from as many entries as exist
    per_expert = r * tm * min(k, L) // L
    counts = [(per_expert // BLOCK_M) * BLOCK_M + 1 if per_expert > BLOCK_M else per_expert] * L
    assert sum(align_up(c, BLOCK_M) for c in counts) <= g.pool_rows
    assert g.pool_rows < r * tm * min(k, L) + L * BLOCK_M + BLOCK_M  # not grossly oversized


# ---- the weight transform -------------------------------------------------------------------------

def _interleaved_reference(t: torch.Tensor, block: int) -> torch.Tensor:
    """[gate blocks | up blocks] along dim 1 -> gate 0, up 0, gate 1, up 1, ... (blocks of ``block`` rows)."""
    half = t.shape[1] // 2
    parts = []
    for b in range(half // block):
        parts += [t[:, b * block:(b + 1) * block], t[:, half + b * block:half + (b + 1) * block]]
    return torch.cat(parts, dim=1)


def _fp8_layer(experts=3, hidden=256, inter=384, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(experts, 2 * inter, 1, generator=gen))
    w1, s1 = per_block_cast_to_fp8(torch.randn(experts, 2 * inter, hidden, generator=gen) * scale)
    w2, s2 = per_block_cast_to_fp8(torch.randn(experts, hidden, inter, generator=gen))
    return (w1, s1), (w2, s2)


def test_fp8_transform_interleaves_gate_and_up_blocks_with_their_scales():
    (w1, s1), (w2, s2) = _fp8_layer()
    (w1t, s1t), (w2t, s2t) = cute_moe.transform_weights_for_mega_moe((w1, s1), (w2, s2))
    assert w1t.dtype == FP8 and w1t.is_contiguous() and s1t.is_contiguous()
    assert torch.equal(w1t.view(torch.uint8), _interleaved_reference(w1.view(torch.uint8), 128))
    assert torch.equal(s1t, _interleaved_reference(s1, 1))
    # scales follow their rows: the dequantized matrix is the reordered dequantized matrix
    for e in range(w1.shape[0]):
        want = _interleaved_reference(per_block_dequant(w1[e], s1[e])[None], 128)[0]
        assert torch.equal(per_block_dequant(w1t[e], s1t[e]), want)
    assert torch.equal(w2t.view(torch.uint8), w2.view(torch.uint8)) and torch.equal(s2t, s2)
    assert w2t.is_contiguous() and s2t.is_contiguous()


def test_fp8_transform_round_trip():
    (w1, s1), l2 = _fp8_layer(experts=2, inter=512, seed=1)
    (w1t, s1t), _ = cute_moe.transform_weights_for_mega_moe((w1, s1), l2)
    blocks = w1.shape[1] // 128
    back = w1t.view(torch.uint8).view(2, blocks // 2, 2, 128, -1).transpose(1, 2).reshape(w1.shape)
    assert torch.equal(back, w1.view(torch.uint8))
    assert torch.equal(s1t.view(2, blocks // 2, 2, -1).transpose(1, 2).reshape(s1.shape), s1)


def test_bf16_transform():
    gen = torch.Generator().manual_seed(2)
    w1 = torch.randn(2, 512, 256, generator=gen).bfloat16()
    w2 = torch.randn(2, 256, 256, generator=gen).bfloat16().transpose(1, 2).contiguous().transpose(1, 2)
    w1t, w2t = cute_moe.transform_weights_for_mega_moe(w1, w2)
    assert torch.equal(w1t, _interleaved_reference(w1, 128))
    assert torch.equal(w2t, w2) and w2t.is_contiguous()


@pytest.mark.parametrize("make, error, match", [
    (lambda l1, l2: (l1, l2[0]), TypeError, r"^l1_weights, l2_weights: expected both"),
    (lambda l1, l2: ((*l1, l1[1]), l2), TypeError, r"^l1_weights: expected a \(weights, scales\) tuple"),
    (lambda l1, l2: (l1, (l2[0],)), TypeError, r"^l2_weights: expected a \(weights, scales\) tuple"),
    (lambda l1, l2: ((l1[0].float(), l1[1]), l2), TypeError, r"^l1_weights: expected dtype float8_e4m3fn"),
    (lambda l1, l2: (l1, (l2[0][0], l2[1])), ValueError, r"^l2_weights: expected 3 dimensions"),
    (lambda l1, l2: ((l1[0][:, :640], l1[1][:, :5]), l2), ValueError, r"^l1_weights: expected 2 x intermediate"),
    (lambda l1, l2: (l1, (l2[0][:, :, :256], l2[1])), ValueError, r"^l2_weights: expected shape \(3, 256, 384\)"),
    (lambda l1, l2: ((l1[0], l1[1].bfloat16()), l2), TypeError, r"^l1_scales: expected dtype float32"),
    (lambda l1, l2: ((l1[0], l1[1][:, :5]), l2), ValueError, r"^l1_scales: expected shape \(3, 6, 2\)"),
    (lambda l1, l2: (l1, (l2[0], l2[1].double())), TypeError, r"^l2_scales: expected dtype float32"),
    (lambda l1, l2: (l1, (l2[0], l2[1][:, :1])), ValueError, r"^l2_scales: expected shape \(3, 2, 3\)"),
])
def test_fp8_transform_argument_errors(make, error, match):
    l1, l2 = _fp8_layer()
    with pytest.raises(error, match=match):
        cute_moe.transform_weights_for_mega_moe(*make(l1, l2))


@pytest.mark.parametrize("make, error, match", [
    (lambda w1, w2: (w1.float(), w2), TypeError, r"^l1_weights: expected dtype bfloat16"),
    (lambda w1, w2: (w1, w2.half()), TypeError, r"^l2_weights: expected dtype bfloat16"),
    (lambda w1, w2: (w1, w2[:, :128]), ValueError, r"^l2_weights: expected shape"),
    (lambda w1, w2: (w1[:, :384], w2), ValueError, r"^l1_weights: expected 2 x intermediate"),
])
def test_bf16_transform_argument_errors(make, error, match):
    w1, w2 = torch.zeros(2, 512, 256, dtype=torch.bfloat16), torch.zeros(2, 256, 256, dtype=torch.bfloat16)
    with pytest.raises(error, match=match):
        cute_moe.transform_weights_for_mega_moe(*make(w1, w2))


def _fp4_layer(experts: int = 3, hidden: int = 256, inter: int = 384, seed: int = 0) -> tuple:
    """Untransformed MXFP4 weights ((w1 int8, e1 uint8), (w2, e2)) and their FP32 dequantized W1."""
    layer = pipes.make_layer(experts, hidden, inter, seed, "cpu", weights="fp4",
                             small_block_share=pipes.SMALL_BLOCK_SHARE)
    w1 = torch.stack([layer.dequantized(e)[0] for e in range(experts)])
    return ((layer.w1, layer.s1), (layer.w2, layer.s2)), w1


def test_fp4_transform_interleaves_codes_and_exponent_words():
    ((w1, e1), (w2, e2)), dequant_w1 = _fp4_layer()
    (w1t, s1t), (w2t, s2t) = cute_moe.transform_weights_for_mega_moe((w1, e1), (w2, e2))
    assert w1t.dtype == torch.int8 and s1t.dtype == torch.int32 and s1t.shape == (3, 2 + 1, 768)
    assert s1t.is_contiguous() and s2t.is_contiguous()
    assert torch.equal(w1t, _interleaved_reference(w1, 128))
    rows1 = s1t[:, :-1].transpose(1, 2).contiguous()  # the words K-block-major -> row-major [L, 2I, H/128]
    assert torch.equal(rows1, _interleaved_reference(e1.view(torch.int32), 128))
    # byte j of a word is the exponent of 32-block j of its 128-K block (little-endian)
    assert torch.equal(rows1.view(torch.uint8), _interleaved_reference(e1, 128))
    for e in range(3):  # the codes and exponents move together: the matrix is the reordered one
        exps = ue8m0_to_float(rows1[e].view(torch.uint8))
        assert torch.equal(per_token_dequant_fp4(w1t[e], exps), _interleaved_reference(dequant_w1[e][None], 128)[0])
    assert torch.equal(w2t, w2) and s2t.shape == (3, 3 + 1, 256)
    assert torch.equal(s2t[:, :-1].transpose(1, 2).contiguous().view(torch.uint8), e2)
    # the last row: each weight row's largest exponent over K (byte 0), the kernel's reference exponent
    for words, exponents in ((s1t, _interleaved_reference(e1, 128)), (s2t, e2)):
        assert torch.equal(words[:, -1], exponents.amax(dim=2).to(torch.int32))
    assert (s1t[:, -1] >> 8).eq(0).all()
    # int32 words are accepted as input too (DeepGEMM's packed form) and give the same result
    again = cute_moe.transform_weights_for_mega_moe((w1, e1.view(torch.int32)), (w2.view(torch.uint8), e2))
    assert torch.equal(again[0][1], s1t) and torch.equal(again[1][0], w2t)


@pytest.mark.parametrize("make, error, match", [
    (lambda l1, l2: ((l1[0], ue8m0_to_float(l1[1])), l2), TypeError,
     r"^l1_scales: expected uint8 UE8M0 exponents .* got float32; convert"),
    (lambda l1, l2: ((l1[0], l1[1].to(torch.int16)), l2), TypeError, r"^l1_scales: expected dtype uint8"),
    (lambda l1, l2: ((l1[0], l1[1][:, :, :4]), l2), ValueError, r"^l1_scales: expected shape \(3, 768, 8\)"),
    (lambda l1, l2: (l1, (l2[0], l2[1].view(torch.int32)[:, :, :1])), ValueError,
     r"^l2_scales: expected shape \(3, 256, 3\)"),
    (lambda l1, l2: ((l1[0][:, :640], l1[1][:, :640]), l2), ValueError, r"^l1_weights: expected 2 x intermediate"),
    (lambda l1, l2: (l1, (l2[0][:, :, :64], l2[1])), ValueError, r"^l2_weights: expected shape \(3, 256, 192\)"),
    (lambda l1, l2: ((l1[0][:, :, :96], l1[1][:, :, :6]), (l2[0][:, :192], l2[1][:, :192])), ValueError,
     r"^l1_weights: expected hidden = 2 x packed columns a multiple of 128"),
    (lambda l1, l2: (l1, (l2[0],)), TypeError, r"^l2_weights: expected a \(packed weights, exponents\) tuple"),
    (lambda l1, l2: (l1, (l2[0].to(torch.int16), l2[1])), TypeError, r"^l2_weights: expected dtype"),
])
def test_fp4_transform_argument_errors(make, error, match):
    l1, l2 = _fp4_layer()[0]
    with pytest.raises(error, match=match):
        cute_moe.transform_weights_for_mega_moe(*make(l1, l2))


# ---- buffer arguments ------------------------------------------------------------------------------

GOOD_BUFFER = (2, 256, 128, 6, 4096, 2048, "fp8", "swiglu")  # world, E, Tm, K, H, I, mma_type, activation


def _buffer_args(**changes):
    names = ("world_size", "num_experts", "num_max_tokens_per_rank", "num_topk", "hidden", "intermediate_hidden",
             "mma_type", "activation")
    args = dict(zip(names, GOOD_BUFFER))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, match", [
    (dict(num_experts=256.0), TypeError, r"^num_experts: expected int"),
    (dict(num_max_tokens_per_rank=True), TypeError, r"^num_max_tokens_per_rank: expected int"),
    (dict(num_topk=0), ValueError, r"^num_topk: expected a positive value"),
    (dict(hidden=-256), ValueError, r"^hidden: expected a positive value"),
    (dict(intermediate_hidden=0), ValueError, r"^intermediate_hidden: expected a positive value"),
    (dict(world_size=9, num_experts=72), ValueError, r"^group: expected 1..8 ranks"),
    (dict(num_experts=255), ValueError, r"^num_experts: expected a multiple of the group size 2"),
    (dict(world_size=1, num_experts=2048), ValueError, r"^num_experts: expected at most 1024 experts per rank"),
    (dict(hidden=384), ValueError, r"^hidden: expected a multiple of 256"),
    (dict(intermediate_hidden=192), ValueError, r"^intermediate_hidden: expected a multiple of 128"),
    (dict(num_topk=33), ValueError, r"^num_topk: expected at most 32"),
    (dict(num_max_tokens_per_rank=1 << 19), ValueError, r"^num_max_tokens_per_rank: expected group size x tokens"),
    (dict(mma_type="fp16"), ValueError, r"^mma_type: expected one of"),
    (dict(mma_type=8), ValueError, r"^mma_type: expected one of"),
    (dict(activation="gelu"), ValueError, r"^activation: expected one of"),
])
def test_buffer_argument_errors(changes, error, match):
    with pytest.raises(error, match=match):
        mega_moe.check_mega_moe_args(**_buffer_args(**changes))


def test_buffer_arguments_accepted_and_mma_type_normalized():
    assert mega_moe.check_mega_moe_args(**_buffer_args()) == "fp8"
    assert mega_moe.check_mega_moe_args(**_buffer_args(mma_type="fp8xfp8")) == "fp8"
    assert mega_moe.check_mega_moe_args(**_buffer_args(mma_type="bf16xbf16")) == "bf16"
    assert mega_moe.check_mega_moe_args(**_buffer_args(mma_type="fp8xfp4")) == "fp8xfp4"
    assert mega_moe.check_mega_moe_args(8, 256, 8192, 8, 7168, 2048, "bf16", "swiglu") == "bf16"


# ---- call arguments (a buffer with its host state only) -------------------------------------------

TM, H, I, K, E_LOCAL = 8, 256, 128, 4, 2


def _host_buffer(mma_type: str = "fp8", device: str = "meta") -> mega_moe.MegaMoEBuffer:
    """A MegaMoEBuffer without process group or memory: what the pre-launch checks read. Its device is
    'meta' so that CPU tensors count as 'another device' and meta tensors as the right one."""
    buf = mega_moe.MegaMoEBuffer.__new__(mega_moe.MegaMoEBuffer)
    buf.geom = MegaMoEGeometry(2, 2 * E_LOCAL, TM, K, H, I, mma_type != "bf16", 4, fp4=mma_type == "fp8xfp4")
    buf.mma_type, buf.device, buf.rank, buf.world, buf.timeout_s = mma_type, torch.device(device), 0, 2, 1.0
    buf.error = torch.zeros(ep.ERROR_WORDS, dtype=torch.int32)
    buf.broken = None
    return buf


def _fp8_call_args(tokens: int = TM) -> dict:
    meta = dict(device="meta")
    return dict(y=torch.empty(tokens, H, dtype=torch.bfloat16, **meta),
                l1_weights=(torch.empty(E_LOCAL, 2 * I, H, dtype=FP8, **meta),
                            torch.empty(E_LOCAL, 2 * I // 128, H // 128, **meta)),
                l2_weights=(torch.empty(E_LOCAL, H, I, dtype=FP8, **meta),
                            torch.empty(E_LOCAL, H // 128, I // 128, **meta)),
                cumulative_local_expert_recv_stats=torch.empty(E_LOCAL, dtype=torch.int32, **meta),
                activation_clamp=10.0)


@pytest.fixture
def launches(monkeypatch):
    """Replace the kernel launch by a recorder: a refused call must never reach it."""
    calls = []
    monkeypatch.setattr(mega_moe, "_launch", lambda *args: calls.append(args))
    return calls


def test_valid_calls_reach_the_launch(launches):
    buf = _host_buffer()
    cute_moe.fp8_mega_moe(buffer=buf, **_fp8_call_args())
    cute_moe.fp8_mega_moe(buffer=buf, **dict(_fp8_call_args(0), cumulative_local_expert_recv_stats=None,
                                             activation_clamp=None))
    assert len(launches) == 2


def _with_weight(args, layer, pos, fn):
    pair = list(args[layer])
    pair[pos] = fn(pair[pos])
    args[layer] = tuple(pair)


def _noncontig(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(y=a["y"].float()), TypeError, r"^y: expected dtype bfloat16"),
    (lambda a: a.update(y=a["y"][0]), ValueError, r"^y: expected 2 dimensions"),
    (lambda a: a.update(y=torch.empty(TM + 1, H, dtype=torch.bfloat16, device="meta")), ValueError,
     r"^y: expected at most num_max_tokens_per_rank=8 tokens, got 9"),
    (lambda a: a.update(y=torch.empty(TM, 2 * H, dtype=torch.bfloat16, device="meta")), ValueError,
     r"^y: expected shape \(8, 256\)"),
    (lambda a: a.update(y=torch.empty(H, TM, dtype=torch.bfloat16, device="meta").t()), ValueError,
     r"^y: expected a contiguous"),
    (lambda a: a.update(y=torch.empty(TM, H, dtype=torch.bfloat16)), ValueError, r"^y: expected a tensor on meta"),
    (lambda a: a.update(cumulative_local_expert_recv_stats=torch.empty(E_LOCAL, dtype=torch.int64, device="meta")),
     TypeError, r"^cumulative_local_expert_recv_stats: expected dtype int32"),
    (lambda a: a.update(cumulative_local_expert_recv_stats=torch.empty(4, dtype=torch.int32, device="meta")),
     ValueError, r"^cumulative_local_expert_recv_stats: expected shape \(2,\)"),
    (lambda a: a.update(cumulative_local_expert_recv_stats=torch.empty(E_LOCAL, dtype=torch.int32)), ValueError,
     r"^cumulative_local_expert_recv_stats: expected a tensor on meta"),
    (lambda a: a.update(activation_clamp="10"), TypeError, r"^activation_clamp: expected None or a number"),
    (lambda a: a.update(activation_clamp=True), TypeError, r"^activation_clamp: expected None or a number"),
    (lambda a: a.update(activation_clamp=0.0), ValueError, r"^activation_clamp: expected a positive finite"),
    (lambda a: a.update(activation_clamp=-1), ValueError, r"^activation_clamp: expected a positive finite"),
    (lambda a: a.update(activation_clamp=float("inf")), ValueError, r"^activation_clamp: expected a positive"),
    (lambda a: a.update(activation_clamp=float("nan")), ValueError, r"^activation_clamp: expected a positive"),
    (lambda a: a.update(l1_weights=a["l1_weights"][0]), TypeError, r"^l1_weights: expected a \(weights, scales\)"),
    (lambda a: _with_weight(a, "l1_weights", 0, lambda t: t.view(torch.uint8)), TypeError,
     r"^l1_weights: expected dtype float8_e4m3fn"),
    (lambda a: _with_weight(a, "l2_weights", 0, lambda t: t[:, :, :64]), ValueError, r"^l2_weights: expected shape"),
    (lambda a: _with_weight(a, "l1_weights", 1, lambda t: t[:, :1]), ValueError, r"^l1_scales: expected shape"),
    (lambda a: _with_weight(a, "l2_weights", 1, lambda t: t.double()), TypeError, r"^l2_scales: expected dtype"),
    (lambda a: [_with_weight(a, layer, pos, lambda t: torch.cat([t, t]))
                for layer in ("l1_weights", "l2_weights") for pos in (0, 1)],
     ValueError, r"^l1_weights: expected shape \(2, 256, 256\)"),  # all experts instead of this rank's
    (lambda a: _with_weight(a, "l1_weights", 0, _noncontig), ValueError, r"^l1_weights: expected a contiguous"),
    (lambda a: _with_weight(a, "l2_weights", 0, _noncontig), ValueError, r"^l2_weights: expected a contiguous"),
    (lambda a: _with_weight(a, "l1_weights", 0, lambda t: torch.empty(t.shape, dtype=FP8)), ValueError,
     r"^l1_weights: expected a tensor on meta"),
    (lambda a: _with_weight(a, "l2_weights", 0, lambda t: torch.empty(t.shape, dtype=FP8)), ValueError,
     r"^l2_weights: expected a tensor on meta"),
    (lambda a: _with_weight(a, "l1_weights", 1, _noncontig), ValueError, r"^l1_scales: expected a contiguous"),
    (lambda a: _with_weight(a, "l2_weights", 1, lambda t: torch.empty(t.shape)), ValueError,
     r"^l2_scales: expected a tensor on meta"),
])
def test_fp8_call_argument_errors(launches, mutate, error, match):
    args = _fp8_call_args()
    mutate(args)
    with pytest.raises(error, match=match):
        cute_moe.fp8_mega_moe(buffer=_host_buffer(), **args)
    assert not launches


def test_misaligned_y_is_refused(launches):
    """A 2-byte offset y (a CPU buffer's view: a real address) is refused before launch."""
    buf = _host_buffer(device="cpu")
    y = torch.empty(TM * H + 8, dtype=torch.bfloat16)[1:1 + TM * H].view(TM, H)
    args = dict(_fp8_call_args(), y=y, cumulative_local_expert_recv_stats=None)
    with pytest.raises(ValueError, match=r"^y: expected a 16-byte aligned data pointer"):
        cute_moe.fp8_mega_moe(buffer=buf, **args)
    assert not launches


def test_buffer_kind_and_type_are_checked(launches):
    args = _fp8_call_args()
    with pytest.raises(TypeError, match=r"^buffer: expected a MegaMoEBuffer, got EPBuffer"):
        cute_moe.fp8_mega_moe(buffer=ep.EPBuffer.__new__(ep.EPBuffer), **args)
    with pytest.raises(ValueError, match=r"^buffer: expected a buffer built with mma_type='fp8', got 'bf16'"):
        cute_moe.fp8_mega_moe(buffer=_host_buffer("bf16"), **args)
    meta = dict(device="meta", dtype=torch.bfloat16)
    bf16_args = dict(y=args["y"], l1_weights=torch.empty(E_LOCAL, 2 * I, H, **meta),
                     l2_weights=torch.empty(E_LOCAL, H, I, **meta))
    with pytest.raises(ValueError, match=r"^buffer: expected a buffer built with mma_type='bf16', got 'fp8'"):
        cute_moe.bf16_mega_moe(buffer=_host_buffer("fp8"), **bf16_args)
    assert not launches
    cute_moe.bf16_mega_moe(buffer=_host_buffer("bf16"), **bf16_args)
    assert len(launches) == 1
    with pytest.raises(TypeError, match=r"^l1_weights: expected dtype bfloat16"):
        cute_moe.bf16_mega_moe(buffer=_host_buffer("bf16"), **dict(bf16_args, l1_weights=args["l1_weights"][0]))


def _fp4_call_args(tokens: int = TM) -> dict:
    meta = dict(device="meta")
    return dict(y=torch.empty(tokens, H, dtype=torch.bfloat16, **meta),
                l1_weights=(torch.empty(E_LOCAL, 2 * I, H // 2, dtype=torch.int8, **meta),
                            torch.empty(E_LOCAL, H // 128 + 1, 2 * I, dtype=torch.int32, **meta)),
                l2_weights=(torch.empty(E_LOCAL, H, I // 2, dtype=torch.int8, **meta),
                            torch.empty(E_LOCAL, I // 128 + 1, H, dtype=torch.int32, **meta)),
                cumulative_local_expert_recv_stats=None, activation_clamp=None)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: _with_weight(a, "l1_weights", 1, lambda t: torch.empty(E_LOCAL, 2 * I, H // 32, dtype=torch.uint8,
                                                                        device="meta")),
     TypeError, r"^l1_scales: expected dtype int32"),  # untransformed exponents
    (lambda a: _with_weight(a, "l2_weights", 1, lambda t: t[:, :, :0]), ValueError, r"^l2_scales: expected shape"),
    (lambda a: _with_weight(a, "l1_weights", 0, lambda t: torch.empty(E_LOCAL, 2 * I, H, dtype=FP8, device="meta")),
     TypeError, r"^l1_weights: expected dtype int8 or uint8"),
    (lambda a: [_with_weight(a, layer, pos, lambda t: torch.cat([t, t]))
                for layer in ("l1_weights", "l2_weights") for pos in (0, 1)],
     ValueError, r"^l1_weights: expected shape \(2, 256, 128\)"),  # all experts instead of this rank's
    (lambda a: _with_weight(a, "l2_weights", 0, _noncontig), ValueError, r"^l2_weights: expected a contiguous"),
    (lambda a: _with_weight(a, "l1_weights", 1, lambda t: torch.empty(t.shape, dtype=torch.int32)), ValueError,
     r"^l1_scales: expected a tensor on meta"),
])
def test_fp4_call_argument_errors(launches, mutate, error, match):
    args = _fp4_call_args()
    mutate(args)
    with pytest.raises(error, match=match):
        cute_moe.fp8_fp4_mega_moe(buffer=_host_buffer("fp8xfp4"), **args)
    assert not launches


def test_fp4_calls_need_an_fp8xfp4_buffer(launches):
    cute_moe.fp8_fp4_mega_moe(buffer=_host_buffer("fp8xfp4"), **_fp4_call_args())
    assert len(launches) == 1
    with pytest.raises(ValueError, match=r"^buffer: expected a buffer built with mma_type='fp8xfp4', got 'fp8'"):
        cute_moe.fp8_fp4_mega_moe(buffer=_host_buffer("fp8"), **_fp4_call_args())
    with pytest.raises(ValueError, match=r"^buffer: expected a buffer built with mma_type='fp8', got 'fp8xfp4'"):
        cute_moe.fp8_mega_moe(buffer=_host_buffer("fp8xfp4"), **_fp8_call_args())
    assert len(launches) == 1


def test_fp4_geometry_needs_fp8_activations():
    with pytest.raises(ValueError, match="^fp4: MXFP4 expert weights need FP8 activations"):
        MegaMoEGeometry(2, 16, 8, 4, 256, 128, False, 4, fp4=True)


# ---- timeout errors (ops 4-7) ---------------------------------------------------------------------

@pytest.mark.parametrize("op, words", [(4, "mega_moe (waiting for peers' inputs)"), (5, "mega_moe (grid barrier)"),
                                       (6, "mega_moe (tile dependency)"),
                                       (7, "mega_moe (waiting for peers' expert outputs)")])
def test_error_message_of_each_mega_moe_wait(op, words):
    msg = ep.format_error([1, op, 3, 0b101], 0.5)
    assert msg.startswith(f"cute_moe.ep: {words} on rank 3 timed out after 0.5 s")
    assert msg.endswith("ranks that did not arrive: [0, 2]")


def test_a_timed_out_buffer_refuses_every_later_call(launches):
    buf = _host_buffer()
    buf.error.copy_(torch.tensor([1, 4, 0, 0b10], dtype=torch.int32))
    for _ in range(2):  # the error sticks even after the record is cleared
        with pytest.raises(RuntimeError, match=r"mega_moe \(waiting for peers' inputs\) on rank 0 .*\[1\]"):
            cute_moe.fp8_mega_moe(buffer=buf, **_fp8_call_args())
        buf.error.zero_()
    with pytest.raises(RuntimeError, match="mega_moe"):
        buf.check()
    assert not launches


# ---- the pipelines module (FP32 reference, inputs, NCCL routing arithmetic) ----------------------

def _reference_by_token(x_fp8, x_sf, idx, weights, layer, clamp=None):
    """FP64, token by token and slot by slot: an independent form of reference_moe."""
    x = per_token_dequant(x_fp8, x_sf).double()
    out = torch.zeros(x.shape[0], layer.hidden, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if not 0 <= e < layer.num_experts:
                continue
            h = per_block_dequant(layer.w1[e], layer.s1[e]).double() @ x[t]
            g, u = h.chunk(2)
            if clamp is not None:
                g, u = g.clamp(max=clamp), u.clamp(-clamp, clamp)
            act = torch.nn.functional.silu(g) * u
            out[t] += float(weights[t, k]) * (per_block_dequant(layer.w2[e], layer.s2[e]).double() @ act)
    return out


def test_make_layer_is_deterministic_and_sliced_per_rank():
    a, b = pipes.make_layer(8, 256, 128, 5, "cpu"), pipes.make_layer(8, 256, 128, 5, "cpu")
    c = pipes.make_layer(8, 256, 128, 6, "cpu")
    assert torch.equal(a.w1.view(torch.uint8), b.w1.view(torch.uint8)) and torch.equal(a.s2, b.s2)
    assert not torch.equal(a.w1.view(torch.uint8), c.w1.view(torch.uint8))
    assert (a.w1.shape, a.s1.shape, a.w2.shape, a.s2.shape) == ((8, 256, 256), (8, 2, 2), (8, 256, 128), (8, 2, 1))
    assert a.s1.max() / a.s1.min() > 2  # varied magnitudes between blocks / experts
    (w1, s1), (w2, s2) = a.local(1, 4)
    assert torch.equal(w1.view(torch.uint8), a.w1[2:4].view(torch.uint8)) and torch.equal(s2, a.s2[2:4])
    assert w1.is_contiguous() and w2.shape == (2, 256, 128) and s1.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="rank, world"):
        a.local(0, 3)


def test_make_layer_fp4_has_far_apart_block_exponents():
    share = pipes.SMALL_BLOCK_SHARE
    a = pipes.make_layer(4, 256, 128, 5, "cpu", weights="fp4", small_block_share=share)
    assert torch.equal(a.w1, pipes.make_layer(4, 256, 128, 5, "cpu", weights="fp4", small_block_share=share).w1)
    assert (a.w1.dtype, a.s1.dtype, a.w1.shape, a.s1.shape, a.w2.shape, a.s2.shape) == (
        torch.int8, torch.uint8, (4, 256, 128), (4, 256, 8), (4, 256, 64), (4, 256, 4))
    assert (a.hidden, a.intermediate, a.fp4) == (256, 128, True)
    spread = a.s1.view(4, 256, 2, 4).int()
    spread = (spread.amax(-1) - spread.amin(-1)).flatten()
    assert (spread > 8).any() and (spread <= 5).float().mean() > 0.5  # both widening paths occur
    plain = pipes.make_layer(4, 256, 128, 5, "cpu", weights="fp4").s1.view(4, 256, 2, 4).int()
    assert int((plain.amax(-1) - plain.amin(-1)).max()) <= 5  # the default: the fast path only
    w1, w2 = a.dequantized(1)
    assert w1.shape == (256, 256) and w2.shape == (256, 128) and w1.dtype == torch.float32
    with pytest.raises(ValueError, match="^weights: expected one of"):
        pipes.make_layer(4, 256, 128, 5, "cpu", weights="fp16")


def test_make_inputs_routing_and_drops():
    x, x_fp8, x_sf, idx, w = pipes.make_inputs(200, 256, 16, 6, 3, "cpu", drop_fraction=0.3)
    assert x.dtype == torch.bfloat16 and x_fp8.dtype == FP8 and x_sf.shape == (200, 2) and idx.dtype == torch.int64
    assert torch.allclose(per_token_dequant(x_fp8, x_sf), x.float(), rtol=0.07, atol=1e-6)
    valid = (idx >= 0) & (idx < 16)
    assert (idx == -1).any() and (idx >= 16).any() and 0.2 < float((~valid).float().mean()) < 0.4
    for row, ok in zip(idx.tolist(), valid.tolist()):
        kept = [e for e, v in zip(row, ok) if v]
        assert len(set(kept)) == len(kept), "an expert repeated within a token"
    norms = x.float().norm(dim=1)
    assert norms.max() / norms.min() > 10 and (w > 0).all()
    assert pipes.make_inputs(0, 256, 16, 6, 3, "cpu")[1].shape == (0, 256)


@pytest.mark.parametrize("clamp", [None, 0.05])
def test_reference_matches_a_token_by_token_fp64_form(clamp):
    layer = pipes.make_layer(8, 256, 128, 0, "cpu")
    _, x_fp8, x_sf, idx, w = pipes.make_inputs(12, 256, 8, 3, 1, "cpu", drop_fraction=0.25, magnitude=4.0)
    idx[5] = -1  # a token with every slot dropped gets exact zeros
    out = pipes.reference_moe(x_fp8, x_sf, idx, w, layer, activation_clamp=clamp)
    want = _reference_by_token(x_fp8, x_sf, idx, w, layer, clamp)
    assert out.dtype == torch.float32 and calc_diff(out, want) < 1e-10
    assert torch.equal(out[5], torch.zeros(256))
    quantized = pipes.reference_moe(x_fp8, x_sf, idx, w, layer, activation_clamp=clamp, quantize_intermediate=True)
    assert 0 < calc_diff(quantized, want) < 2e-3  # one FP8 re-quantization of the intermediate
    if clamp is not None:
        assert calc_diff(out, _reference_by_token(x_fp8, x_sf, idx, w, layer)) > 1e-2  # the clamp matters


def test_nccl_psum_layout_rows():
    """Entries of each local expert get consecutive rows of a 128-aligned segment, in entry order;
    other entries the dump row; psum = unaligned segment ends."""
    state = object.__new__(pipes.NcclMoEState)
    state.local_experts, state.pool_rows = 3, 10 * 128
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 3, (400,), generator=gen).to(torch.int32)
    ids[ids == 1] = -1  # an empty expert
    entry_row, psum = pipes._psum_layout(state, ids)
    start = 0
    for e in range(3):
        rows = entry_row[ids == e]
        assert torch.equal(rows, torch.arange(start, start + rows.numel()))
        assert int(psum[e]) == start + rows.numel()
        start = align_up(int(psum[e]), 128)
    assert (entry_row[ids < 0] == state.pool_rows).all()


def _psum_gemm_reference(a, b, d, grouped_layout, use_psum_layout=False):
    """CPU stand-in of m_grouped_fp8_gemm_nt_contiguous (psum form): rows outside the segments untouched."""
    assert use_psum_layout
    a_deq, start = per_token_dequant(a[0], a[1].contiguous()), 0
    for e, end in enumerate(grouped_layout.tolist()):
        w = per_block_dequant(b[0][e], b[1][e])
        d[start:end] = (a_deq[start:end] @ w.T).to(d.dtype)
        start = align_up(end, 128)


@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_nccl_pipeline_equals_the_reference_at_world_one(gloo_world_of_one, monkeypatch):
    """The NCCL baseline's packing, psum layout, weighting and sums (GEMMs replaced by CPU math)."""
    monkeypatch.setitem(ops.OPS, "m_grouped_fp8_gemm_nt_contiguous", _psum_gemm_reference)
    layer = pipes.make_layer(4, 256, 128, 1, "cpu")
    state = pipes.make_nccl_state(gloo_world_of_one, 4, 24, 3, 256, 128, "cpu")
    for tokens, seed in ((20, 0), (24, 1), (0, 2), (5, 3)):  # several calls on one state, T <= capacity
        _, x_fp8, x_sf, idx, w = pipes.make_inputs(tokens, 256, 4, 3, seed, "cpu", drop_fraction=0.2)
        if tokens:
            idx[0] = -1
        y = pipes.nccl_mega_moe(state, x_fp8, x_sf, idx, w, layer.local(0, 1), activation_clamp=2.0)
        ref = pipes.reference_moe(x_fp8, x_sf, idx, w, layer, activation_clamp=2.0, quantize_intermediate=True)
        assert y.dtype == torch.bfloat16 and y.shape == (tokens, 256)
        if tokens:
            assert calc_diff(y, ref) < 1e-3 and torch.equal(y[0], torch.zeros(256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="capacity=24"):
        pipes.nccl_mega_moe(state, *pipes.make_inputs(25, 256, 4, 3, 0, "cpu")[1:], layer.local(0, 1))


# ---- the kernel compiles for sm_90a -----------------------------------------------------------------

COMPILED = [(MegaMoEGeometry(1, 16, 256, 4, 512, 256, True, 132), False, MIN_BLOCK_M),
            (MegaMoEGeometry(2, 16, 256, 4, 512, 256, True, 132), True, BLOCK_M),
            (MegaMoEGeometry(8, 256, 8192, 8, 7168, 2048, True, 132), False, BLOCK_M),
            (MegaMoEGeometry(2, 16, 256, 4, 512, 256, False, 132), True, MIN_BLOCK_M),  # BF16
            (MegaMoEGeometry(2, 16, 256, 4, 512, 256, True, 132, fp4=True), False, MIN_BLOCK_M),  # FP8 x FP4
            (MegaMoEGeometry(2, 256, 128, 6, 4096, 2048, True, 132, fp4=True), True, BLOCK_M)]


@pytest.mark.parametrize("geom,clamp,block_m", COMPILED)
def test_kernel_compiles_for_sm90(geom, clamp, block_m):
    from cute_moe.kernels.mega_moe_signature import compile_mega_moe
    fn = compile_mega_moe(geom, clamp, block_m)
    assert fn.__class__.__name__.startswith("TVMFFI")


@pytest.mark.parametrize("geom,clamp,block_m", [COMPILED[1], COMPILED[4]])  # FP8; FP4 with widening warpgroups
def test_register_moves_fit_what_the_launch_gives(geom, clamp, block_m, tmp_path):
    """setmaxnreg.inc retries until the CTA's pool has the registers (ptxas gives a kernel that moves
    registers the most its block size allows): the tile loop's budgets of every warpgroup, and the
    tail's, fit in what the launch gives the CTA."""
    from test_compile_fp4 import _register_count

    from cute_moe.kernels.mega_moe_signature import compile_mega_moe, mega_moe_kernel
    kernel = mega_moe_kernel(geom, clamp, block_m)
    launch = _register_count(compile_mega_moe(geom, clamp, block_m, extra_options=f"--keep-cubin "
                                              f"--dump-dir={tmp_path}").artifacts.CUBIN)
    producer, consumer = kernel.role_regs
    per_warpgroup = producer + kernel.num_consumer_wgs * consumer + kernel.aux_wgs * kernel.aux_regs
    assert 128 * per_warpgroup <= launch * kernel.threads
    assert kernel.tail_regs <= launch and kernel.threads == 128 * (1 + kernel.num_consumer_wgs + kernel.aux_wgs)
    assert kernel.aux_wgs == (2 if geom.fp4 and block_m == MIN_BLOCK_M else 0)


@pytest.mark.parametrize("tokens,expected", [(1, MIN_BLOCK_M), (128, MIN_BLOCK_M), (2048, BLOCK_M)])
def test_block_height_follows_rows_per_expert(tokens, expected):
    g = MegaMoEGeometry(2, 256, 8192, 6, 4096, 2048, True, 132)  # 2048 tokens: 96 rows per expert
    assert mega_moe.block_height(g, tokens) == expected and expected in BLOCK_SIZES
