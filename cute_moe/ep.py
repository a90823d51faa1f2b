"""Expert-parallel dispatch and combine over NVLink on torch symmetric memory (docs/ep.md).

    buf = EPBuffer(group, num_experts=256, num_max_tokens_per_rank=128, hidden=7168, num_topk=8)
    d = buf.dispatch(x, topk_idx, topk_weights, layout="masked")    # or (x_fp8, x_scales)
    y = expert_gemms(d.x, d.masked_m)                               # [local_experts, max_m, hidden]
    out = buf.combine(y, d.handle)                                  # [T, hidden] BF16

Everything runs on the device: no host synchronization, CUDA-graph capturable with routing that
changes between replays (outputs live in the buffer and are sized for the maximum). A peer that
does not arrive within ``timeout_s`` stops the kernel and leaves an error record that the next call,
``EPBuffer.check()`` or ``cute_moe.ep.synchronize()`` raises as a RuntimeError naming the operation and
the ranks. After such an error the buffer is unusable (its signal counters are out of step); create a
new one. Outputs and the handle are valid until the next dispatch on the same buffer.
"""

import os
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from .ep_layout import LAYOUTS, MAX_RANKS, MAX_TOPK, SCALE_BLOCK, VECTOR_BYTES, EPGeometry
from .index_checks import check_expert_ids
from .layouts.alignment import check_alignment
from .validation import check_contiguous, check_shape, check_tensor

DTYPES = ("bf16", "fp8")
FP8 = torch.float8_e4m3fn
DEFAULT_TIMEOUT_S = 10.0
OP_NAMES = {1: "dispatch (waiting for peers' rows)", 2: "dispatch (waiting for peers' routing)",
            3: "combine (waiting for peers' rows)", 4: "mega_moe (waiting for peers' inputs)",
            5: "mega_moe (grid barrier)", 6: "mega_moe (tile dependency)",
            7: "mega_moe (waiting for peers' expert outputs)"}
ERROR_WORDS = 4  # [flag, op, rank, missing-rank mask]

_live_buffers: "weakref.WeakSet[SymmetricGroupBuffer]" = weakref.WeakSet()


def check_group_sizes(world_size: int, num_experts: int, **sizes: int) -> None:
    """ValueError/TypeError naming the argument: ``num_experts`` and each of ``sizes`` a positive int,
    1..MAX_RANKS ranks sharing the experts evenly (what every buffer of a process group needs)."""
    for name, value in {"num_experts": num_experts, **sizes}.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name}: expected a positive value, got {value}")
    if not 1 <= world_size <= MAX_RANKS:
        raise ValueError(f"group: expected 1..{MAX_RANKS} ranks, got {world_size}")
    if num_experts % world_size != 0:
        raise ValueError(f"num_experts: expected a multiple of the group size {world_size}, got {num_experts}")


