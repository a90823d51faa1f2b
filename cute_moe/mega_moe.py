"""Mega MoE: a whole expert-parallel MoE layer as one persistent kernel per GPU (docs/mega_moe.md).

    buf = cute_moe.get_symm_buffer_for_mega_moe(group, num_experts=256, num_max_tokens_per_rank=8192,
                                                 num_topk=6, hidden=4096, intermediate_hidden=2048)
    l1, l2 = cute_moe.transform_weights_for_mega_moe((w1, s1), (w2, s2))    # once, at load time
    buf.x[:T].copy_(x_fp8); buf.x_sf[:T].copy_(x_sf)                        # the caller fills the views
    buf.topk_idx[:T].copy_(topk_idx); buf.topk_weights[:T].copy_(topk_weights)
    y = torch.empty(T, 4096, dtype=torch.bfloat16, device="cuda")
    cute_moe.fp8_mega_moe(y, l1, l2, buf)

computes, for every token t of this rank, ``y[t] = sum over valid slots k of w[t,k] * W2[e] .
act(W1[e] . x[t])`` with ``e = topk_idx[t,k]`` (an id outside [0, num_experts) is a dropped slot),
``act(g, u) = silu(min(g, c)) * clamp(u, -c, c)`` (``c`` = ``activation_clamp``; no clamp:
``silu(g) * u``). FP8: x with one FP32 scale per token per 128 channels, weights with one per
128 x 128 block, the SwiGLU output re-quantized the same way before GEMM-2 (DeepGEMM's SM90 recipe).

The call is collective (every rank, any token count, even 0) and CUDA-graph capturable with
routing and data that change between replays; a peer that does not arrive within ``timeout_s``
stops the kernel and the next call, ``buf.check()`` or ``cute_moe.ep.synchronize()`` raises.
"""

import math
from functools import lru_cache

import torch

from .fp4_ops import MX_BLOCK, PACKED_DTYPES as FP4_PACKED_DTYPES
from .ep import DEFAULT_TIMEOUT_S, FP8, SymmetricGroupBuffer, _agreed_sm_count, check_group_sizes
from .mega_moe_layout import (BLOCK_M, ENTRY_POSITION_BITS, MIN_BLOCK_M, MAX_LOCAL_EXPERTS, MAX_TOPK, MMA_TYPES,
                              ROW_EXPONENT_ROWS,
                              SCALE_BLOCK, TILE_N, MegaMoEGeometry)
from .validation import check_contiguous, check_shape, check_tensor

ACTIVATIONS = ("swiglu",)
VECTOR_BYTES = 16


