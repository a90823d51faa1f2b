"""One table-driven launcher for every public GEMM op.

An op is one entry of ``ops.OPS``: a problem kind's signature class below (how its arguments map to
the warm key, the validation, the kernel arguments and the dispatch facts) and its operand
descriptors (``cute_moe.operands``), each handled by an ``OperandIO``. Every op has the same warm
path: unpack the operands, build the key, one dict lookup, a placement check, one TVM-FFI launch.
TVM-FFI checks dtypes, shapes, strides, device type and 16-byte alignment itself; when it refuses an
argument, the full validation runs to raise an error naming the public argument. Any miss (a new
shape or device, an empty problem, an unusual argument) takes the cold path: full validation,
dispatch, ``runtime.get_kernel`` and a new table entry.

With ``CUTE_MOE_DEBUG=1`` the index tensors are checked on the host before every launch
(``index_checks``); otherwise the warm path never synchronizes.
"""

import os
from typing import Any, Callable, Optional

import torch

from . import index_checks, runtime
from .arch import arch_of_device, backend_for, get_backend
from .dispatch import forced_config, m_bucket, problem_of, resolve, rows_per_group, spec_of
from .layouts.alignment import get_mk_alignment_for_contiguous_layout
from .operands import Operand, dtype_name
from .operand_io import OperandIO
from .validation import (check_contiguous, check_int_arg, check_multiple, check_placement, check_shape,
                         check_tensor)

DEBUG_ENV = "CUTE_MOE_DEBUG"
ROW_ELEMENTS = 8  # BF16 elements of one 16-byte unit: TMA rows and strides are whole units
OUT_DTYPES = (torch.bfloat16, torch.float32)
INT32 = (torch.int32,)


class Launch:
    """A compiled specialization bound to its launch facts (and the config it was compiled with)."""

    __slots__ = ("fn", "clusters", "config")

    def __init__(self, fn: Callable, clusters: int, config: Any):
        self.fn = fn
        self.clusters = clusters
        self.config = config


# warm key (op, static shapes, output dtype, row bucket / flags, device, forced config) -> Launch
_launches: dict[tuple, Launch] = {}
_debug = [os.environ.get(DEBUG_ENV, "0") not in ("", "0")]


def clear_launches() -> None:
    """Forget every shape's launch (the next call of each shape dispatches and loads again)."""
    _launches.clear()


def set_debug(enabled: bool) -> None:
    """Turn the host-side index-tensor checks of CUTE_MOE_DEBUG on or off."""
    _debug[0] = bool(enabled)


def on_device(device: int, *tensors) -> bool:
    """Whether every given tensor (None skipped) lives on CUDA device ``device`` (placement check of
    the FP8 ops; TVM-FFI checks only the device type)."""
    return all(t is None or t.get_device() == device for t in tensors)


class GemmOp:
    """A public op: its name, its operands' handling and the shared launch mechanics.

    A kind's subclass defines, over one tuple of unpacked arguments: ``validate`` (full checks, errors
    naming the argument), ``facts`` (the dispatch facts of a first call), ``kernel_args`` (the
    kernel's positional arguments before the cluster count) and ``check_indices`` (debug mode)."""

    kind = ""

    def __init__(self, name: str, a: Operand, b: Operand):
        self.name = name
        self.a = OperandIO(a, "a", "sfa")
        self.b = OperandIO(b, "b", "sfb")
        self.scaled = self.a.recipe is not None or self.b.recipe is not None

    def unpack(self, a, b) -> tuple:
        """(a, sfa, b, sfb): scaled operands are (tensor, scales) pairs, unscaled ones plain tensors."""
        if self.scaled:
            return (*self.a.split(a), *self.b.split(b))
        return a, None, b, None

    def run(self, key: tuple, warm: bool, args: tuple) -> None:
        """Warm: launch the table's entry. Cold (``warm`` false or no entry): validate, then build the
        entry from the call's dispatch facts, then launch."""
        launch = _launches.get(key)
        if launch is None or not warm:
            self.validate(*args)
            if launch is None:
                launch = self._build(key, **self.facts(*args))
        if _debug[0]:
            self.check_indices(*args)
        try:
            launch.fn(*self.kernel_args(*args), launch.clusters)
        except (ValueError, TypeError):
            self.validate(*args)
            raise

    def _build(self, key: tuple, *, device: torch.device, **facts) -> Launch:
        """First call of a key: dispatch on the device's arch, compile or load, remember."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        arch = arch_of_device(index)
        backend = get_backend(arch)
        problem = problem_of(arch=arch, a=self.a.operand, b=self.b.operand, **facts, num_sms=backend.num_sms(index))
        config = resolve(problem)
        launch = Launch(runtime.get_kernel(spec_of(problem), config), runtime.max_clusters(arch, index, config),
                        config)
        _launches[key] = launch
        return launch

    def check_groups(self, name: str, num_groups: int, device: torch.device) -> None:
        """Group count within the arch backend's scheduler table (the default arch off the GPU)."""
        maximum = (get_backend(arch_of_device(device.index)) if device.type == "cuda" else backend_for(None)).max_groups
        if not 1 <= num_groups <= maximum:
            raise ValueError(f"{name}: expected between 1 and {maximum} groups, got {num_groups}")

    def check_indices(self, *args) -> None:
        """Debug mode: host checks of the call's index tensors (none by default)."""


