"""FP8 backward GEMMs (DeepGEMM names, arguments, scale recipes and semantics) on sm_90a.

FP8 WGMMA reads K-major operands only, so an operand DeepGEMM takes MN-major (the ``t`` of A / the
``n`` of B in nn / tn / tt, and the K-grouped operands) is first copied into K-major form — one
transposing pass over its bytes (``transposed_copy``), sync-free and CUDA-graph capturable
(docs/fp8_backward.md gives its measured cost) — and the K-major kernels run on the copies. The math is
DeepGEMM's exactly: the product of the dequantized operands, FP32 accumulation, promoted per 128-K
block with the blocks' scales.

- ``fp8_gemm_{nn,tn,tt}``, ``m_grouped_fp8_gemm_nn_contiguous``: DeepGEMM's default SM90 recipe
  (A: one FP32 scale per row per 128 K; B: one per 128 x 128 block). An MN-major operand is given
  row-major as ``[.., K, MN]`` with its scales transposed the same way (``sfa [ceil(K/128), M]``,
  ``sfb [.., ceil(K/128), ceil(N/128)]``: DeepGEMM's ``(x.T, sf.T)``); then ``fp8_gemm_nt`` /
  ``m_grouped_fp8_gemm_nt_contiguous`` run.
- ``k_grouped_fp8_gemm_{tn,nt}_contiguous``: weight gradients, recipe (1, 1, 128) (both operands one
  FP32 scale per row (M or N) per 128 K rows of a group), every group's K a multiple of 128 so each
  group starts on a scale block; both are brought into ``a [M, sum K]``, ``b [N, sum K]`` K-major and
  run by the K-grouped FP8 kernel (kernels/sm90/fp8_k_grouped_gemm.py).
"""

import functools
from typing import Callable, Optional

import torch

from . import launcher, runtime
from .arch import arch_of_device
from .launcher import GemmOp, _fill_empty_groups, check_counts, check_mn, on_device
from .library import _register
from .dispatch import forced_config
from .operands import FP8_PER_TOKEN
from .ops import OPS
from .validation import check_contiguous, check_multiple, check_placement, check_shape, check_tensor

SCALE_BLOCK = 128  # FP32 scale granularity along K (and along N for 128 x 128 weight blocks)
WGRAD_RECIPE = (1, 1, 128)  # DeepGEMM's K-grouped recipe: (A's MN, B's MN, K) granularities
E4M3 = (torch.float8_e4m3fn,)
FP32 = (torch.float32,)
INT32 = (torch.int32,)
TRANSPOSE_ROW_BYTES = 16  # the byte-transpose kernel takes rows and columns of whole 16-byte vectors


