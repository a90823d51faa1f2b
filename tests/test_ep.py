"""CPU tests of cute_moe.ep: buffer layout math, argument checks, error records, sm_90a compiles."""

import pytest
import torch

from cute_moe import ep
from cute_moe.ep_layout import ALIGN, COPY_PER_LANE, PARITIES, EPGeometry, align_up
from cute_moe.ep_launch import free_port

GEOMS = [
    EPGeometry(2, 256, 128, 7168, 8, False, 132),
    EPGeometry(2, 256, 128, 7168, 8, True, 132),
    EPGeometry(8, 64, 3, 384, 6, True, 100, alignment=64),
    EPGeometry(1, 4, 1, 128, 8, False, 1),
]


@pytest.mark.parametrize("g", GEOMS)
def test_regions_are_aligned_disjoint_and_sized(g):
    off = g.offsets()
    r, tm, k = g.num_ranks, g.max_tokens, g.num_topk
    sizes = {"routing_arrive": 8 * r, "combine_arrive": 8 * r, "dispatch_tokens": 8 * PARITIES * r,
             "dispatch_flags": 4 * PARITIES * r * tm * g.row_chunks, "expert_counters": 4 * PARITIES * g.local_experts,
             "meta_idx": 4 * PARITIES * r * tm * k, "meta_pos": 4 * PARITIES * r * tm * k,
             "meta_weight": 4 * PARITIES * r * tm * k,
             "dispatch_rows": PARITIES * r * tm * g.row_stride, "combine_rows": PARITIES * r * tm * g.hidden * 2}
    spans = sorted((off[name], off[name] + size) for name, size in sizes.items())
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert all(off[name] % ALIGN == 0 for name in sizes)
    assert spans[-1][1] <= off["total"]


