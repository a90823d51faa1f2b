"""Shared pieces of the Mega MoE tests and benchmark: weights, inputs, the FP32 reference and the two
baseline pipelines that ``cute_moe.fp8_mega_moe`` is compared with (docs/mega_moe.md, section 4).

* ``make_layer``: all experts' weights of one layer, identical on every rank (same seed), FP8 with
  one scale per 128 x 128 block, or MXFP4 (E2M1 codes with one UE8M0 exponent per 32 K; optionally
  a share of 32-blocks far below their neighbours); ``MoEWeights.local`` slices this rank's experts.
* ``make_inputs``: one rank's tokens (varied magnitudes, FP8 1 x 128), top-k routing without a
  repeated expert per token, optionally dropped slots (-1 and ids >= E).
* ``reference_moe``: the layer in FP32 on the dequantized operands over all experts (optionally
  with the intermediate re-quantized as the kernel does).
* ``unfused_mega_moe``: our own pieces on an EPBuffer sized for the batch (``make_ep_buffer``):
  ``EPBuffer.dispatch`` (FP8; masked layout up to 128 tokens per rank, psum above) -> grouped FP8
  (or FP8 x FP4) GEMM (masked / contiguous) -> SwiGLU (+ clamp) and 1 x 128 FP8 quantization in torch
  -> grouped GEMM -> ``EPBuffer.combine``.
* ``nccl_mega_moe``: NCCL ``all_to_all_single`` of every token row to every rank (padded to a fixed
  per-rank capacity: sync-free), local psum layout in torch, the same GEMMs and SwiGLU, per-source
  partial sums back over NCCL, FP32 sum of the ranks' partials.

Both pipelines are sync-free and CUDA-graph capturable (no host reads of device values).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cute_moe.fp4_ops import m_grouped_fp8_fp4_gemm_nt_contiguous, m_grouped_fp8_fp4_gemm_nt_masked
from cute_moe.layouts import (float_to_ue8m0, per_block_cast_to_fp8, per_block_dequant, per_token_cast_to_fp4,
                              per_token_cast_to_fp8, per_token_dequant, per_token_dequant_fp4, ue8m0_to_float)
from cute_moe.ops import m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked

SCALE_BLOCK = 128  # FP8: one scale per 128 values of a row / per 128 x 128 weight block
PSUM_ALIGNMENT = 128  # expert segments of the psum layout start on this many rows (the GEMMs' default)
MASKED_MAX_TOKENS = 128  # the unfused pipeline's layout: masked up to this many tokens per rank, psum above
SCALE_PITCH_ALIGN = 4  # MN-major scales: elements between two K blocks, a multiple of 4 (16 bytes)
FP8 = torch.float8_e4m3fn
TOKEN_MAGNITUDE_SIGMA = 1.0  # log-normal spread of the per-token input magnitudes
ROW_MAGNITUDE_SIGMA = 0.5  # log-normal spread of the weights' output channels
EXPERT_MAGNITUDE_SIGMA = 0.3  # log-normal spread between experts
OUT_OF_RANGE_SPAN = 1000  # dropped slots written as ids in [E, E + span) (half of them; the rest -1)
WEIGHT_FORMATS = ("fp8", "fp4")
MX_BLOCK = 32  # MXFP4: K elements per UE8M0 exponent
# MXFP4 test weights: this share of 32-blocks scaled down by 2^-shift, shift uniform in [1, 12], before
# quantization, so blocks of one 128-K block have exponents up to 12 apart (the kernels' exact path).
# Trained weights rarely look like that; the benchmark uses none (make_layer's default).
SMALL_BLOCK_SHARE = 0.1
SMALL_BLOCK_MAX_SHIFT = 12


# ---- weights and inputs -------------------------------------------------------------------------

@dataclass
class MoEWeights:
    """One layer's expert weights over all ``num_experts`` experts (gate rows [0, I), then up rows
    [I, 2I) in ``w1``). FP8: w1 [E, 2I, H], s1 [E, 2I/128, H/128], w2 [E, H, I], s2 [E, H/128,
    I/128]; MXFP4: w1 int8 [E, 2I, H/2] (two E2M1 codes per byte), s1 uint8 UE8M0 [E, 2I, H/32], w2
    [E, H, I/2], s2 [E, H, I/32]."""

    w1: torch.Tensor
    s1: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor

    @property
    def fp4(self) -> bool:
        return self.w1.dtype == torch.int8

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[2] * (2 if self.fp4 else 1)

    @property
    def intermediate(self) -> int:
        return self.w2.shape[2] * (2 if self.fp4 else 1)

    def dequantized(self, expert: int) -> tuple:
        """FP32 (W1 [2I, H], W2 [H, I]) of one expert."""
        if self.fp4:
            return tuple(per_token_dequant_fp4(w[expert], ue8m0_to_float(s[expert]))
                         for w, s in ((self.w1, self.s1), (self.w2, self.s2)))
        return per_block_dequant(self.w1[expert], self.s1[expert]), per_block_dequant(self.w2[expert], self.s2[expert])

    def local(self, rank: int, world: int) -> tuple:
        """((w1, s1), (w2, s2)) of rank ``rank``'s experts ``[rank * L, (rank + 1) * L)``, L = E / world
        (contiguous views, the untransformed layout: feed ``transform_weights_for_mega_moe`` for the
        fused kernel, use as is for the baselines)."""
        if self.num_experts % world != 0 or not 0 <= rank < world:
            raise ValueError(f"rank, world: expected 0 <= rank < world dividing {self.num_experts} experts, "
                             f"got rank {rank}, world {world}")
        per = self.num_experts // world
        part = slice(rank * per, (rank + 1) * per)
        return (self.w1[part], self.s1[part]), (self.w2[part], self.s2[part])


def _expert_matrix(rows: int, cols: int, gen: torch.Generator, device) -> torch.Tensor:
    """FP32 [rows, cols] ~ N(0, 1/cols) with log-normal per-row and per-matrix magnitudes."""
    row_scale = torch.exp(torch.randn(rows, 1, generator=gen, device=device) * ROW_MAGNITUDE_SIGMA)
    matrix_scale = torch.exp(torch.randn(1, 1, generator=gen, device=device) * EXPERT_MAGNITUDE_SIGMA)
    return torch.randn(rows, cols, generator=gen, device=device) * row_scale * matrix_scale / cols ** 0.5


def _mxfp4(matrix: torch.Tensor, gen: torch.Generator, small_block_share: float) -> tuple:
    """(int8 codes [N, K/2], uint8 exponents [N, K/32]) of ``matrix`` after scaling a random
    ``small_block_share`` of its 32-blocks far down (see SMALL_BLOCK_SHARE)."""
    rows, cols = matrix.shape
    blocks = matrix.view(rows, cols // MX_BLOCK, MX_BLOCK)
    small = torch.rand(rows, cols // MX_BLOCK, 1, generator=gen, device=matrix.device) < small_block_share
    shift = torch.randint(1, SMALL_BLOCK_MAX_SHIFT + 1, small.shape, generator=gen, device=matrix.device)
    blocks = torch.where(small, blocks * torch.exp2(-shift.float()), blocks)
    codes, sf = per_token_cast_to_fp4(blocks.view(rows, cols), use_ue8m0=True, gran_k=MX_BLOCK)
    return codes, float_to_ue8m0(sf)


def make_layer(num_experts: int, hidden: int, inter: int, seed: int, device, weights: str = "fp8",
               small_block_share: float = 0.0) -> MoEWeights:
    """All experts' weights, generated expert by expert from ``seed`` on ``device`` (identical on every
    rank: same seed, same generator), FP8-quantized per 128 x 128 block or (``weights='fp4'``) MXFP4,
    with ``small_block_share`` of the 32-blocks scaled far down first."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights: expected one of {WEIGHT_FORMATS}, got {weights!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if weights == "fp4":
        w1 = torch.empty(num_experts, 2 * inter, hidden // 2, dtype=torch.int8, device=device)
        s1 = torch.empty(num_experts, 2 * inter, hidden // MX_BLOCK, dtype=torch.uint8, device=device)
        w2 = torch.empty(num_experts, hidden, inter // 2, dtype=torch.int8, device=device)
        s2 = torch.empty(num_experts, hidden, inter // MX_BLOCK, dtype=torch.uint8, device=device)
        for e in range(num_experts):
            w1[e], s1[e] = _mxfp4(_expert_matrix(2 * inter, hidden, gen, device), gen, small_block_share)
            w2[e], s2[e] = _mxfp4(_expert_matrix(hidden, inter, gen, device), gen, small_block_share)
        return MoEWeights(w1, s1, w2, s2)
    w1 = torch.empty(num_experts, 2 * inter, hidden, dtype=FP8, device=device)
    s1 = torch.empty(num_experts, 2 * inter // SCALE_BLOCK, -(-hidden // SCALE_BLOCK), dtype=torch.float32,
                     device=device)
    w2 = torch.empty(num_experts, hidden, inter, dtype=FP8, device=device)
    s2 = torch.empty(num_experts, -(-hidden // SCALE_BLOCK), inter // SCALE_BLOCK, dtype=torch.float32,
                     device=device)
    for e in range(num_experts):
        w1[e], s1[e] = per_block_cast_to_fp8(_expert_matrix(2 * inter, hidden, gen, device))
        w2[e], s2[e] = per_block_cast_to_fp8(_expert_matrix(hidden, inter, gen, device))
    return MoEWeights(w1, s1, w2, s2)


def make_inputs(num_tokens: int, hidden: int, num_experts: int, num_topk: int, seed: int, device,
                drop_fraction: float = 0.0, magnitude: float = 1.0) -> tuple:
    """(x BF16 [T, H], x_fp8 [T, H], x_sf f32 [T, H/128], topk_idx int64 [T, K], topk_weights f32 [T, K]).

    Token magnitudes log-normal around ``magnitude``; ``num_topk`` distinct experts per token chosen
    uniformly; a ``drop_fraction`` of the slots dropped, alternately as -1 and as an id in
    ``[E, E + 1000)``; positive weights of varied size. Generated on the CPU from ``seed`` (the same
    on every machine), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(num_tokens, 1, generator=gen) * TOKEN_MAGNITUDE_SIGMA) * magnitude
    x = (torch.randn(num_tokens, hidden, generator=gen) * scale).to(torch.bfloat16)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, dim=1).indices
    dropped = torch.rand(num_tokens, num_topk, generator=gen) < drop_fraction
    out_of_range = num_experts + torch.randint(0, OUT_OF_RANGE_SPAN, idx.shape, generator=gen)
    alternate = torch.arange(idx.numel()).view(idx.shape) % 2 == 0
    idx = torch.where(dropped, torch.where(alternate, torch.full_like(idx, -1), out_of_range), idx)
    weights = torch.rand(num_tokens, num_topk, generator=gen) * 2 + 0.05
    x = x.to(device)
    x_fp8, x_sf = per_token_cast_to_fp8(x)
    return x, x_fp8, x_sf.contiguous(), idx.to(device), weights.to(device)


# ---- the FP32 reference -------------------------------------------------------------------------

def swiglu(h: torch.Tensor, activation_clamp: float | None) -> torch.Tensor:
    """FP32 ``silu(min(g, c)) * clamp(u, -c, c)`` of h [M, 2I] = [gate | up] (no clamp: silu(g) * u)."""
    gate, up = h.float().chunk(2, dim=1)
    if activation_clamp is not None:
        gate = gate.clamp(max=activation_clamp)
        up = up.clamp(-activation_clamp, activation_clamp)
    return F.silu(gate) * up


def reference_moe(x_fp8: torch.Tensor, x_sf: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  weights: MoEWeights, activation_clamp: float | None = None,
                  quantize_intermediate: bool = False) -> torch.Tensor:
    """FP32 [T, H]: ``y[t] = sum over valid k of w[t,k] * W2[e] . act(W1[e] . x[t])`` on the dequantized
    FP8 inputs and FP8 / MXFP4 weights, over all experts (ids outside [0, E) are dropped; such tokens get 0).
    ``quantize_intermediate``: act re-quantized 1 x 128 (``per_token_cast_to_fp8``) before W2, as the
    kernel does. Loops over the experts in use (synchronizes the host: tests and checks only)."""
    x = per_token_dequant(x_fp8, x_sf)
    out = torch.zeros(x.shape[0], weights.hidden, dtype=torch.float32, device=x.device)
    idx = topk_idx.long()
    used = idx[(idx >= 0) & (idx < weights.num_experts)].unique().tolist()
    for e in used:
        tok, slot = (idx == e).nonzero(as_tuple=True)
        w1, w2 = weights.dequantized(e)
        act = swiglu(x[tok] @ w1.T, activation_clamp)
        if quantize_intermediate:
            act = per_token_dequant(*per_token_cast_to_fp8(act))
        out.index_add_(0, tok, (act @ w2.T) * topk_weights[tok, slot].float()[:, None])
    return out


# ---- shared GPU pieces of the baselines ---------------------------------------------------------

def _swiglu_fp8(h: torch.Tensor, activation_clamp: float | None) -> tuple:
    """GEMM-2's A operand from GEMM-1's output: SwiGLU (+ clamp) in FP32, re-quantized 1 x 128."""
    return per_token_cast_to_fp8(swiglu(h, activation_clamp))


def _grouped_gemms(local_weights: tuple) -> tuple:
    """(contiguous, masked) grouped GEMM ops of the weights' format: FP8, or FP8 x FP4 (int8 codes)."""
    if local_weights[0][0].dtype == torch.int8:
        return m_grouped_fp8_fp4_gemm_nt_contiguous, m_grouped_fp8_fp4_gemm_nt_masked
    return m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked


def _expert_layers(a: tuple, psum: torch.Tensor, local_weights: tuple, h: torch.Tensor, y: torch.Tensor,
                   activation_clamp: float | None) -> None:
    """y [M, H] BF16 = GEMM-2(SwiGLU-FP8(GEMM-1(a))) over the psum segments of ``psum``; rows outside
    every segment are left as they were (never read by the callers)."""
    (w1, s1), (w2, s2) = local_weights
    contiguous, _ = _grouped_gemms(local_weights)
    contiguous(a, (w1, s1), h, psum, use_psum_layout=True)
    contiguous(_swiglu_fp8(h, activation_clamp), (w2, s2), y, psum, use_psum_layout=True)


# ---- the unfused pipeline on our EP dispatch / combine ------------------------------------------

def unfused_layout(num_max_tokens_per_rank: int) -> str:
    """The unfused pipeline's receive layout for an EPBuffer sized for this many tokens per rank:
    masked (each expert's rows at the head of its ``R * Tm`` slots, no 128-row padding: what a decode
    engine uses) up to MASKED_MAX_TOKENS, psum (segments aligned to 128 rows) above."""
    return "masked" if num_max_tokens_per_rank <= MASKED_MAX_TOKENS else "psum"


def make_ep_buffer(group, num_experts: int, num_tokens: int, hidden: int, num_topk: int, timeout_s: float):
    """The unfused pipeline's FP8 EPBuffer sized for exactly ``num_tokens`` tokens per rank (as an
    engine sizes it for its batch: every buffer and GEMM row count follows from it). Collective."""
    from cute_moe.ep import EPBuffer
    return EPBuffer(group, num_experts, num_tokens, hidden, num_topk, "fp8", alignment=PSUM_ALIGNMENT,
                    timeout_s=timeout_s)


def unfused_dispatch(ep_buffer, x_fp8: torch.Tensor, x_sf: torch.Tensor, topk_idx: torch.Tensor,
                     topk_weights: torch.Tensor):
    """The unfused pipeline's dispatch (layout by ``unfused_layout`` of the buffer's token count)."""
    layout = unfused_layout(ep_buffer.geom.max_tokens)
    return ep_buffer.dispatch((x_fp8, x_sf), topk_idx, topk_weights, layout=layout)


def unfused_expert_output(ep_buffer) -> torch.Tensor:
    """A zero BF16 expert output in the layout of ``unfused_dispatch`` (for timing the communication alone)."""
    g = ep_buffer.geom
    shape = ((g.local_experts, g.max_m, g.hidden) if unfused_layout(g.max_tokens) == "masked"
             else (g.psum_rows, g.hidden))
    return torch.zeros(shape, dtype=torch.bfloat16, device=ep_buffer.device)


def unfused_mega_moe(ep_buffer, x_fp8: torch.Tensor, x_sf: torch.Tensor, topk_idx: torch.Tensor,
                     topk_weights: torch.Tensor, local_weights: tuple, activation_clamp: float | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """y BF16 [T, H] of this rank's tokens through our unfused pipeline. ``ep_buffer``: from
    ``make_ep_buffer`` (FP8, alignment 128) of the same group and shape; ``local_weights``:
    ``MoEWeights.local(rank, world)`` (untransformed). Masked layout: masked grouped GEMMs with
    ``expected_m`` = the mean rows per expert; psum: contiguous grouped GEMMs over the psum segments.
    Collective, sync-free, capturable."""
    d = unfused_dispatch(ep_buffer, x_fp8, x_sf, topk_idx, topk_weights)
    (w1, s1), (w2, s2) = local_weights
    inter = w1.shape[1] // 2
    _, masked = _grouped_gemms(local_weights)
    g = ep_buffer.geom
    if d.masked_m is not None:
        experts, max_m, hidden = d.x.shape
        expected_m = max(1, -(-g.num_ranks * g.max_tokens * g.num_topk // g.num_experts))
        h = torch.empty(experts, max_m, 2 * inter, dtype=torch.bfloat16, device=d.x.device)
        y = torch.empty(experts, max_m, hidden, dtype=torch.bfloat16, device=d.x.device)
        masked((d.x, d.scales), (w1, s1), h, d.masked_m, expected_m)
        a, sf = _swiglu_fp8(h.view(-1, 2 * inter), activation_clamp)
        masked((a.view(experts, max_m, inter), sf.view(experts, max_m, -1)), (w2, s2), y, d.masked_m, expected_m)
    else:
        rows, hidden = d.x.shape
        h = torch.empty(rows, 2 * inter, dtype=torch.bfloat16, device=d.x.device)
        y = torch.empty(rows, hidden, dtype=torch.bfloat16, device=d.x.device)
        _expert_layers((d.x, d.scales), d.psum, local_weights, h, y, activation_clamp)
    return ep_buffer.combine(y, d.handle, out=out)


# ---- the NCCL baseline --------------------------------------------------------------------------

class NcclMoEState:
    """Fixed-size buffers of the NCCL pipeline for one shape (built once, reused by every call).

    Every rank sends each of its ``capacity`` token slots (the first T real, the rest marked empty)
    to every rank as one byte row ``[x (H bytes) | x_sf (H/128 f32) | local expert ids (K i32, -1 =
    not on that rank) | routing weights (K f32)]``; receivers lay the (source, token, slot) entries of
    their experts out in a psum pool (one extra dump row for the other entries), run the expert
    GEMMs, send back one BF16 partial sum per (source, token), and each source sums its ranks'
    partials in FP32."""

    def __init__(self, group, num_experts: int, capacity: int, num_topk: int, hidden: int, inter: int, device):
        import torch.distributed as dist
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.world != 0:
            raise ValueError(f"num_experts: expected a multiple of the group size {self.world}, got {num_experts}")
        self.num_experts, self.capacity, self.num_topk = num_experts, capacity, num_topk
        self.hidden, self.inter = hidden, inter
        self.local_experts = num_experts // self.world
        r, c, k, kb = self.world, capacity, num_topk, hidden // SCALE_BLOCK
        sf_end = hidden + 4 * kb
        self.field = {"x": (0, hidden), "sf": (hidden, sf_end), "idx": (sf_end, sf_end + 4 * k),
                      "w": (sf_end + 4 * k, sf_end + 8 * k)}
        self.row_bytes = self.field["w"][1]
        self.send = torch.zeros(r, c, self.row_bytes, dtype=torch.uint8, device=device)
        self.recv = torch.zeros_like(self.send)
        entries = r * c * min(k, self.local_experts)
        self.pool_rows = -(-(entries + self.local_experts * (PSUM_ALIGNMENT - 1)) // PSUM_ALIGNMENT) * PSUM_ALIGNMENT
        rows = self.pool_rows + 1  # + the dump row of entries that are not on this rank
        self.pool = torch.zeros(rows, hidden, dtype=FP8, device=device)
        pitch = -(-rows // SCALE_PITCH_ALIGN) * SCALE_PITCH_ALIGN
        self.pool_sf = torch.zeros(kb, pitch, dtype=torch.float32, device=device).t()[:rows]  # MN-major
        self.h = torch.zeros(self.pool_rows, 2 * inter, dtype=torch.bfloat16, device=device)
        self.y = torch.zeros(rows, hidden, dtype=torch.bfloat16, device=device)  # dump row stays 0
        self.partial = torch.empty(r, c, hidden, dtype=torch.bfloat16, device=device)
        self.back = torch.empty_like(self.partial)
        self.expert_base = (torch.arange(r, device=device) * self.local_experts).view(r, 1, 1)

    def part(self, t: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Field ``name`` of byte rows ``t`` [..., row_bytes] viewed as ``dtype``."""
        lo, hi = self.field[name]
        return t[..., lo:hi].view(dtype)


def make_nccl_state(group, num_experts: int, capacity: int, num_topk: int, hidden: int, inter: int,
                    device) -> NcclMoEState:
    """The NCCL baseline's buffers for up to ``capacity`` tokens per rank (collective shape, local memory)."""
    return NcclMoEState(group, num_experts, capacity, num_topk, hidden, inter, device)


def _pack_rows(state: NcclMoEState, x_fp8, x_sf, topk_idx, topk_weights) -> None:
    """Every destination's copy of this rank's rows; slots ``[T, capacity)`` carry no expert."""
    s, t, L = state.send, x_fp8.shape[0], state.local_experts
    idx = topk_idx.long().unsqueeze(0) - state.expert_base  # [R, T, K]: local id on each destination
    on_rank = (idx >= 0) & (idx < L)
    state.part(s, "idx", torch.int32).fill_(-1)
    state.part(s[:, :t], "x", torch.uint8).copy_(x_fp8.view(torch.uint8).expand(state.world, -1, -1))
    state.part(s[:, :t], "sf", torch.float32).copy_(x_sf.expand(state.world, -1, -1))
    state.part(s[:, :t], "idx", torch.int32).copy_(torch.where(on_rank, idx, -1))
    state.part(s[:, :t], "w", torch.float32).copy_(torch.where(on_rank, topk_weights.unsqueeze(0), 0.0))


def _psum_layout(state: NcclMoEState, ids: torch.Tensor) -> tuple:
    """(pool row of each received entry [N] (the dump row ``pool_rows`` if none), psum int32 [L]) of
    the flat local expert ids ``ids`` [N] (-1 = not on this rank), on the device."""
    L, n = state.local_experts, ids.numel()
    keys = torch.where(ids >= 0, ids.long(), L)
    counts = torch.zeros(L + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, keys, torch.ones_like(keys))
    aligned = (counts + PSUM_ALIGNMENT - 1) // PSUM_ALIGNMENT * PSUM_ALIGNMENT
    start = aligned.cumsum(0) - aligned  # aligned start of each segment
    first = counts.cumsum(0) - counts  # each key's first position in the sorted order
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    row = start[sorted_keys] + torch.arange(n, device=ids.device) - first[sorted_keys]
    row = torch.where(sorted_keys < L, row, state.pool_rows)
    entry_row = torch.empty_like(row)
    entry_row[order] = row
    return entry_row, (start + counts)[:L].to(torch.int32)


def nccl_mega_moe(state: NcclMoEState, x_fp8: torch.Tensor, x_sf: torch.Tensor, topk_idx: torch.Tensor,
                  topk_weights: torch.Tensor, local_weights: tuple, activation_clamp: float | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y BF16 [T, H] of this rank's T <= capacity tokens through the NCCL pipeline (see NcclMoEState).
    Collective, sync-free, capturable."""
    import torch.distributed as dist
    t = x_fp8.shape[0]
    if t > state.capacity:
        raise ValueError(f"x_fp8: expected at most capacity={state.capacity} tokens, got {t}")
    _pack_rows(state, x_fp8, x_sf, topk_idx, topk_weights)
    dist.all_to_all_single(state.recv, state.send, group=state.group)
    recv = state.recv.view(-1, state.row_bytes)  # [R * capacity] rows, source-major
    k = state.num_topk
    entry_row, psum = _psum_layout(state, state.part(recv, "idx", torch.int32).reshape(-1))
    token = torch.arange(entry_row.numel(), device=recv.device) // k
    state.pool.view(torch.uint8).index_copy_(0, entry_row, state.part(recv, "x", torch.uint8)[token])
    state.pool_sf.index_copy_(0, entry_row, state.part(recv, "sf", torch.float32)[token])
    rows = state.pool_rows
    _expert_layers((state.pool[:rows], state.pool_sf[:rows]), psum, local_weights, state.h, state.y[:rows],
                   activation_clamp)
    weights = state.part(recv, "w", torch.float32)  # [R * capacity, K], 0 where not on this rank
    entry_row = entry_row.view(-1, k)
    partial = torch.zeros(recv.shape[0], state.hidden, dtype=torch.float32, device=recv.device)
    for slot in range(k):
        partial += weights[:, slot:slot + 1] * state.y[entry_row[:, slot]].float()
    state.partial.view(-1, state.hidden).copy_(partial)
    dist.all_to_all_single(state.back, state.partial, group=state.group)
    if out is None:
        out = torch.empty(t, state.hidden, dtype=torch.bfloat16, device=x_fp8.device)
    out.copy_(state.back[:, :t].float().sum(0))
    return out


__all__ = ["MoEWeights", "make_layer", "make_inputs", "swiglu", "reference_moe", "unfused_layout", "make_ep_buffer",
           "unfused_dispatch", "unfused_expert_output", "unfused_mega_moe",
           "NcclMoEState", "make_nccl_state", "nccl_mega_moe"]