def _blocks(extent: int) -> int:
    return -(-extent // SCALE_BLOCK)


def transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of ``t`` (1-byte elements) with its last two dimensions swapped
    (``[.., K, MN]`` -> ``[.., MN, K]``): one pass, sync-free. On the GPU with both extents multiples
    of 16 and 16-byte aligned rows, the shared-memory tiled byte transpose
    (kernels/sm90/byte_transpose.py); otherwise torch's strided copy."""
    src = t.view(torch.uint8)
    rows, cols = src.shape[-2], src.shape[-1]
    out = torch.empty((*src.shape[:-2], cols, rows), dtype=torch.uint8, device=src.device)
    if (src.is_cuda and src.numel() > 0 and rows % TRANSPOSE_ROW_BYTES == 0 and cols % TRANSPOSE_ROW_BYTES == 0
            and src.is_contiguous() and src.data_ptr() % TRANSPOSE_ROW_BYTES == 0):
        _byte_transpose(arch_of_device(src.get_device()))(src.reshape(-1, rows, cols), out.view(-1, cols, rows))
    else:
        out.copy_(src.transpose(-2, -1))
    return out.view(t.dtype)


@functools.lru_cache(maxsize=None)
def _byte_transpose(arch: str) -> Callable:
    """The byte-transpose kernel compiled for ``arch`` (once per process, under the GEMMs' compile lock:
    cute.compile is not thread-safe)."""
    from .kernels.sm90.byte_transpose import compile_byte_transpose

    with runtime._miss_lock:
        return compile_byte_transpose(arch)


def _split(value, name: str, sf_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(tensor, scales)`` pair of tensors (DeepGEMM's FP8 operand)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a (tensor, scale_factors) pair, got {type(value).__name__}")
    for label, t in ((name, value[0]), (sf_name, value[1])):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
    return value[0], value[1]


def _check_given_mn_major(name: str, sf_name: str, t: torch.Tensor, sf: torch.Tensor, ndim: int,
                          block_scales: bool) -> tuple[int, int]:
    """An MN-major FP8 operand given row-major ``[.., K, MN]`` with scales ``[.., ceil(K/128), MN]``
    (per row) or ``[.., ceil(K/128), ceil(MN/128)]`` (128 x 128 blocks); returns (K, MN)."""
    check_tensor(name, t, E4M3, ndim)
    check_contiguous(name, t)
    k, mn = t.shape[-2], t.shape[-1]
    check_multiple(name, k, 16, "K (a [.., K, MN] operand becomes K-major rows of 16-byte units)")
    check_tensor(sf_name, sf, FP32, ndim)
    check_shape(sf_name, sf, (*t.shape[:-2], _blocks(k), _blocks(mn) if block_scales else mn))
    return k, mn


class TransposedFp8Op:
    """An FP8 op whose MN-major operands (given ``[.., K, MN]``) are copied K-major before the K-major
    op ``target`` of ``ops.OPS`` runs on them."""

    def __init__(self, name: str, target: str, a_transposed: bool, b_transposed: bool, b_ndim: int):
        self.name = name
        self.target = target
        self.a_transposed = a_transposed
        self.b_transposed = b_transposed
        self.b_ndim = b_ndim

    def operands(self, a, b) -> tuple:
        """Validate the given forms (errors name the public argument); return the K-major pairs."""
        (a, sfa), (b, sfb) = _split(a, "a", "sfa"), _split(b, "b", "sfb")
        if self.a_transposed:
            _check_given_mn_major("a", "sfa", a, sfa, 2, block_scales=False)
        if self.b_transposed:
            _check_given_mn_major("b", "sfb", b, sfb, self.b_ndim, block_scales=True)
        # The K-major operand's own checks run in the target op; K must agree before the copies.
        a_k = a.shape[0] if self.a_transposed else a.shape[-1]
        b_k = b.shape[-2] if self.b_transposed else b.shape[-1]
        if a_k != b_k:
            raise ValueError(f"a: expected K={b_k} (from b of shape {tuple(b.shape)}"
                             f"{' as [.., K, N]' if self.b_transposed else ''}), got a of shape "
                             f"{tuple(a.shape)}{' as [K, M]' if self.a_transposed else ''}")
        if self.a_transposed:
            a, sfa = transposed_copy(a), sfa.transpose(-2, -1)  # per-row scales: the transposed view is MN-major
        if self.b_transposed:
            b, sfb = transposed_copy(b), sfb.transpose(-2, -1).contiguous()
        return (a, sfa), (b, sfb)

    def __call__(self, a, b, *args) -> None:
        OPS[self.target](*self.operands(a, b), *args)


FP8_GEMM_NN = TransposedFp8Op("fp8_gemm_nn", "fp8_gemm_nt", False, True, 2)
FP8_GEMM_TN = TransposedFp8Op("fp8_gemm_tn", "fp8_gemm_nt", True, True, 2)
FP8_GEMM_TT = TransposedFp8Op("fp8_gemm_tt", "fp8_gemm_nt", True, False, 2)
M_GROUPED_FP8_GEMM_NN = TransposedFp8Op("m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_contiguous",
                                        False, True, 3)


class Fp8KGroupedLaunch(GemmOp):
    """The K-grouped FP8 kernel's launch: a ``[M, sum K]``, b ``[N, sum K]`` E4M3 K-major, sfa
    ``[M, sum K / 128]``, sfb ``[N, sum K / 128]`` FP32 (MN-major TMA-aligned, else copied into it),
    d and c ``[G, M, N]`` FP32, ks_tensor int32 ``[G]`` multiples of 128 (the public ops validate the
    given forms; this checks the K-major copies again on a first call)."""

    kind = "k_grouped"

    def __call__(self, a, sfa, b, sfb, d: torch.Tensor, ks_tensor: torch.Tensor, c: Optional[torch.Tensor]) -> None:
        args = (a, sfa, b, sfb, d, ks_tensor, c)
        device = a.get_device()
        key = (self, a.shape[0], b.shape[0], c is None, device, forced_config())
        self.run(key, on_device(device, b, d, ks_tensor, c, sfa, sfb), args)

    def facts(self, a, sfa, b, sfb, d, ks_tensor, c) -> dict:
        return dict(kind="k_grouped", n=b.shape[0], k=a.shape[0], num_groups=d.shape[0], expected_m=a.shape[0],
                    alignment=0, d_dtype="fp32", has_c=c is not None, device=a.device)

    def kernel_args(self, a, sfa, b, sfb, d, ks_tensor, c) -> tuple:
        return (a.view(torch.uint8), b.view(torch.uint8), d, c, self.a.kernel_scales(sfa),
                self.b.kernel_scales(sfb), ks_tensor)

    def validate(self, a, sfa, b, sfb, d, ks_tensor, c) -> None:
        for name, t in (("a", a), ("b", b)):
            check_tensor(name, t, E4M3, 2)
            check_contiguous(name, t)
        m, sum_k = a.shape
        n = b.shape[0]
        check_shape("b", b, (n, sum_k))
        check_multiple("a", sum_k, SCALE_BLOCK, "sum K")
        check_mn(m, n)
        check_tensor("d", d, FP32, 3)
        check_shape("d", d, (d.shape[0], m, n))
        check_contiguous("d", d)
        check_tensor("ks_tensor", ks_tensor, INT32, 1)
        check_shape("ks_tensor", ks_tensor, (d.shape[0],))
        self.check_groups("d", d.shape[0], d.device)
        for name, t, rows in (("sfa", sfa, m), ("sfb", sfb, n)):
            check_tensor(name, t, FP32, 2)
            check_shape(name, t, (rows, sum_k // SCALE_BLOCK))
        if c is not None:
            check_tensor("c", c, FP32, 3)
            check_shape("c", c, tuple(d.shape))
            check_contiguous("c", c)
        check_placement(a=a, b=b, d=d, ks_tensor=ks_tensor, c=c)


K_GROUPED_LAUNCH = Fp8KGroupedLaunch("k_grouped_fp8_gemm_k_major", FP8_PER_TOKEN, FP8_PER_TOKEN)


def _check_recipe(recipe) -> None:
    if not isinstance(recipe, (tuple, list)) or tuple(recipe) != WGRAD_RECIPE:
        raise ValueError(f"recipe: the sm_90a K-grouped FP8 kernel implements {WGRAD_RECIPE} (FP32 scales per "
                         f"row per 128 K on both operands), got {recipe!r}")


def _check_k_grouped_outputs(d, c, ks, ks_tensor, m: int, n: int, sum_k: int) -> None:
    """d and c FP32 [G, M, N], ks_tensor int32 [G], ks (when given) G multiples of 128 summing to sum K."""
    check_tensor("d", d, FP32, 3)
    num_groups = d.shape[0]
    check_shape("d", d, (num_groups, m, n))
    check_contiguous("d", d)
    if c is not None:
        check_tensor("c", c, FP32, 3)
        check_shape("c", c, (num_groups, m, n))
        check_contiguous("c", c)
    check_tensor("ks_tensor", ks_tensor, INT32, 1)
    check_shape("ks_tensor", ks_tensor, (num_groups,))
    check_contiguous("ks_tensor", ks_tensor)
    K_GROUPED_LAUNCH.check_groups("d", num_groups, d.device)
    if ks is not None:
        _check_sizes(ks, num_groups, sum_k)


def _check_sizes(ks, num_groups: int, sum_k: int) -> None:
    """ks: ``num_groups`` non-negative ints, multiples of 128, summing to sum K."""
    check_counts("ks", ks, num_groups, sum_k)
    if any(v % SCALE_BLOCK for v in ks):
        raise ValueError(f"ks: expected every group's K to be a multiple of {SCALE_BLOCK} (whole scale "
                         f"blocks, as DeepGEMM requires), got {list(ks)}")


def _block_sizes(ks_tensor: torch.Tensor) -> torch.Tensor:
    """The groups' sizes in whole 128-row blocks (one small device op): whatever ks_tensor holds, every
    group starts on a scale block and no k-block straddles two groups (valid sizes are unchanged)."""
    return torch.bitwise_and(ks_tensor, -SCALE_BLOCK)


def _launch_k_grouped(a, sfa, b, sfb, d, ks, ks_tensor, c) -> None:
    """Run the K-grouped kernel on K-major copies (sum K = 0: d = c or zeros, no launch)."""
    if launcher._debug[0]:
        _check_device_sizes(ks, ks_tensor, a.shape[1])
    if a.shape[1] == 0:
        return _fill_empty_groups(d, c)
    K_GROUPED_LAUNCH(a, sfa, b, sfb, d, _block_sizes(ks_tensor), c)


def _check_device_sizes(ks, ks_tensor: torch.Tensor, sum_k: int) -> None:
    """CUTE_MOE_DEBUG=1: ks_tensor equals ks, or (ks None) holds multiples of 128 within sum K (syncs)."""
    sizes = ks_tensor.tolist()
    if ks is not None and sizes != list(ks):
        raise ValueError(f"ks_tensor: expected the values of ks {list(ks)}, got {sizes}")
    if any(v < 0 or v % SCALE_BLOCK for v in sizes) or sum(sizes) > sum_k:
        raise ValueError(f"ks_tensor: expected non-negative multiples of {SCALE_BLOCK} summing to at most "
                         f"{sum_k}, got {sizes}")


def k_grouped_fp8_gemm_tn(a, b, d: torch.Tensor, ks: Optional[list], ks_tensor: torch.Tensor,
                          c: Optional[torch.Tensor] = None, recipe=WGRAD_RECIPE) -> None:
    """The body of ``k_grouped_fp8_gemm_tn_contiguous`` (validation, K-major copies, launch)."""
    _check_recipe(recipe)
    (a, sfa), (b, sfb) = _split(a, "a", "sfa"), _split(b, "b", "sfb")
    sum_k, m = _check_given_mn_major("a", "sfa", a, sfa, 2, block_scales=False)
    sum_k_b, n = _check_given_mn_major("b", "sfb", b, sfb, 2, block_scales=False)
    if sum_k_b != sum_k:
        raise ValueError(f"b: expected {sum_k} rows (sum K, from a of shape {tuple(a.shape)}), "
                         f"got b of shape {tuple(b.shape)}")
    check_multiple("a", sum_k, SCALE_BLOCK, "sum K (rows of a [sum K, M])")
    check_mn(m, n)
    _check_k_grouped_outputs(d, c, ks, ks_tensor, m, n, sum_k)
    check_placement(a=a, b=b, d=d, ks_tensor=ks_tensor, c=c, sfa=sfa, sfb=sfb)
    # Per-channel scales [sum K / 128, MN]: their transposed views are the kernel's MN-major layout.
    _launch_k_grouped(transposed_copy(a), sfa.transpose(0, 1), transposed_copy(b), sfb.transpose(0, 1), d, ks,
                      ks_tensor, c)


def k_grouped_fp8_gemm_nt(a, b, d: torch.Tensor, ks: list, ks_tensor: torch.Tensor,
                          c: Optional[torch.Tensor] = None, recipe=WGRAD_RECIPE) -> None:
    """The body of ``k_grouped_fp8_gemm_nt_contiguous`` (validation, K-major copies, launch)."""
    _check_recipe(recipe)
    (a, sfa), (b, sfb) = _split(a, "a", "sfa"), _split(b, "b", "sfb")
    check_tensor("d", d, FP32, 3)
    if ks is None:
        raise ValueError("ks: k_grouped_fp8_gemm_nt_contiguous needs the groups' sizes on the host (a's "
                         "per-group [M, K] blocks are located by them), got None")
    if not isinstance(ks, (list, tuple)) or not all(type(v) is int for v in ks):
        raise TypeError(f"ks: expected a list of ints, got {type(ks).__name__}")
    m, n, sum_k = d.shape[1], d.shape[2], sum(ks)
    _check_sizes(ks, d.shape[0], sum_k)
    for name, sf_name, t, sf, rows in (("a", "sfa", a, sfa, m), ("b", "sfb", b, sfb, n)):
        check_tensor(name, t, E4M3, getattr(t, "ndim", 0))  # any shape: DeepGEMM counts the elements
        check_contiguous(name, t)
        if t.numel() != sum_k * rows:
            raise ValueError(f"{name}: expected sum(ks) * {'M' if name == 'a' else 'N'} = {sum_k} * {rows} "
                             f"elements (each group's [{'M' if name == 'a' else 'N'}, K] block, K-major), "
                             f"got shape {tuple(t.shape)}")
        check_tensor(sf_name, sf, FP32, 2)
        check_shape(sf_name, sf, (rows, _blocks(sum_k)))
    check_mn(m, n)
    _check_k_grouped_outputs(d, c, ks, ks_tensor, m, n, sum_k)
    check_placement(a=a, b=b, d=d, ks_tensor=ks_tensor, c=c, sfa=sfa, sfb=sfb)
    _launch_k_grouped(_concat_group_blocks(a, ks, m), sfa, _concat_group_blocks(b, ks, n), sfb, d, ks, ks_tensor, c)


def _concat_group_blocks(t: torch.Tensor, ks: list, rows: int) -> torch.Tensor:
    """DeepGEMM's nt operand (group g's ``[rows, ks[g]]`` block, K-major, after the earlier groups')
    as one ``[rows, sum K]`` K-major tensor: one concatenation pass."""
    flat, blocks, start = t.view(torch.uint8).reshape(-1), [], 0
    for k in ks:
        if k:
            blocks.append(flat[start * rows:(start + k) * rows].view(rows, k))
        start += k
    if not blocks:
        return flat.new_empty((rows, 0)).view(t.dtype)
    return torch.cat(blocks, dim=1).view(t.dtype)


# ------------------------------------------------------------------------------------ public ops
def fp8_gemm_nn(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + (a * sfa) @ (b * sfb): a (E4M3 [M, K], sfa [M, ceil(K/128)]), b (E4M3 [K, N] row-major,
    sfb [ceil(K/128), ceil(N/128)] per 128 x 128 block); d and c [M, N] bf16 or fp32 (same dtype), c
    optional, may be d itself. b is copied K-major first (one pass over it)."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op
        return torch.ops.cute_moe.fp8_gemm_nn(a[0], a[1], b[0], b[1], d, c)
    FP8_GEMM_NN(a, b, d, c)


def fp8_gemm_tn(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + (a * sfa).T @ (b * sfb): a (E4M3 [K, M] row-major, sfa [ceil(K/128), M]), b (E4M3 [K, N]
    row-major, sfb [ceil(K/128), ceil(N/128)]); d and c [M, N]. a and b are copied K-major first."""
    if torch.compiler.is_compiling():
        return torch.ops.cute_moe.fp8_gemm_tn(a[0], a[1], b[0], b[1], d, c)
    FP8_GEMM_TN(a, b, d, c)


def fp8_gemm_tt(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + (a * sfa).T @ (b * sfb).T: a (E4M3 [K, M] row-major, sfa [ceil(K/128), M]), b (E4M3
    [N, K], sfb [ceil(N/128), ceil(K/128)]); d and c [M, N]. a is copied K-major first."""
    if torch.compiler.is_compiling():
        return torch.ops.cute_moe.fp8_gemm_tt(a[0], a[1], b[0], b[1], d, c)
    FP8_GEMM_TT(a, b, d, c)


def m_grouped_fp8_gemm_nn_contiguous(a: tuple, b: tuple, d: torch.Tensor, grouped_layout: torch.Tensor,
                                     use_psum_layout: bool = False) -> None:
    """dX = dY . W per expert in FP8: like ``m_grouped_fp8_gemm_nt_contiguous`` with b (E4M3 [G, K, N]
    row-major, sfb [G, ceil(K/128), ceil(N/128)]), copied K-major first (one pass over the weights)."""
    if torch.compiler.is_compiling():
        return torch.ops.cute_moe.m_grouped_fp8_gemm_nn_contiguous(a[0], a[1], b[0], b[1], d, grouped_layout,
                                                                   use_psum_layout)
    M_GROUPED_FP8_GEMM_NN(a, b, d, grouped_layout, use_psum_layout)


def k_grouped_fp8_gemm_tn_contiguous(a: tuple, b: tuple, d: torch.Tensor, ks: Optional[list],
                                     ks_tensor: torch.Tensor, c: Optional[torch.Tensor] = None,
                                     recipe=WGRAD_RECIPE) -> None:
    """Weight gradients in FP8, K grouped along tokens: d[g] = c[g] + (a * sfa)[rows of g].T @
    (b * sfb)[rows of g].

    a (E4M3 [sum K, M] row-major, sfa [sum K / 128, M]: one FP32 scale per column per 128 rows, as
    ``per_channel_cast_to_fp8`` of each group returns it), b likewise (E4M3 [sum K, N], sfb
    [sum K / 128, N]); d and c [G, M, N] fp32 (c optional, may be d itself); M, N multiples of 8;
    ks: the groups' row counts, each a multiple of 128 (0 allowed: d[g] = c[g] or 0), summing to
    sum K, or None when only ks_tensor (int32 [G] on the GPU, the kernel reads only it) knows them:
    rows past their sum are ignored. A ks_tensor value that is not a multiple of 128 counts as its
    largest multiple of 128 below (no group then starts inside a scale block); ``CUTE_MOE_DEBUG=1``
    checks ks_tensor == ks. recipe: (1, 1, 128) only. a and b are copied K-major first (one pass)."""
    if torch.compiler.is_compiling():
        _check_recipe(recipe)
        return torch.ops.cute_moe.k_grouped_fp8_gemm_tn_contiguous(a[0], a[1], b[0], b[1], d, ks, ks_tensor, c)
    k_grouped_fp8_gemm_tn(a, b, d, ks, ks_tensor, c, recipe)


def k_grouped_fp8_gemm_nt_contiguous(a: tuple, b: tuple, d: torch.Tensor, ks: list, ks_tensor: torch.Tensor,
                                     c: Optional[torch.Tensor] = None, recipe=WGRAD_RECIPE) -> None:
    """Weight gradients in FP8 with K-major operands (DeepGEMM's SM90 form): d[g] = c[g] + A_g . B_g.T.

    a: (E4M3 holding, group after group, each group's [M, ks[g]] block row-major (a.numel() = sum K * M,
    any shape, contiguous), sfa [M, sum K / 128]: per row per 128 K, e.g. the transposed view of a
    per-channel cast's [sum K / 128, M]); b likewise with N; d and c [G, M, N] fp32; ks (host list,
    required: it locates the blocks) multiples of 128 summing to sum K; ks_tensor the same counts int32
    [G] on the GPU. recipe: (1, 1, 128) only. The blocks are concatenated into [M, sum K] first."""
    if torch.compiler.is_compiling():
        _check_recipe(recipe)
        return torch.ops.cute_moe.k_grouped_fp8_gemm_nt_contiguous(a[0], a[1], b[0], b[1], d, ks, ks_tensor, c)
    k_grouped_fp8_gemm_nt(a, b, d, ks, ks_tensor, c, recipe)


# --------------------------------------------------------------------------- torch.library custom ops
def _dense_impl(op: TransposedFp8Op):
    def impl(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
             c: Optional[torch.Tensor] = None) -> None:
        op((a, sfa), (b, sfb), d, c)
    return impl


def _contiguous_impl(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                     grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    M_GROUPED_FP8_GEMM_NN((a, sfa), (b, sfb), d, grouped_layout, use_psum_layout)


def _k_grouped_impl(body):
    def impl(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
             ks: Optional[list[int]], ks_tensor: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
        body((a, sfa), (b, sfb), d, ks, ks_tensor, c)
    return impl


CUSTOM_OPS = {
    **{op.name: _register(op.name, _dense_impl(op)) for op in (FP8_GEMM_NN, FP8_GEMM_TN, FP8_GEMM_TT)},
    M_GROUPED_FP8_GEMM_NN.name: _register(M_GROUPED_FP8_GEMM_NN.name, _contiguous_impl),
    "k_grouped_fp8_gemm_tn_contiguous": _register("k_grouped_fp8_gemm_tn_contiguous",
                                                  _k_grouped_impl(k_grouped_fp8_gemm_tn)),
    "k_grouped_fp8_gemm_nt_contiguous": _register("k_grouped_fp8_gemm_nt_contiguous",
                                                  _k_grouped_impl(k_grouped_fp8_gemm_nt)),
}