@pytest.mark.parametrize("g", GEOMS)
def test_row_and_layout_sizes(g):
    assert g.row_stride % 16 == 0
    assert g.row_stride >= g.payload_bytes + g.scale_blocks * 4
    assert g.scale_blocks == (g.hidden // 128 if g.fp8 else 0)
    assert g.max_m == g.num_ranks * g.max_tokens
    # worst case: every received token uses min(K, L) distinct experts, each segment padded
    worst = g.num_ranks * g.max_tokens * min(g.num_topk, g.local_experts)
    assert g.psum_rows >= worst + g.local_experts * (g.alignment - 1)
    assert g.psum_rows % g.alignment == 0
    assert g.scale_row_pitch("masked") % 4 == 0 and g.scale_row_pitch("masked") >= g.max_m
    assert g.recv_rows("masked") == g.local_experts * g.max_m
    chunk_bytes = 32 * COPY_PER_LANE * 16  # the chunks (and their arrival flags) cover the payload exactly
    assert (g.row_chunks - 1) * chunk_bytes < g.payload_bytes <= g.row_chunks * chunk_bytes


def test_align_up():
    assert [align_up(x, 128) for x in (0, 1, 128, 129)] == [0, 128, 128, 256]


@pytest.mark.parametrize("args, error, match", [
    ((2, 255, 128, 7168, 8, "bf16"), ValueError, "num_experts: expected a multiple of the group size 2"),
    ((3, 256, 128, 7168, 8, "bf16"), ValueError, "num_experts"),
    ((9, 72, 128, 7168, 8, "bf16"), ValueError, "group: expected 1..8 ranks"),
    ((2, 256, 0, 7168, 8, "bf16"), ValueError, "num_max_tokens_per_rank"),
    ((2, 256, 128, 7000, 8, "bf16"), ValueError, "hidden: expected a multiple of 128"),
    ((2, 256, 128, 7168, 33, "bf16"), ValueError, "num_topk: expected at most 32"),
    ((2, 256, 128, 7168, 8, "fp16"), ValueError, "dtype"),
    ((2, 256.0, 128, 7168, 8, "bf16"), TypeError, "num_experts: expected int"),
    ((2, 256, True, 7168, 8, "bf16"), TypeError, "num_max_tokens_per_rank: expected int"),
])
def test_buffer_argument_errors(args, error, match):
    with pytest.raises(error, match=match):
        ep.check_buffer_args(*args)


def test_buffer_arguments_accepted():
    ep.check_buffer_args(2, 256, 128, 7168, 8, "fp8")
    ep.check_buffer_args(8, 256, 1, 128, 1, "bf16")


def test_layout_names():
    ep.check_layout("masked")
    ep.check_layout("psum")
    with pytest.raises(ValueError, match="layout"):
        ep.check_layout("contiguous")


def test_error_message_names_operation_rank_and_missing_ranks():
    msg = ep.format_error([1, 3, 2, 0b1010], 0.25)
    assert "combine" in msg and "rank 2" in msg and "[1, 3]" in msg and "0.25 s" in msg
    assert "dispatch" in ep.format_error([1, 1, 0, 1], 1.0)


def _host_buffer(fp8: bool = False) -> ep.EPBuffer:
    """An EPBuffer with its host state only (no process group, no symmetric memory): for the checks."""
    buf = ep.EPBuffer.__new__(ep.EPBuffer)
    buf.geom = EPGeometry(2, 16, 8, 256, 4, fp8, 4)
    buf.device, buf.rank, buf.timeout_s, buf.alignment = torch.device("cpu"), 0, 1.0, 128
    buf.error = torch.zeros(ep.ERROR_WORDS, dtype=torch.int32)
    buf.broken, buf.sequence = None, 0
    return buf


def _routing(t=4, k=4, dtype=torch.int64):
    return torch.zeros(t, k, dtype=dtype), torch.ones(t, k)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(x=torch.zeros(4, 256)), TypeError, "x: expected dtype bfloat16"),
    (lambda a: a.update(x=torch.zeros(4, 128, dtype=torch.bfloat16)), ValueError, "x: expected hidden 256"),
    (lambda a: a.update(x=torch.zeros(256, 4, dtype=torch.bfloat16).t()), ValueError, "x: expected a contiguous"),
    (lambda a: a.update(x=torch.zeros(9, 256, dtype=torch.bfloat16)), ValueError, "at most num_max_tokens_per_rank=8"),
    (lambda a: a.update(topk_idx=torch.zeros(4, 4, dtype=torch.int16)), TypeError, "topk_idx: expected dtype"),
    (lambda a: a.update(topk_idx=torch.zeros(4, 3, dtype=torch.int64)), ValueError, "topk_idx: expected shape"),
    (lambda a: a.update(topk_weights=torch.ones(4, 4, dtype=torch.bfloat16)), TypeError, "topk_weights"),
    (lambda a: a.update(topk_weights=torch.ones(5, 4)), ValueError, "topk_weights: expected shape"),
    (lambda a: a.update(layout="contiguous"), ValueError, "layout"),
    (lambda a: a.update(cumulative_local_expert_recv_stats=torch.zeros(7, dtype=torch.int32)), ValueError,
     "cumulative_local_expert_recv_stats: expected shape"),
    (lambda a: a.update(x=(torch.zeros(4, 256, dtype=torch.bfloat16), None)), TypeError, "bf16 buffer"),
])
def test_dispatch_argument_errors(mutate, error, match):
    idx, w = _routing()
    args = dict(x=torch.zeros(4, 256, dtype=torch.bfloat16), topk_idx=idx, topk_weights=w, layout="masked",
                cumulative_local_expert_recv_stats=None)
    mutate(args)
    with pytest.raises(error, match=match):
        _host_buffer().dispatch(**args)


def test_fp8_dispatch_needs_scales():
    buf = _host_buffer(fp8=True)
    idx, w = _routing()
    with pytest.raises(TypeError, match=r"\(x_fp8, x_scales\)"):
        buf.dispatch(torch.zeros(4, 256, dtype=torch.bfloat16), idx, w)
    data = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="x_scales: expected shape"):
        buf.dispatch((data, torch.ones(4, 3)), idx, w)