def check_buffer_args(world_size: int, num_experts: int, num_max_tokens_per_rank: int, hidden: int, num_topk: int,
                      dtype: str) -> None:
    """ValueError/TypeError naming the argument for a buffer that cannot be built."""
    check_group_sizes(world_size, num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden,
                      num_topk=num_topk)
    if hidden % SCALE_BLOCK != 0:
        raise ValueError(f"hidden: expected a multiple of {SCALE_BLOCK}, got {hidden}")
    if num_topk > MAX_TOPK:
        raise ValueError(f"num_topk: expected at most {MAX_TOPK}, got {num_topk}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def format_error(record: list[int], timeout_s: float) -> str:
    """The RuntimeError message of an error record [flag, op, rank, missing mask]."""
    _, op, rank, missing = record
    ranks = [r for r in range(32) if (missing >> r) & 1]
    return (f"cute_moe.ep: {OP_NAMES.get(op, f'operation {op}')} on rank {rank} timed out after {timeout_s:g} s; "
            f"ranks that did not arrive: {ranks}")


@dataclass(frozen=True)
class EPHandle:
    """What combine needs from a dispatch: its layout, token count, routing and call number."""

    layout: str
    num_tokens: int
    topk_idx: torch.Tensor
    sequence: int


@dataclass(frozen=True)
class DispatchOutput:
    """Received rows of this rank's local experts (views into the buffer; valid until the next dispatch).

    masked: x [L, max_m, hidden], scales [L, max_m, hidden/128] (FP8, MN-major), masked_m [L].
    psum:   x [psum_rows, hidden], scales [psum_rows, hidden/128] (FP8, MN-major), psum [L]
            (unaligned end of expert e's rows; e starts at align(psum[e-1], alignment)).
    expert_counts [L]: rows routed to each local expert (before clamping to the layout).
    src_info: per row, source rank * num_max_tokens_per_rank + source token (rows in use only).
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    masked_m: torch.Tensor | None
    psum: torch.Tensor | None
    expert_counts: torch.Tensor
    src_info: torch.Tensor
    handle: EPHandle


@lru_cache(maxsize=None)
def _dispatch_fn(geom: EPGeometry, layout: str, idx_bytes: int):
    from cute_moe.kernels.ep_signature import compile_dispatch
    return compile_dispatch(geom, layout, idx_bytes)


@lru_cache(maxsize=None)
def _combine_fn(geom: EPGeometry, idx_bytes: int):
    from cute_moe.kernels.ep_signature import compile_combine
    return compile_combine(geom, idx_bytes)


def _agreed_sm_count(group, device: torch.device) -> int:
    """Smallest SM count in the group: every rank launches the same grid (signal targets depend on it)."""
    import torch.distributed as dist
    sms = torch.tensor([torch.cuda.get_device_properties(device).multi_processor_count], device=device)
    dist.all_reduce(sms, op=dist.ReduceOp.MIN, group=group)
    return int(sms.item())


class SymmetricGroupBuffer:
    """What every symmetric-memory buffer of a process group shares (EP and Mega MoE): the group,
    device and rank, the symmetric allocation and the peers' base addresses (int64 device array), the
    host-mapped error record that a timed-out kernel fills, and the checks that raise it.

    Construction is collective (every rank of ``group``, same arguments)."""

    def __init__(self, group, timeout_s: float):
        import torch.distributed as dist

        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.group, self.timeout_s = group, timeout_s
        self.error = torch.zeros(ERROR_WORDS, dtype=torch.int32, pin_memory=True)
        self.broken: str | None = None

    def allocate_symmetric(self, nbytes: int) -> None:
        """Zeroed symmetric memory of ``nbytes`` on every rank (``self.symm``) and the peers' base
        addresses (``self.peers``); collective."""
        import torch.distributed._symmetric_memory as symm_mem

        self.symm = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.symm.zero_()
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None and not hasattr(enable, "__deprecated__"):  # needed before rendezvous by older torch
            enable(self.group.group_name)
        self.symm_handle = symm_mem.rendezvous(self.symm, self.group)
        self.peers = torch.tensor(list(self.symm_handle.buffer_ptrs), dtype=torch.int64, device=self.device)

    def finish_setup(self) -> None:
        """Every rank's buffer is initialized before any kernel uses it; register for ``synchronize``."""
        import torch.distributed as dist

        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        _live_buffers.add(self)

    # ---- errors -------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise RuntimeError if a kernel of this buffer timed out (reads host memory; no sync)."""
        if self.broken is None and int(self.error[0]) != 0:
            self.broken = format_error([int(v) for v in self.error], self.timeout_s)
        if self.broken is not None:
            raise RuntimeError(self.broken)

    def synchronize(self) -> None:
        """Wait for this device's work, then raise a pending timeout error."""
        torch.cuda.synchronize(self.device)
        self.check()


class EPBuffer(SymmetricGroupBuffer):
    """Symmetric-memory buffers, signal words and compiled kernels of one EP process group.

    Construction is collective (every rank of ``group``, same arguments); so are dispatch and combine.
    """

    def __init__(self, group, num_experts: int, num_max_tokens_per_rank: int, hidden: int, num_topk: int,
                 dtype: str = "bf16", *, alignment: int = 128, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(group, timeout_s)
        check_buffer_args(self.world, num_experts, num_max_tokens_per_rank, hidden, num_topk, dtype)
        self.alignment = check_alignment(alignment)
        self.geom = EPGeometry(self.world, num_experts, num_max_tokens_per_rank, hidden, num_topk, dtype == "fp8",
                               _agreed_sm_count(group, self.device), alignment)
        g = self.geom
        self.allocate_symmetric(g.offsets()["total"])
        zeros = lambda n, dt=torch.int32: torch.zeros(n, dtype=dt, device=self.device)  # noqa: E731
        self.dispatch_calls, self.combine_calls = zeros(g.num_ctas), zeros(g.num_ctas)
        self.slot_row = zeros(g.entries)
        self.scan = zeros(g.num_ctas * g.local_experts)
        self.outputs: dict[str, tuple] = {}
        self.sequence = 0
        self.finish_setup()

    # ---- outputs ------------------------------------------------------------------------------
    def _layout_outputs(self, layout: str) -> tuple:
        """(x, scales, layout counts, expert counts, src_info) of ``layout``, allocated at first use."""
        if layout not in self.outputs:
            g = self.geom
            rows, kb, pitch = g.recv_rows(layout), g.scale_blocks, g.scale_row_pitch(layout)
            L, dev = g.local_experts, self.device
            x = torch.empty(rows, g.hidden, dtype=FP8 if g.fp8 else torch.bfloat16, device=dev)
            scales = None
            if g.fp8:
                groups = L if layout == "masked" else 1
                storage = torch.zeros(groups * kb * pitch, dtype=torch.float32, device=dev)
                per_group = rows // groups
                scales = storage.as_strided((groups, per_group, kb), (kb * pitch, 1, pitch))
                scales = scales if layout == "masked" else scales[0]
            counts = torch.zeros(L, dtype=torch.int32, device=dev)
            expert_counts = torch.zeros(L, dtype=torch.int32, device=dev)
            src_info = torch.full((rows,), -1, dtype=torch.int32, device=dev)
            self.outputs[layout] = (x, scales, counts, expert_counts, src_info)
        return self.outputs[layout]

    # ---- dispatch -----------------------------------------------------------------------------
    def _check_payload(self, x) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.geom
        if g.fp8:
            if not isinstance(x, tuple) or len(x) != 2:
                raise TypeError("x: expected (x_fp8, x_scales) for an fp8 buffer")
            data, scales = x
            check_tensor("x_fp8", data, (FP8,), 2)
            check_tensor("x_scales", scales, (torch.float32,), 2)
            check_shape("x_scales", scales, (data.shape[0], g.scale_blocks))
            check_contiguous("x_scales", scales)
        else:
            if isinstance(x, tuple):
                raise TypeError("x: expected a BF16 tensor for a bf16 buffer, got a tuple")
            data, scales = x, None
            check_tensor("x", data, (torch.bfloat16,), 2)
        if data.shape[1] != g.hidden:
            raise ValueError(f"x: expected hidden {g.hidden}, got shape {tuple(data.shape)}")
        check_contiguous("x", data)
        return data, scales

    def _check_routing(self, num_tokens: int, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        g = self.geom
        if num_tokens > g.max_tokens:
            raise ValueError(f"x: expected at most num_max_tokens_per_rank={g.max_tokens} tokens, got {num_tokens}")
        check_tensor("topk_idx", topk_idx, (torch.int32, torch.int64), 2)
        check_shape("topk_idx", topk_idx, (num_tokens, g.num_topk))
        check_contiguous("topk_idx", topk_idx)
        check_tensor("topk_weights", topk_weights, (torch.float32,), 2)
        check_shape("topk_weights", topk_weights, (num_tokens, g.num_topk))
        check_contiguous("topk_weights", topk_weights)
        if os.environ.get("CUTE_MOE_DEBUG") == "1":
            check_expert_ids("topk_idx", topk_idx.reshape(-1), g.num_experts)  # flat position in the message

    def _check_device(self, **tensors: torch.Tensor) -> None:
        """On this buffer's device; row tensors (x, y, out) 16-byte aligned for the vector loads/stores."""
        for name, t in tensors.items():
            if t is None:
                continue
            if t.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device}, got {t.device}")
            if name in ("x", "y", "out") and t.data_ptr() % VECTOR_BYTES != 0:
                raise ValueError(f"{name}: expected a {VECTOR_BYTES}-byte aligned data pointer, got {t.data_ptr():#x}")

    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor, layout: str = "masked",
                 cumulative_local_expert_recv_stats: torch.Tensor | None = None) -> DispatchOutput:
        """Send each token row to the ranks owning its top-k experts; lay out what this rank receives.

        x: BF16 [T, hidden] (bf16 buffer) or (FP8 E4M3 [T, hidden], FP32 scales [T, hidden/128]).
        topk_idx: int32/int64 [T, num_topk], -1 = dropped slot (any id outside [0, num_experts) is
        dropped in the kernel; CUTE_MOE_DEBUG=1 refuses ids outside [-1, num_experts) on the host).
        topk_weights: FP32 [T, num_topk], applied by combine.
        cumulative_local_expert_recv_stats: optional int32 [local_experts], += rows received.
        """
        self.check()
        check_layout(layout)
        g = self.geom
        data, scales = self._check_payload(x)
        self._check_routing(data.shape[0], topk_idx, topk_weights)
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            check_tensor("cumulative_local_expert_recv_stats", stats, (torch.int32,), 1)
            check_shape("cumulative_local_expert_recv_stats", stats, (g.local_experts,))
        self._check_device(x=data, x_scales=scales, topk_idx=topk_idx, topk_weights=topk_weights,
                           cumulative_local_expert_recv_stats=stats)
        out_x, out_scales, counts, expert_counts, src_info = self._layout_outputs(layout)
        fn = _dispatch_fn(g, layout, topk_idx.element_size())
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        fn(ptr(data), ptr(scales), topk_idx.data_ptr(), topk_weights.data_ptr(), data.shape[0],
           self.peers.data_ptr(), self.rank, self.dispatch_calls, self.slot_row.data_ptr(), self.scan.data_ptr(),
           self.error.data_ptr(),
           out_x.data_ptr(), ptr(out_scales), counts.data_ptr(), expert_counts.data_ptr(), src_info.data_ptr(),
           ptr(stats), int(self.timeout_s * 1e9))
        self.sequence += 1
        x_view = out_x.view(g.local_experts, g.max_m, g.hidden) if layout == "masked" else out_x
        info = src_info.view(g.local_experts, g.max_m) if layout == "masked" else src_info
        handle = EPHandle(layout, data.shape[0], topk_idx, self.sequence)
        return DispatchOutput(x_view, out_scales, counts if layout == "masked" else None,
                              counts if layout == "psum" else None, expert_counts, info, handle)

    # ---- combine ------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, handle: EPHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = sum over t's valid slots of weight * y[row of (t, slot)], FP32 accumulation, BF16.

        y: BF16 in the layout of the dispatch that made ``handle`` ([L, max_m, hidden] masked,
        [psum_rows, hidden] psum); only rows of received entries are read. Tokens with no valid
        slot get zeros.
        """
        self.check()
        g = self.geom
        if not isinstance(handle, EPHandle):
            raise TypeError(f"handle: expected the EPHandle of a dispatch, got {type(handle).__name__}")
        if handle.sequence != self.sequence:
            raise ValueError(f"handle: expected the handle of this buffer's latest dispatch (#{self.sequence}), "
                             f"got #{handle.sequence}")
        expected = (g.local_experts, g.max_m, g.hidden) if handle.layout == "masked" else (g.psum_rows, g.hidden)
        check_tensor("y", y, (torch.bfloat16,), len(expected))
        check_shape("y", y, expected)
        check_contiguous("y", y)
        if out is None:
            out = torch.empty(handle.num_tokens, g.hidden, dtype=torch.bfloat16, device=self.device)
        check_tensor("out", out, (torch.bfloat16,), 2)
        check_shape("out", out, (handle.num_tokens, g.hidden))
        check_contiguous("out", out)
        self._check_device(y=y, out=out)
        fn = _combine_fn(g, handle.topk_idx.element_size())
        fn(y.data_ptr(), handle.topk_idx.data_ptr(), handle.num_tokens, self.peers.data_ptr(), self.rank,
           self.combine_calls, self.dispatch_calls.data_ptr(), self.slot_row.data_ptr(), self.error.data_ptr(),
           out.data_ptr(), int(self.timeout_s * 1e9))
        return out


def synchronize() -> None:
    """Synchronize the current device and raise the first pending EP timeout error of any live buffer."""
    torch.cuda.synchronize()
    for buffer in list(_live_buffers):
        buffer.check()