def check_nk(n: int, k: int) -> None:
    check_multiple("b", k, 8, "K")
    check_multiple("b", n, 8, "N")
    if k == 0 or n == 0:
        raise ValueError(f"b: expected non-empty N and K, got N={n}, K={k}")


def check_mn(m: int, n: int) -> None:
    """K-grouped extents: M and N non-empty, whole 16-byte rows of a [sum K, M] and b [sum K, N]."""
    check_multiple("a", m, ROW_ELEMENTS, "M")
    check_multiple("b", n, ROW_ELEMENTS, "N")
    if m == 0 or n == 0:
        raise ValueError(f"a, b: expected non-empty M and N, got M={m}, N={n}")


def check_k_matches(a: torch.Tensor, k: int, b_shape: tuple) -> None:
    """A's K must equal B's; the error names ``a`` and says where the expected K comes from."""
    if a.shape[-1] != k:
        raise ValueError(f"a: expected K={k} (from b of shape {tuple(b_shape)}), got a of shape {tuple(a.shape)}")


class DenseOp(GemmOp):
    """d = c + a @ b.T: a [M, K], b [N, K], d and c [M, N] (c optional, may be d itself). MN-major
    operands (DeepGEMM's nn / tn / tt) are given transposed: a [K, M], b [K, N]."""

    kind = "dense"

    def __call__(self, a, b, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
        args = (*self.unpack(a, b), d, c)
        a, sfa, b, sfb = args[:4]
        try:
            m = a.shape[self.a.transposed]
            device = a.get_device()
            key = (self, b.shape, m_bucket(m), d.dtype, c is None, device, forced_config())
        except AttributeError:
            self.validate(*args)
            raise
        if m == 0:
            return self.validate(*args)
        # An MN-major a's row stride is M: whole 16-byte units, else the full validation refuses it.
        warm = on_device(device, b, d, c, sfa, sfb) and (not self.a.transposed or m % ROW_ELEMENTS == 0)
        self.run(key, warm, args)

    def facts(self, a, sfa, b, sfb, d, c) -> dict:
        n, k = self.b.logical(b).shape
        return dict(kind="dense", n=n, k=k, num_groups=1, expected_m=self.a.logical(a).shape[0], alignment=0,
                    d_dtype=dtype_name(d.dtype), has_c=c is not None, device=a.device)

    def kernel_args(self, a, sfa, b, sfb, d, c) -> tuple:
        return self.a.kernel(a), self.b.kernel(b), d, c, self.a.kernel_scales(sfa), sfb, None

    def validate(self, a, sfa, b, sfb, d, c) -> None:
        self.a.check(a, 2)
        self.b.check(b, 2)
        check_tensor("d", d, OUT_DTYPES, 2)
        m, a_k = self.a.logical(a).shape
        n, k = self.b.logical(b).shape
        if a_k != k:
            raise ValueError(f"a: expected K={k} (from b of shape {tuple(b.shape)}{self.b.as_given}), "
                             f"got a of shape {tuple(a.shape)}{self.a.as_given}")
        check_shape("d", d, (m, n))
        check_nk(n, k)
        for name, t in (("a", a), ("b", b), ("d", d)):
            check_contiguous(name, t)
        if self.a.transposed:
            check_multiple("a", m, ROW_ELEMENTS, "M (a [K, M] is read in 16-byte rows)")
        if c is not None:
            check_tensor("c", c, (d.dtype,), 2)
            check_shape("c", c, (m, n))
            check_contiguous("c", c)
        self.a.check_scales(sfa, (m,), k)
        self.b.check_scales(sfb, (), k, n)
        check_placement(a=a, b=b, d=d, c=c, sfa=sfa, sfb=sfb)


class ContiguousOp(GemmOp):
    """M-grouped contiguous: a [M, K] with aligned expert segments, b [G, N, K], d [M, N];
    grouped_layout int32 [M] (expert per row, -1 padding) or, psum, int32 [G] cumulative ends."""

    kind = "contiguous"

    def __call__(self, a, b, d: torch.Tensor, grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
        args = (*self.unpack(a, b), d, grouped_layout, use_psum_layout, get_mk_alignment_for_contiguous_layout())
        a, sfa, b, sfb = args[:4]
        alignment = args[-1]
        try:
            m = a.shape[0]
            device = a.get_device()
            hint = 0 if use_psum_layout is True else m_bucket(rows_per_group(m, b.shape[0]))
            key = (self, use_psum_layout is True, b.shape, d.dtype, alignment, hint, device, forced_config())
        except (AttributeError, IndexError):
            self.validate(*args)
            raise
        if m == 0 and type(use_psum_layout) is bool:
            return self.validate(*args)
        warm = (m % alignment == 0 and type(use_psum_layout) is bool
                and b.get_device() == device and d.get_device() == device and grouped_layout.get_device() == device
                and (not self.scaled or on_device(device, sfa, sfb)))
        self.run(key, warm, args)

    def facts(self, a, sfa, b, sfb, d, grouped_layout, use_psum_layout, alignment) -> dict:
        _, n, k = self.b.logical(b).shape
        hint = 0 if use_psum_layout else rows_per_group(a.shape[0], b.shape[0])
        return dict(kind="psum" if use_psum_layout else "contiguous", n=n, k=k,
                    num_groups=b.shape[0], expected_m=hint, alignment=alignment, d_dtype=dtype_name(d.dtype),
                    device=a.device)

    def kernel_args(self, a, sfa, b, sfb, d, grouped_layout, use_psum_layout, alignment) -> tuple:
        return self.a.kernel(a), self.b.kernel(b), d, None, self.a.kernel_scales(sfa), sfb, grouped_layout

    def validate(self, a, sfa, b, sfb, d, grouped_layout, use_psum_layout, alignment) -> None:
        if not isinstance(use_psum_layout, bool):
            raise TypeError(f"use_psum_layout: expected bool, got {type(use_psum_layout).__name__}")
        self.a.check(a, 2)
        self.b.check(b, 3)
        check_tensor("d", d, OUT_DTYPES, 2)
        check_tensor("grouped_layout", grouped_layout, INT32, 1)
        m = a.shape[0]
        num_groups, n, k = self.b.logical(b).shape
        check_k_matches(a, k, b.shape)
        check_shape("d", d, (m, n))
        check_shape("grouped_layout", grouped_layout, (num_groups,) if use_psum_layout else (m,))
        check_nk(n, k)
        self.check_groups("b", num_groups, b.device)
        for name, t in (("a", a), ("b", b), ("d", d), ("grouped_layout", grouped_layout)):
            check_contiguous(name, t)
        check_multiple("a", m, alignment, "the row count (aligned expert segments)")
        self.a.check_scales(sfa, (m,), k)
        self.b.check_scales(sfb, (num_groups,), k, n)
        check_placement(a=a, b=b, d=d, grouped_layout=grouped_layout, sfa=sfa, sfb=sfb)

    def check_indices(self, a, sfa, b, sfb, d, grouped_layout, use_psum_layout, alignment) -> None:
        if use_psum_layout:
            index_checks.check_ends("grouped_layout", grouped_layout, a.shape[0])
        else:
            index_checks.check_expert_ids("grouped_layout", grouped_layout, b.shape[0])


class MaskedOp(GemmOp):
    """M-grouped masked: a [G, Mmax, K], b [G, N, K], d [G, Mmax, N]; masked_m int32 [G] rows per group."""

    kind = "masked"

    def __call__(self, a, b, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> None:
        args = (*self.unpack(a, b), d, masked_m, expected_m)
        a, sfa, b, sfb = args[:4]
        try:
            device = a.get_device()
            key = (self, b.shape, d.dtype, expected_m, device, forced_config())
        except (AttributeError, TypeError):
            self.validate(*args)
            raise
        if a.numel() == 0:
            return self.validate(*args)
        warm = (type(expected_m) is int and b.get_device() == device and d.get_device() == device
                and masked_m.get_device() == device and (not self.scaled or on_device(device, sfa, sfb)))
        self.run(key, warm, args)

    def facts(self, a, sfa, b, sfb, d, masked_m, expected_m) -> dict:
        return dict(kind="masked", n=b.shape[1], k=b.shape[2], num_groups=b.shape[0], expected_m=expected_m,
                    alignment=0, d_dtype=dtype_name(d.dtype), device=a.device)

    def kernel_args(self, a, sfa, b, sfb, d, masked_m, expected_m) -> tuple:
        return self.a.kernel(a), self.b.kernel(b), d, None, self.a.kernel_scales(sfa), sfb, masked_m

    def validate(self, a, sfa, b, sfb, d, masked_m, expected_m) -> None:
        self.a.check(a, 3)
        self.b.check(b, 3)
        check_tensor("d", d, OUT_DTYPES, 3)
        check_tensor("masked_m", masked_m, INT32, 1)
        check_int_arg("expected_m", expected_m, 0)
        num_groups, max_m, _ = a.shape
        n, k = b.shape[1], b.shape[2]
        check_k_matches(a, k, b.shape)
        check_shape("b", b, (num_groups, n, k))
        check_shape("d", d, (num_groups, max_m, n))
        check_shape("masked_m", masked_m, (num_groups,))
        check_nk(n, k)
        self.check_groups("a", num_groups, a.device)
        for name, t in (("a", a), ("b", b), ("d", d), ("masked_m", masked_m)):
            check_contiguous(name, t)
        self.a.check_scales(sfa, (num_groups, max_m), k)
        self.b.check_scales(sfb, (num_groups,), k, n)
        check_placement(a=a, b=b, d=d, masked_m=masked_m, sfa=sfa, sfb=sfb)

    def check_indices(self, a, sfa, b, sfb, d, masked_m, expected_m) -> None:
        index_checks.check_counts("masked_m", masked_m, a.shape[1])


class KGroupedOp(GemmOp):
    """K-grouped (weight gradients): d[g] = c[g] + a[rows of g].T @ b[rows of g]; a [sum K, M] and
    b [sum K, N] (the MN-major operand form; a K-major descriptor takes a as [M, sum K]), d and c
    [G, M, N] fp32, or bf16 (an extension of DeepGEMM's API: the FP32 sum rounded once; c, if given,
    in d's dtype) (c optional, may be d); ks: the groups' row counts (host list, or None when only
    the device knows them: rows past their sum are then ignored), ks_tensor: the same as int32 [G]
    on the GPU (the kernel reads it; any value stays inside a and b)."""

    kind = "k_grouped"

    def __call__(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks, ks_tensor: torch.Tensor,
                 c: Optional[torch.Tensor] = None) -> None:
        args = (a, None, b, None, d, ks, ks_tensor, c)
        try:
            sum_k = a.shape[1 - self.a.transposed]
            device = a.get_device()
            key = (self, a.shape[self.a.transposed], b.shape[1], d.dtype, c is None, device, forced_config())
            warm = ((ks is None or type(ks) in (list, tuple) and len(ks) == d.shape[0] and sum(ks) == sum_k)
                    and (sum_k % ROW_ELEMENTS == 0 or self.a.transposed)
                    and on_device(device, b, d, ks_tensor, c))
        except (AttributeError, TypeError, IndexError):
            self.validate(*args)
            raise
        if sum_k == 0 or d.numel() == 0:
            self.validate(*args)
            return _fill_empty_groups(d, c)
        self.run(key, warm, args)

    def facts(self, a, sfa, b, sfb, d, ks, ks_tensor, c) -> dict:
        return dict(kind="k_grouped", n=b.shape[1], k=d.shape[1], num_groups=d.shape[0], expected_m=d.shape[1],
                    alignment=0, d_dtype=dtype_name(d.dtype), has_c=c is not None, device=a.device)

    def kernel_args(self, a, sfa, b, sfb, d, ks, ks_tensor, c) -> tuple:
        return self.a.kernel(a), self.b.kernel(b), d, c, None, None, ks_tensor

    def validate(self, a, sfa, b, sfb, d, ks, ks_tensor, c) -> None:
        self.validate_operands(a, b, d, ks_tensor, c)
        if ks is not None:
            check_counts("ks", ks, d.shape[0], self.a.logical(a).shape[1])
        check_placement(a=a, b=b, d=d, ks_tensor=ks_tensor, c=c)

    def validate_operands(self, a, b, d, ks_tensor, c) -> None:
        """a, b, d, c and the device group sizes: dtypes, shapes, strides (not the placement)."""
        self.a.check(a, 2)
        self.b.check(b, 2)
        check_tensor("d", d, OUT_DTYPES, 3)
        check_tensor("ks_tensor", ks_tensor, INT32, 1)
        m, sum_k = self.a.logical(a).shape
        num_groups, n = d.shape[0], b.shape[1]
        if b.shape[0] != sum_k:
            raise ValueError(f"b: expected {sum_k} rows (sum K, from a of shape {tuple(a.shape)}), "
                             f"got b of shape {tuple(b.shape)}")
        check_shape("d", d, (num_groups, m, n))
        check_shape("ks_tensor", ks_tensor, (num_groups,))
        check_mn(m, n)
        self.check_groups("d", num_groups, d.device)
        for name, t in (("a", a), ("b", b), ("d", d), ("ks_tensor", ks_tensor)):
            check_contiguous(name, t)
        if not self.a.transposed:
            check_multiple("a", sum_k, ROW_ELEMENTS, "sum K (a [M, sum K] is read in 16-byte rows)")
        if c is not None:
            check_tensor("c", c, (d.dtype,), 3)
            check_shape("c", c, tuple(d.shape))
            check_contiguous("c", c)

    def check_indices(self, a, sfa, b, sfb, d, ks, ks_tensor, c) -> None:
        sizes = ks_tensor.tolist()
        if ks is not None and sizes != list(ks):
            raise ValueError(f"ks_tensor: expected the values of ks {list(ks)}, got {sizes}")
        if min(sizes) < 0 or sum(sizes) > self.a.logical(a).shape[1]:
            raise ValueError(f"ks_tensor: expected non-negative sizes summing to at most "
                             f"{self.a.logical(a).shape[1]} rows, got {sizes}")


class RaggedKOp(KGroupedOp):
    """torch._grouped_mm for 2-D a and 2-D b (weight gradients): a [M, sum K], b [sum K, N] (both
    row-major), offs int32 [G] cumulative ends along K; returns out [G, M, N] (group g reduces over
    rows [offs[g-1], offs[g]); rows past offs[-1] are ignored, an empty group gives zeros)."""

    def __call__(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        try:
            m, sum_k = a.shape
            device = a.get_device()
            key = (self, m, b.shape[1], out_dtype, True, device, forced_config())
            warm = (key in _launches and sum_k % ROW_ELEMENTS == 0 and b.get_device() == device
                    and offs.get_device() == device)
        except (AttributeError, TypeError, ValueError, IndexError):
            warm = False
        if not warm:
            self.validate_offs(a, b, offs, out_dtype)
        out = torch.empty((offs.shape[0], a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
        if sum_k == 0:
            return out.zero_()
        # The kernel reads group sizes: one small device op turns the ends into sizes (no host sync).
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        self.run(key, True, (a, None, b, None, out, None, sizes, None))
        return out

    def validate_offs(self, a, b, offs, out_dtype) -> None:
        check_tensor("offs", offs, INT32, 1)
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype: expected bfloat16 or float32, got {out_dtype}")
        self.a.check(a, 2)
        self.b.check(b, 2)
        self.check_groups("offs", offs.shape[0], offs.device)
        check_contiguous("offs", offs)
        check_multiple("a", a.shape[1], ROW_ELEMENTS, "sum K (a [M, sum K] is read in 16-byte rows)")
        if b.shape[0] != a.shape[1]:
            raise ValueError(f"b: expected {a.shape[1]} rows (sum K, from a of shape {tuple(a.shape)}), "
                             f"got b of shape {tuple(b.shape)}")
        check_mn(a.shape[0], b.shape[1])
        check_contiguous("a", a)
        check_contiguous("b", b)
        check_placement(a=a, b=b, offs=offs)

    def validate(self, a, sfa, b, sfb, d, ks, ks_tensor, c) -> None:
        self.validate_operands(a, b, d, ks_tensor, c)
        check_placement(a=a, b=b, d=d, ks_tensor=ks_tensor)

    def check_indices(self, a, sfa, b, sfb, d, ks, ks_tensor, c) -> None:
        if (ks_tensor < 0).any():
            raise ValueError("offs: expected non-decreasing cumulative ends")


def check_counts(name: str, counts, num_groups: int, total: int) -> None:
    """A host list of ``num_groups`` non-negative ints summing to ``total``."""
    if not isinstance(counts, (list, tuple)) or not all(type(v) is int for v in counts):
        raise TypeError(f"{name}: expected a list of ints, got {type(counts).__name__}")
    if len(counts) != num_groups:
        raise ValueError(f"{name}: expected {num_groups} group sizes (one per group), got {len(counts)}")
    if any(v < 0 for v in counts) or sum(counts) != total:
        raise ValueError(f"{name}: expected non-negative sizes summing to {total}, got {list(counts)}")


def _fill_empty_groups(d: torch.Tensor, c: Optional[torch.Tensor]) -> None:
    """d = c (or 0) when no group has a row: nothing for the kernel to reduce."""
    if c is None:
        d.zero_()
    elif c.data_ptr() != d.data_ptr():
        d.copy_(c)


class RaggedOp(GemmOp):
    """torch._grouped_mm for 2-D a and 3-D b: a [M, K], b [G, K, N] (K contiguous, or N contiguous for
    an MN-major descriptor), offs int32 [G] cumulative ends; returns out [M, N]."""

    kind = "ragged"

    def __call__(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        try:
            m = a.shape[0]
            device = a.get_device()
            key = (self, b.shape, out_dtype, m_bucket(rows_per_group(m, b.shape[0])), device, forced_config())
        except (AttributeError, TypeError, IndexError):
            self.validate(a, b, offs, out_dtype, None)
            raise
        warm = key in _launches and b.get_device() == device and offs.get_device() == device
        if not warm or m == 0:
            self.validate(a, b, offs, out_dtype, None)  # before allocating the output
        out = torch.empty((m, b.shape[2]), dtype=out_dtype, device=a.device)
        if m > 0:
            self.run(key, warm, (a, b, offs, out_dtype, out))
        return out

    def facts(self, a, b, offs, out_dtype, out) -> dict:
        return dict(kind="ragged", n=b.shape[2], k=b.shape[1], num_groups=b.shape[0],
                    expected_m=rows_per_group(a.shape[0], b.shape[0]), alignment=0,
                    d_dtype=dtype_name(out_dtype), device=a.device)

    def kernel_args(self, a, b, offs, out_dtype, out) -> tuple:
        return a, b.transpose(1, 2), out, None, None, None, offs

    def validate(self, a, b, offs, out_dtype, out) -> None:
        self.a.check(a, 2)
        self.b.check(b, 3)
        check_tensor("offs", offs, INT32, 1)
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype: expected bfloat16 or float32, got {out_dtype}")
        m, k = a.shape
        num_groups, n = b.shape[0], b.shape[2]
        if b.shape[1] != k:
            hint = (" (b looks like a [G, N, K] weight: pass w.transpose(1, 2))"
                    if b.shape[2] == k and b.is_contiguous() else "")
            raise ValueError(f"b: grouped_mm expects b as [G, K, N] with K = a.shape[1] = {k}, "
                             f"got shape {tuple(b.shape)}{hint}")
        check_shape("offs", offs, (num_groups,))
        check_nk(n, k)
        self.check_groups("b", num_groups, b.device)
        check_contiguous("a", a)
        check_contiguous("offs", offs)
        if self.b.transposed:
            check_contiguous("b", b)
        elif not b.transpose(1, 2).is_contiguous():
            raise ValueError(f"b: expected K-contiguous [G, K, N] (strides (N*K, 1, K) = {(n * k, 1, k)}), "
                             f"got strides {b.stride()}")
        check_placement(a=a, b=b, offs=offs)

    def check_indices(self, a, b, offs, out_dtype, out) -> None:
        index_checks.check_ends("offs", offs, a.shape[0])