def test_debug_mode_refuses_out_of_range_ids(monkeypatch):
    monkeypatch.setenv("CUTE_MOE_DEBUG", "1")
    idx, w = _routing()
    idx[2, 1] = 16
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[-1, 16\)"):
        _host_buffer().dispatch(torch.zeros(4, 256, dtype=torch.bfloat16), idx, w)


def test_combine_refuses_a_stale_handle_and_bad_y():
    buf = _host_buffer()
    buf.sequence = 2
    handle = ep.EPHandle("masked", 4, torch.zeros(4, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="latest dispatch"):
        buf.combine(torch.zeros(8, 16, 256, dtype=torch.bfloat16), handle)
    with pytest.raises(TypeError, match="handle"):
        buf.combine(torch.zeros(8, 16, 256, dtype=torch.bfloat16), object())
    fresh = ep.EPHandle("masked", 4, torch.zeros(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"y: expected shape \(8, 16, 256\)"):
        buf.combine(torch.zeros(8, 15, 256, dtype=torch.bfloat16), fresh)
    with pytest.raises(TypeError, match="y: expected dtype bfloat16"):
        buf.combine(torch.zeros(8, 16, 256), fresh)


def test_error_record_raises_and_stays_raised():
    buf = _host_buffer()
    buf.check()
    buf.error.copy_(torch.tensor([1, 1, 0, 0b10], dtype=torch.int32))
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"dispatch .* on rank 0 .* \[1\]"):
            buf.check()
    buf.error.zero_()
    with pytest.raises(RuntimeError, match="dispatch"):
        buf.dispatch(torch.zeros(4, 256, dtype=torch.bfloat16), *_routing())


def test_free_port_is_bindable():
    import socket
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("fp8", [False, True])
def test_kernels_compile_for_sm90a(fp8):
    pytest.importorskip("cutlass")
    from cute_moe.kernels.ep_signature import compile_combine, compile_dispatch
    g = EPGeometry(2, 256, 128, 7168, 8, fp8, 132)
    for layout in ("masked", "psum"):
        for idx_bytes in (4, 8):
            assert compile_dispatch(g, layout, idx_bytes) is not None
    assert compile_combine(g, 8) is not None
    assert compile_combine(EPGeometry(8, 64, 3, 384, 6, fp8, 100), 4) is not None


@pytest.mark.parametrize("layout", ["masked", "psum"])
def test_output_shapes_and_mn_major_scales(layout):
    buf = _host_buffer(fp8=True)
    buf.outputs = {}
    g = buf.geom
    x, scales, counts, expert_counts, src_info = buf._layout_outputs(layout)
    assert x.dtype == torch.float8_e4m3fn and x.shape == (g.recv_rows(layout), g.hidden)
    assert counts.shape == expert_counts.shape == (g.local_experts,)
    assert src_info.shape == (g.recv_rows(layout),)
    pitch = g.scale_row_pitch(layout)
    if layout == "masked":
        assert scales.shape == (g.local_experts, g.max_m, g.scale_blocks)
        assert scales.stride() == (g.scale_blocks * pitch, 1, pitch)
    else:
        assert scales.shape == (g.psum_rows, g.scale_blocks)
        assert scales.stride() == (1, pitch)
    assert buf._layout_outputs(layout)[0] is x  # allocated once: stable addresses for CUDA graphs


def test_bench_markdown_has_a_line_per_row():
    from cute_moe.tools.bench_ep import _markdown
    rows = [dict(mode="low-latency", dtype="bf16", tokens=t, op=op, ours_us=10.0, nccl_us=300.0, padded_us=40.0,
                 bytes_per_rank=2_000_000, fixed_us=6.5, eager_us=17.0)
            for t in (1, 128) for op in ("dispatch", "combine")]
    text = _markdown(rows, 2)
    assert text.count("| low-latency | bf16 |") == 4
    assert "| 10.0 | 6.5 | 17.0 | 300.0 | 40.0 | 200 | 30.0x | 4.0x |" in text