def check_mega_moe_args(world_size: int, num_experts: int, num_max_tokens_per_rank: int, num_topk: int, hidden: int,
                        intermediate_hidden: int, mma_type: str, activation: str) -> str:
    """ValueError/TypeError naming the argument for a buffer that cannot be built; returns the
    normalized ``mma_type`` ('fp8', 'bf16' or 'fp8xfp4')."""
    check_group_sizes(world_size, num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank, num_topk=num_topk,
                      hidden=hidden, intermediate_hidden=intermediate_hidden)
    if num_experts // world_size > MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts: expected at most {MAX_LOCAL_EXPERTS} experts per rank, "
                         f"got {num_experts // world_size}")
    if hidden % TILE_N != 0:
        raise ValueError(f"hidden: expected a multiple of {TILE_N}, got {hidden}")
    if intermediate_hidden % SCALE_BLOCK != 0:
        raise ValueError(f"intermediate_hidden: expected a multiple of {SCALE_BLOCK}, got {intermediate_hidden}")
    if num_topk > MAX_TOPK:
        raise ValueError(f"num_topk: expected at most {MAX_TOPK}, got {num_topk}")
    if world_size * num_max_tokens_per_rank >= 1 << ENTRY_POSITION_BITS:
        raise ValueError(f"num_max_tokens_per_rank: expected group size x tokens below {1 << ENTRY_POSITION_BITS}, "
                         f"got {world_size} x {num_max_tokens_per_rank}")
    if not isinstance(mma_type, str) or mma_type not in MMA_TYPES:
        raise ValueError(f"mma_type: expected one of {sorted(MMA_TYPES)}, got {mma_type!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return MMA_TYPES[mma_type]


class MegaMoEBuffer(SymmetricGroupBuffer):
    """Symmetric inputs and combine rows, local pool / intermediate / tables of one Mega MoE group.

    ``mma_type``: 'fp8' (FP8 activations and weights), 'fp8xfp4' (FP8 activations, MXFP4 weights) or
    'bf16'. ``x``, ``x_sf`` (FP8 activations only, else None), ``topk_idx`` (int64), ``topk_weights`` (float32): the
    input views, ``[num_max_tokens_per_rank, ...]``; a call with ``T`` tokens reads their first ``T``
    rows. Construction is collective."""

    def __init__(self, group, num_experts: int, num_max_tokens_per_rank: int, num_topk: int, hidden: int,
                 intermediate_hidden: int, mma_type: str = "fp8", activation: str = "swiglu", *,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(group, timeout_s)
        kind = check_mega_moe_args(self.world, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                   intermediate_hidden, mma_type, activation)
        self.mma_type = kind
        g = self.geom = MegaMoEGeometry(self.world, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                        intermediate_hidden, kind != "bf16", _agreed_sm_count(group, self.device),
                                        fp4=kind == "fp8xfp4")
        off = g.symmetric_offsets()
        self.allocate_symmetric(off["total"])
        act = FP8 if g.fp8 else torch.bfloat16
        tm, k = g.max_tokens, g.num_topk
        self.x = self._view(off["x"], act, (tm, hidden))
        self.x_sf = self._view(off["x_sf"], torch.float32, (tm, g.hidden_blocks)) if g.fp8 else None
        self.topk_idx = self._view(off["topk_idx"], torch.int64, (tm, k))
        self.topk_weights = self._view(off["topk_weights"], torch.float32, (tm, k))
        dev = self.device
        self.pool = torch.empty(g.pool_rows, hidden, dtype=act, device=dev)
        self.inter = torch.empty(g.pool_rows, intermediate_hidden, dtype=act, device=dev)
        self.pool_sf = self._mn_major_scales(g.hidden_blocks) if g.fp8 else None
        self.inter_sf = self._mn_major_scales(g.inter_blocks) if g.fp8 else None
        self.work = torch.zeros(g.work_offsets()["total"] // 4, dtype=torch.int32, device=dev)
        self.calls = torch.zeros(g.num_ctas, dtype=torch.int32, device=dev)
        self.finish_setup()

    def _view(self, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        count = math.prod(shape)
        return self.symm[offset:offset + count * dtype.itemsize].view(dtype).view(shape)

    def _mn_major_scales(self, blocks: int) -> torch.Tensor:
        """FP32 ``[pool_rows, blocks]`` with the row mode contiguous (what the GEMMs' TMA loads read)."""
        g = self.geom
        storage = torch.zeros(blocks * g.scale_pitch, dtype=torch.float32, device=self.device)
        return storage.as_strided((g.pool_rows, blocks), (1, g.scale_pitch))


def get_symm_buffer_for_mega_moe(group, num_experts: int, num_max_tokens_per_rank: int, num_topk: int, hidden: int,
                                 intermediate_hidden: int, mma_type: str = "fp8", activation: str = "swiglu", *,
                                 timeout_s: float = DEFAULT_TIMEOUT_S) -> MegaMoEBuffer:
    """The buffer of one Mega MoE layer shape on ``group`` (collective; see ``MegaMoEBuffer``)."""
    return MegaMoEBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden,
                         mma_type, activation, timeout_s=timeout_s)


def _interleave_gate_up(t: torch.Tensor, name: str) -> torch.Tensor:
    """Rows (dim 1) ``[gate 0..I) | up 0..I)`` in blocks of ``block`` rows -> ``[gate 0, up 0, gate 1, ...]``."""
    experts, rows = t.shape[0], t.shape[1]
    if rows % 2 != 0:
        raise ValueError(f"{name}: expected an even number of rows (gate then up), got shape {tuple(t.shape)}")
    blocks = rows // 2
    return t.reshape(experts, 2, blocks, *t.shape[2:]).transpose(1, 2).reshape(t.shape).contiguous()


def transform_weights_for_mega_moe(l1_weights, l2_weights):
    """The weights as the kernel reads them: GEMM-1's gate and up rows interleaved in blocks of 128
    rows (``[gate 0, up 0, gate 1, up 1, ...]``, scales alike), GEMM-2's unchanged (contiguous copies).

    FP8: ``l1_weights = (w1 [L, 2I, H] float8_e4m3fn, s1 [L, 2I/128, H/128] float32)`` (gate rows
    ``[0, I)``, up rows ``[I, 2I)``), ``l2_weights = (w2 [L, H, I], s2 [L, H/128, I/128])``.
    MXFP4 (for ``fp8_fp4_mega_moe``): ``l1_weights = (w1 [L, 2I, H/2] int8 or uint8, two E2M1 codes per
    byte as ``per_token_cast_to_fp4`` packs them, sf1 [L, 2I, H/32] uint8 UE8M0)``, ``l2_weights =
    (w2 [L, H, I/2], sf2 [L, H, I/32])``; returns int8 codes and the exponents as int32 words, four
    per word, K-block-major so that a k-block's words of consecutive rows are contiguous, followed by
    one row of each weight row's largest exponent over K (byte 0): [L, H/128 + 1, 2I], [L, I/128 + 1, H];
    byte j of a word: 32-block j of its 128-K block. Row-major words ``[L, N, K/128]`` (DeepGEMM's
    packed UE8M0) are accepted as input too.
    BF16: plain ``[L, 2I, H]`` and ``[L, H, I]`` tensors. Returns the same structure."""
    if isinstance(l1_weights, tuple) != isinstance(l2_weights, tuple):
        raise TypeError("l1_weights, l2_weights: expected both (weights, scales) tuples (FP8, MXFP4) or both "
                        "tensors (BF16)")
    if isinstance(l1_weights, tuple) and _is_mxfp4(l1_weights):
        (w1, e1), (w2, e2) = _check_fp4_weights(l1_weights, l2_weights, "input")
        e1 = _interleave_rows(e1, "l1_scales")
        return ((_interleave_rows(w1.view(torch.int8), "l1_weights"), _kernel_words(e1)),
                (w2.view(torch.int8).contiguous(), _kernel_words(e2)))
    if isinstance(l1_weights, tuple):
        (w1, s1), (w2, s2) = _check_fp8_weights(l1_weights, l2_weights)
        w1t = _interleave_rows(w1.view(torch.uint8), "l1_weights").view(FP8)
        return (w1t, _interleave_gate_up(s1, "l1_scales")), (w2.contiguous(), s2.contiguous())
    w1, w2 = _check_bf16_weights(l1_weights, l2_weights)
    return _interleave_rows(w1, "l1_weights"), w2.contiguous()


def _interleave_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``_interleave_gate_up`` of the rows of ``t`` [L, 2I, ...] in blocks of 128 rows."""
    blocks = t.reshape(t.shape[0], t.shape[1] // SCALE_BLOCK, SCALE_BLOCK, *t.shape[2:])
    return _interleave_gate_up(blocks, name).reshape(t.shape)


def _is_mxfp4(pair: tuple) -> bool:
    """A (weights, scales) pair of packed E2M1 codes (int8 / uint8), not FP8."""
    return len(pair) == 2 and isinstance(pair[0], torch.Tensor) and pair[0].dtype in FP4_PACKED_DTYPES


def _exponent_words(name: str, sf: torch.Tensor, experts: int, rows: int, k: int) -> torch.Tensor:
    """UE8M0 exponents ``[L, rows, K/32]`` uint8 (or already packed int32 words ``[L, rows, K/128]``) as
    int32 words ``[L, rows, K/128]``, four exponents per word."""
    if isinstance(sf, torch.Tensor) and sf.dtype == torch.int32:
        check_tensor(name, sf, (torch.int32,), 3)
        check_shape(name, sf, (experts, rows, k // SCALE_BLOCK))
        return sf
    if isinstance(sf, torch.Tensor) and sf.dtype == torch.float32:
        raise TypeError(f"{name}: expected uint8 UE8M0 exponents [L, N, K/32] or int32 words [L, N, K/128], got "
                        f"float32; convert power-of-two scales with cute_moe.float_to_ue8m0")
    check_tensor(name, sf, (torch.uint8,), 3)
    check_shape(name, sf, (experts, rows, k // MX_BLOCK))
    return sf.contiguous().view(torch.int32)


def _kernel_words(words: torch.Tensor) -> torch.Tensor:
    """Row-major exponent words ``[L, N, K/128]`` as the kernel reads them, ``[L, K/128 + 1, N]``: K-block-major,
    then each row's largest exponent over K (byte 0 of the last row's word)."""
    row_max = words.contiguous().view(torch.uint8).amax(dim=2).to(torch.int32)
    return torch.cat([words.transpose(1, 2), row_max.unsqueeze(1)], dim=1).contiguous()


def _check_fp4_weights(l1_weights, l2_weights, stage: str) -> tuple:
    """((w1, e1), (w2, e2)) of MXFP4 weights, exponents as int32 words; ``stage`` 'input': uint8
    exponents or row-major words ([L, N, K/128]), 'kernel': the K-block-major words and the row
    exponents ([L, K/128 + 1, N]) ``transform_weights_for_mega_moe`` returns."""
    for name, pair in (("l1_weights", l1_weights), ("l2_weights", l2_weights)):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"{name}: expected a (packed weights, exponents) tuple for MXFP4")
    (w1, s1), (w2, s2) = l1_weights, l2_weights
    check_tensor("l1_weights", w1, FP4_PACKED_DTYPES, 3)
    check_tensor("l2_weights", w2, FP4_PACKED_DTYPES, 3)
    experts, two_i, half_h = w1.shape
    if two_i % (2 * SCALE_BLOCK) != 0:
        raise ValueError(f"l1_weights: expected 2 x intermediate rows, a multiple of {2 * SCALE_BLOCK}, "
                         f"got shape {tuple(w1.shape)}")
    hidden, inter = 2 * half_h, two_i // 2
    if hidden % SCALE_BLOCK != 0:
        raise ValueError(f"l1_weights: expected hidden = 2 x packed columns a multiple of {SCALE_BLOCK}, "
                         f"got shape {tuple(w1.shape)}")
    check_shape("l2_weights", w2, (experts, hidden, inter // 2))
    if stage == "kernel":  # K-block-major words
        for name, words, rows, k in (("l1_scales", s1, two_i, hidden), ("l2_scales", s2, hidden, inter)):
            check_tensor(name, words, (torch.int32,), 3)
            check_shape(name, words, (experts, k // SCALE_BLOCK + ROW_EXPONENT_ROWS, rows))
        return (w1, s1), (w2, s2)
    return ((w1, _exponent_words("l1_scales", s1, experts, two_i, hidden)),
            (w2, _exponent_words("l2_scales", s2, experts, hidden, inter)))


def _weight_dims(w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """(L, H, I) of GEMM-1 ``[L, 2I, H]`` and GEMM-2 ``[L, H, I]`` weights, checked against each other."""
    experts, two_i, hidden = w1.shape
    if two_i % (2 * SCALE_BLOCK) != 0:
        raise ValueError(f"l1_weights: expected 2 x intermediate rows, a multiple of {2 * SCALE_BLOCK}, "
                         f"got shape {tuple(w1.shape)}")
    check_shape("l2_weights", w2, (experts, hidden, two_i // 2))
    return experts, hidden, two_i // 2


def _check_fp8_weights(l1_weights, l2_weights) -> tuple:
    for name, pair in (("l1_weights", l1_weights), ("l2_weights", l2_weights)):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"{name}: expected a (weights, scales) tuple for FP8")
    (w1, s1), (w2, s2) = l1_weights, l2_weights
    check_tensor("l1_weights", w1, (FP8,), 3)
    check_tensor("l2_weights", w2, (FP8,), 3)
    experts, hidden, inter = _weight_dims(w1, w2)
    check_tensor("l1_scales", s1, (torch.float32,), 3)
    check_shape("l1_scales", s1, (experts, 2 * inter // SCALE_BLOCK, -(-hidden // SCALE_BLOCK)))
    check_tensor("l2_scales", s2, (torch.float32,), 3)
    check_shape("l2_scales", s2, (experts, -(-hidden // SCALE_BLOCK), inter // SCALE_BLOCK))
    return (w1, s1), (w2, s2)


def _check_bf16_weights(l1_weights, l2_weights) -> tuple:
    check_tensor("l1_weights", l1_weights, (torch.bfloat16,), 3)
    check_tensor("l2_weights", l2_weights, (torch.bfloat16,), 3)
    _weight_dims(l1_weights, l2_weights)
    return l1_weights, l2_weights


@lru_cache(maxsize=None)
def _kernel_fn(geom: MegaMoEGeometry, clamp: bool, block_m: int):
    from cute_moe.kernels.mega_moe_signature import compile_mega_moe
    return compile_mega_moe(geom, clamp, block_m)


def block_height(geom: MegaMoEGeometry, num_tokens: int) -> int:
    """Tile height (and expert segment alignment) of a call with ``num_tokens`` tokens on this rank:
    64 when the experts receive at most 64 rows on average (assuming every rank sends about as many
    tokens), halving the padded rows the GEMMs compute; 128 otherwise (fewer, fuller tiles). Each rank
    chooses for itself: the ranks' kernels share nothing that depends on it."""
    rows_per_expert = num_tokens * geom.num_ranks * geom.num_topk / geom.num_experts
    return MIN_BLOCK_M if rows_per_expert <= MIN_BLOCK_M else BLOCK_M


def _check_call(y: torch.Tensor, buffer: MegaMoEBuffer, stats, activation_clamp, mma_type: str) -> None:
    if not isinstance(buffer, MegaMoEBuffer):
        raise TypeError(f"buffer: expected a MegaMoEBuffer, got {type(buffer).__name__}")
    if buffer.mma_type != mma_type:
        raise ValueError(f"buffer: expected a buffer built with mma_type={mma_type!r}, got {buffer.mma_type!r}")
    buffer.check()
    g = buffer.geom
    check_tensor("y", y, (torch.bfloat16,), 2)
    if y.shape[0] > g.max_tokens:
        raise ValueError(f"y: expected at most num_max_tokens_per_rank={g.max_tokens} tokens, got {y.shape[0]}")
    check_shape("y", y, (y.shape[0], g.hidden))
    check_contiguous("y", y)
    tensors = {"y": y}
    if stats is not None:
        check_tensor("cumulative_local_expert_recv_stats", stats, (torch.int32,), 1)
        check_shape("cumulative_local_expert_recv_stats", stats, (g.local_experts,))
        tensors["cumulative_local_expert_recv_stats"] = stats
    for name, t in tensors.items():
        if t.device != buffer.device:
            raise ValueError(f"{name}: expected a tensor on {buffer.device}, got {t.device}")
    if y.data_ptr() % VECTOR_BYTES != 0:
        raise ValueError(f"y: expected a {VECTOR_BYTES}-byte aligned data pointer, got {y.data_ptr():#x}")
    if activation_clamp is not None:
        if not isinstance(activation_clamp, (int, float)) or isinstance(activation_clamp, bool):
            raise TypeError(f"activation_clamp: expected None or a number, got {type(activation_clamp).__name__}")
        if not (math.isfinite(activation_clamp) and activation_clamp > 0):
            raise ValueError(f"activation_clamp: expected a positive finite number, got {activation_clamp!r}")


def _check_weights_for(buffer: MegaMoEBuffer, tensors: dict) -> None:
    """The weight tensors (name -> tensor, in the kernel's layout) fit ``buffer``: shapes (MXFP4: K
    packed in halves), contiguity, device."""
    g = buffer.geom
    packing = 2 if g.fp4 else 1
    shapes = {"l1_weights": (g.local_experts, 2 * g.intermediate, g.hidden // packing),
              "l2_weights": (g.local_experts, g.hidden, g.intermediate // packing)}
    for name, t in tensors.items():
        if name in shapes:
            check_shape(name, t, shapes[name])
        check_contiguous(name, t)
        if t.device != buffer.device:
            raise ValueError(f"{name}: expected a tensor on {buffer.device}, got {t.device}")


def _launch(y: torch.Tensor, w1, s1, w2, s2, buffer: MegaMoEBuffer, stats, activation_clamp) -> None:
    g = buffer.geom
    fn = _kernel_fn(g, activation_clamp is not None, block_height(g, y.shape[0]))
    as_bytes = (lambda t: t.view(torch.uint8)) if g.fp8 else (lambda t: t)  # noqa: E731
    # FP8 x FP4: s1 / s2 are the int32 exponent words, passed as they are.
    scales = (s1, buffer.pool_sf, s2, buffer.inter_sf) if g.fp8 else (None, None, None, None)
    fn(as_bytes(buffer.pool), scales[1], as_bytes(w1), scales[0], as_bytes(buffer.inter), scales[3], as_bytes(w2),
       scales[2], buffer.calls, y.data_ptr(), y.shape[0], buffer.peers.data_ptr(), buffer.rank,
       buffer.work.data_ptr(), buffer.error.data_ptr(), 0 if stats is None else stats.data_ptr(),
       float(activation_clamp or 0.0), int(buffer.timeout_s * 1e9))


def fp8_mega_moe(y: torch.Tensor, l1_weights, l2_weights, buffer: MegaMoEBuffer,
                 cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                 activation_clamp: float | None = None) -> None:
    """The MoE layer of this rank's ``y.shape[0]`` tokens (inputs in ``buffer``'s views) into ``y``
    (BF16 ``[T, hidden]``). ``l1_weights`` / ``l2_weights``: ``transform_weights_for_mega_moe``'s
    FP8 output for this rank's ``num_experts / world`` experts. Stats (int32 ``[local experts]``):
    ``+=`` rows received per local expert. Collective."""
    _check_call(y, buffer, cumulative_local_expert_recv_stats, activation_clamp, "fp8")
    (w1, s1), (w2, s2) = _check_fp8_weights(l1_weights, l2_weights)
    _check_weights_for(buffer, {"l1_weights": w1, "l2_weights": w2, "l1_scales": s1, "l2_scales": s2})
    _launch(y, w1, s1, w2, s2, buffer, cumulative_local_expert_recv_stats, activation_clamp)


def bf16_mega_moe(y: torch.Tensor, l1_weights: torch.Tensor, l2_weights: torch.Tensor, buffer: MegaMoEBuffer,
                  cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                  activation_clamp: float | None = None) -> None:
    """``fp8_mega_moe`` with BF16 activations and weights (a buffer built with ``mma_type='bf16'``);
    the SwiGLU output stays BF16."""
    _check_call(y, buffer, cumulative_local_expert_recv_stats, activation_clamp, "bf16")
    w1, w2 = _check_bf16_weights(l1_weights, l2_weights)
    _check_weights_for(buffer, {"l1_weights": w1, "l2_weights": w2})
    _launch(y, w1, None, w2, None, buffer, cumulative_local_expert_recv_stats, activation_clamp)


def fp8_fp4_mega_moe(y: torch.Tensor, l1_weights: tuple, l2_weights: tuple, buffer: MegaMoEBuffer,
                     cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                     activation_clamp: float | None = None) -> None:
    """``fp8_mega_moe`` with MXFP4 expert weights (a buffer built with ``mma_type='fp8xfp4'``):
    ``transform_weights_for_mega_moe``'s MXFP4 output, packed E2M1 codes with one UE8M0 exponent per
    32 K. The weights are widened to FP8 on chip; the result equals the FP8 recipe on the dequantized
    weights up to FP32 accumulation order (an element ``2^-9`` or more below its 128-K block's
    largest scale is rounded to E4M3's subnormal grid)."""
    _check_call(y, buffer, cumulative_local_expert_recv_stats, activation_clamp, "fp8xfp4")
    (w1, e1), (w2, e2) = _check_fp4_weights(l1_weights, l2_weights, "kernel")
    _check_weights_for(buffer, {"l1_weights": w1, "l2_weights": w2, "l1_scales": e1, "l2_scales": e2})
    _launch(y, w1, e1, w2, e2, buffer, cumulative_local_expert_recv_stats, activation_clamp)


__all__ = ["MegaMoEBuffer", "get_symm_buffer_for_mega_moe", "transform_weights_for_mega_moe", "fp8_mega_moe",
           "bf16_mega_moe", "fp8_fp4_mega_moe"]
