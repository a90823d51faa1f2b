"""torch.library registration of every public kernel op, on the CPU.

The inventory: every public callable of ``cute_moe`` outside the layout helpers is a custom op
``torch.ops.cute_moe.<name>`` or is listed below with the reason it is not. For the ops registered
for issue 11 (the five FP4-weight GEMMs and ``tf32_hc_prenorm_gemm``): ``torch.library.opcheck``
(fake tensor, AOT dispatch, and schema where torch can compare the inputs) and
``torch.compile(fullgraph=True)`` of the public functions, with the launches replaced by CPU math
(the custom ops look their launcher up at call time). The layout helpers: pure torch, and the
per-step ones trace with ``fullgraph=True``.
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cute_moe
from cute_moe import hc, layouts, ops
from cute_moe.fp4_ops import FP4_OPS

bf16, f32 = torch.bfloat16, torch.float32
OPCHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")

# Public names that are not ops, and why (docs/training.md, "torch.library").
NOT_OPS = {
    "EPBuffer": "a stateful buffer over symmetric memory; dispatch / combine are its methods (out of scope)",
    "MegaMoEBuffer": "the Mega MoE buffer over symmetric memory (a type)",
    "get_symm_buffer_for_mega_moe": "builds a MegaMoEBuffer (collective; launches no kernel)",
    "transform_weights_for_mega_moe": "re-lays out weights with torch ops (launches no kernel of ours)",
    "fp8_mega_moe": "collective over a MegaMoEBuffer (a Python object a custom op cannot take), as EPBuffer's ops",
    "bf16_mega_moe": "collective over a MegaMoEBuffer (a Python object a custom op cannot take), as EPBuffer's ops",
    "fp8_fp4_mega_moe": "collective over a MegaMoEBuffer (a Python object a custom op cannot take), as EPBuffer's ops",
    "GemmSpec": "a value type",
    "KernelConfig": "the backend's config type",
    "nn": "the modules MoE and HyperConnection, over moe and hc_pre / hc_post",
}
# Public functions traced by torch.compile through the custom ops they call.
TRACED_THROUGH = {
    "moe": ("gathered_swiglu_grouped_mm", "gathered_swiglu_backward_mm", "grouped_mm",
            "k_grouped_bf16_gemm_tn_contiguous"),
}
GROUPED_MM_FORMS = ("grouped_mm_n_major_b", "grouped_mm_k_offs")  # op-table entries that grouped_mm routes to
WRITTEN_ARGS = {**{name: ("d",) for name in FP4_OPS}, "tf32_hc_prenorm_gemm": ("d", "sqr_sum")}

G, N, K = 3, 64, 256  # K: two 128-wide FP8 scale blocks, eight 32-wide MXFP4 blocks
M_DENSE, M_CONTIGUOUS, MAX_M = 24, 384, 16
PSUM_ENDS = (100, 200, 350)  # with 128-row alignment: rows [0, 100), [128, 200), [256, 350)
MASKED_M = (5, 0, 16)


def _registered(name: str) -> bool:
    return hasattr(torch.ops.cute_moe, name)


# ------------------------------------------------------------------ the inventory
def test_every_public_kernel_op_is_a_custom_op():
    """A new public function that launches a kernel fails here until it is registered (or listed)."""
    for name in cute_moe.__all__:
        if name in layouts.__all__ or name in NOT_OPS:
            continue
        assert inspect.isfunction(getattr(cute_moe, name)), f"{name}: a public non-function missing from NOT_OPS"
        if name in TRACED_THROUGH:
            assert not _registered(name), f"{name}: registered now, drop it from TRACED_THROUGH"
            for op in TRACED_THROUGH[name]:
                assert _registered(op), f"{name} calls {op}, which is not a custom op"
            continue
        assert _registered(name), f"{name}: a public op without torch.ops.cute_moe.{name}"


def test_the_exemption_lists_name_public_objects_only():
    for name in (*NOT_OPS, *TRACED_THROUGH):
        assert name in cute_moe.__all__, f"{name}: not public any more, drop it from the test's lists"


def test_every_op_table_entry_is_reachable_through_a_custom_op():
    for name in (*ops.OPS, *FP4_OPS):
        if name in GROUPED_MM_FORMS:
            assert f'OPS["{name}"]' in inspect.getsource(ops.grouped_mm) and _registered("grouped_mm")
            continue
        assert _registered(name), f"op table entry {name} has no custom op"


@pytest.mark.parametrize("name", sorted(WRITTEN_ARGS))
def test_schema_marks_exactly_the_outputs_as_written(name):
    schema = getattr(torch.ops.cute_moe, name).default._schema
    written = tuple(arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write)
    assert written == WRITTEN_ARGS[name]
    assert len(schema.returns) == 0


def test_layout_helpers_are_pure_torch():
    """The layout helpers need no custom op: their modules import torch, the standard library and
    each other, never the rest of cute_moe (runtime, launcher, kernels) or the DSL."""
    folder = Path(layouts.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name}: imports from outside layouts/ ({ast.unparse(node)})"
                roots = [node.module.split(".")[0]] if node.level == 0 else []
            else:
                continue
            for root in roots:
                assert root not in ("cute_moe", "cutlass", "tvm_ffi", "cuda"), f"{path.name}: imports {root}"


def _routing():
    return torch.tensor([[0, 2], [2, -1], [0, 1], [2, 0], [1, 2]])  # 5 tokens, top-2, a dropped slot


def _masked_routing():
    return cute_moe.build_masked_layout(_routing(), G, MAX_M)


def _masked_fields(layout):
    return layout.permuted_rows, layout.inverse_map, layout.masked_m, layout.expert_counts, layout.overflow


# (name, function, inputs): the layout helpers a training or inference step calls on activations.
PER_STEP_LAYOUT_HELPERS = [
    ("per_token_cast_to_fp8", cute_moe.per_token_cast_to_fp8, lambda: (torch.randn(32, 256),)),
    ("per_block_cast_to_fp8", cute_moe.per_block_cast_to_fp8, lambda: (torch.randn(200, 256),)),
    ("per_channel_cast_to_fp8", cute_moe.per_channel_cast_to_fp8, lambda: (torch.randn(256, 32),)),
    ("transform_sf_into_required_layout",
     lambda sf: cute_moe.transform_sf_into_required_layout(sf, 32, 256, (1, 128)), lambda: (torch.rand(32, 2),)),
    ("get_mn_major_tma_aligned_tensor", cute_moe.get_mn_major_tma_aligned_tensor, lambda: (torch.rand(3, 36, 2),)),
    ("masked_m_to_psum", lambda m: cute_moe.masked_m_to_psum(m, 128),
     lambda: (torch.tensor(MASKED_M, dtype=torch.int32),)),
    ("psum_to_grouped_layout", lambda p: cute_moe.psum_to_grouped_layout(p, M_CONTIGUOUS, 128),
     lambda: (torch.tensor(PSUM_ENDS, dtype=torch.int32),)),
    ("build_masked_layout", lambda idx: _masked_fields(cute_moe.build_masked_layout(idx, G, MAX_M)),
     lambda: (_routing(),)),
    ("permute_tokens", lambda x: cute_moe.permute_tokens(x, _masked_routing()), lambda: (torch.randn(5, 64),)),
    ("unpermute_and_reduce", lambda y, w: cute_moe.unpermute_and_reduce(y, _masked_routing(), w),
     lambda: (torch.randn(G, MAX_M, 64), torch.rand(5, 2))),
    ("layout_masked_to_psum", lambda y, p: cute_moe.layout_masked_to_psum(y, p, 128),
     lambda: (torch.randn(G, MAX_M, 64), cute_moe.masked_m_to_psum(torch.tensor(MASKED_M, dtype=torch.int32), 128))),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("name,fn,inputs", PER_STEP_LAYOUT_HELPERS, ids=[c[0] for c in PER_STEP_LAYOUT_HELPERS])
def test_per_step_layout_helpers_trace_fullgraph(name, fn, inputs):
    """Pure torch, traced without a graph break and equal to eager (docs list the weight-side helpers
    that check values on the host, and build_contiguous_layout, whose row count depends on values)."""
    torch._dynamo.reset()
    args = inputs()
    expected = fn(*args)
    got = torch.compile(fn, fullgraph=True, backend="eager")(*args)
    expected, got = (x if isinstance(x, tuple) else (x,) for x in (expected, got))
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert torch.equal(_bits(g), _bits(e)), name


# ------------------------------------------------------------------ CPU math in place of the launches
def _dequant(operand) -> torch.Tensor:
    """An operand in float32: a BF16 tensor, (E4M3, FP32 scales per row per 128 K) or (packed E2M1,
    UE8M0 exponents per row per 32 K)."""
    if isinstance(operand, torch.Tensor):
        return operand.float()
    t, sf = operand
    if t.dtype == torch.float8_e4m3fn:
        return cute_moe.per_token_dequant(t, sf)
    return cute_moe.per_token_dequant_fp4(t, cute_moe.ue8m0_to_float(sf))


def _dense(a, b, d, c=None):
    d.copy_(_dequant(a) @ _dequant(b).T + (0 if c is None else c.float()))


def _contiguous(a, b, d, grouped_layout, use_psum_layout):
    a, b = _dequant(a), _dequant(b)
    rows_expert = (cute_moe.psum_to_grouped_layout(grouped_layout, a.shape[0]) if use_psum_layout
                   else grouped_layout)
    for g in range(b.shape[0]):
        rows = rows_expert == g
        d[rows] = (a[rows] @ b[g].T).to(d.dtype)


def _masked(a, b, d, masked_m, expected_m):
    a, b = _dequant(a), _dequant(b)
    for g, m in enumerate(masked_m.tolist()):
        d[g, :m] = (a[g, :m] @ b[g].T).to(d.dtype)


def _prenorm(a, b, d, sqr_sum, num_splits):
    """Split s sums over the s-th contiguous range of K (d [S, M, N], sqr_sum [S, M]); unsplit: the totals."""
    parts = zip(a.float().tensor_split(num_splits or 1, dim=1), b.tensor_split(num_splits or 1, dim=1))
    sums = [(ak @ bk.T, ak.square().sum(-1)) for ak, bk in parts]
    if num_splits is None:
        d.copy_(sums[0][0])
        sqr_sum.copy_(sums[0][1])
        return
    for s, (part_d, part_sqr) in enumerate(sums):
        d[s], sqr_sum[s] = part_d, part_sqr


def _mock_launches(monkeypatch):
    for name in FP4_OPS:
        kind = _dense if name == "fp8_fp4_gemm_nt" else _contiguous if name.endswith("contiguous") else _masked
        monkeypatch.setitem(FP4_OPS, name, kind)
    monkeypatch.setattr(hc, "_prenorm_gemm", _prenorm)


# ------------------------------------------------------------------ operands
def _fp8(*shape):
    """(E4M3, FP32 per-row-per-128 scales) of values spanning a few orders of magnitude."""
    x = torch.randn(*shape) * torch.logspace(-2, 2, shape[-2]).unsqueeze(-1)
    return cute_moe.per_token_cast_to_fp8(x)


def _fp4(*shape):
    """(packed E2M1 int8, UE8M0 exponents uint8) of varied magnitudes."""
    x = torch.randn(*shape) * torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)
    packed, sf = cute_moe.per_token_cast_to_fp4(x)
    return packed, cute_moe.float_to_ue8m0(sf)


def _bf16(*shape):
    return torch.randn(*shape).to(bf16)


def _nan(*shape, dtype=bf16):
    return torch.full(shape, float("nan"), dtype=dtype)


def _row_experts():
    """Per-row experts of a contiguous layout: uneven segments, an empty expert, -1 padding rows."""
    layout = torch.full((M_CONTIGUOUS,), -1, dtype=torch.int32)
    layout[:100], layout[256:300] = 0, 2
    return layout


def _psum():
    return torch.tensor(PSUM_ENDS, dtype=torch.int32)


def _masked_m():
    return torch.tensor(MASKED_M, dtype=torch.int32)


# ------------------------------------------------------------------ opcheck
def _opcheck_cases():
    """(op name, custom-op arguments): the public arguments with the pairs split."""
    (a8, sfa), (b4, sfb) = _fp8(M_DENSE, K), _fp4(N, K)
    (a8c, sfac), (a8m, sfam) = _fp8(M_CONTIGUOUS, K), _fp8(G, MAX_M, K)
    (b4g, sfbg) = _fp4(G, N, K)
    a_hc = _bf16(M_DENSE, K)
    b_hc = torch.randn(N, K)
    return [
        ("fp8_fp4_gemm_nt", (a8, sfa, b4, sfb, _nan(M_DENSE, N), None)),
        ("fp8_fp4_gemm_nt", (a8, sfa, b4, sfb, _nan(M_DENSE, N, dtype=f32), torch.randn(M_DENSE, N))),
        ("m_grouped_fp8_fp4_gemm_nt_contiguous", (a8c, sfac, b4g, sfbg, _nan(M_CONTIGUOUS, N), _row_experts(), False)),
        ("m_grouped_fp8_fp4_gemm_nt_contiguous", (a8c, sfac, b4g, sfbg, _nan(M_CONTIGUOUS, N), _psum(), True)),
        ("m_grouped_fp8_fp4_gemm_nt_masked", (a8m, sfam, b4g, sfbg, _nan(G, MAX_M, N), _masked_m(), 8)),
        ("m_grouped_bf16_fp4_gemm_nt_contiguous", (_bf16(M_CONTIGUOUS, K), b4g, sfbg, _nan(M_CONTIGUOUS, N, dtype=f32),
                                                   _row_experts(), False)),
        ("m_grouped_bf16_fp4_gemm_nt_masked", (_bf16(G, MAX_M, K), b4g, sfbg, _nan(G, MAX_M, N), _masked_m(), 8)),
        ("tf32_hc_prenorm_gemm", (a_hc, b_hc, _nan(M_DENSE, N, dtype=f32), _nan(M_DENSE, dtype=f32), None)),
        ("tf32_hc_prenorm_gemm", (a_hc, b_hc, _nan(2, M_DENSE, N, dtype=f32), _nan(2, M_DENSE, dtype=f32), 2)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())),
                         ids=[f"{name}-{i}" for i, (name, _) in enumerate(_opcheck_cases())])
def test_opcheck(monkeypatch, case):
    _mock_launches(monkeypatch)
    torch.manual_seed(case)
    name, args = _opcheck_cases()[case]
    # test_schema compares every input before and after with allclose, which torch lacks for E4M3 on the
    # CPU: the FP8-input ops skip it (test_schema_marks_exactly_the_outputs_as_written covers them).
    has_fp8 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float8_e4m3fn for t in args)
    checks = tuple(c for c in OPCHECKS if not (has_fp8 and c == "test_schema"))
    torch.library.opcheck(getattr(torch.ops.cute_moe, name), args, test_utils=checks)


def test_fakes_on_cuda_fake_tensors_write_nothing():
    """Under FakeTensorMode (what torch.compile traces with) the ops return nothing and leave their
    outputs' metadata alone."""
    with FakeTensorMode():
        cuda = dict(device="cuda")
        a8, sfa = torch.empty(G, MAX_M, K, dtype=torch.float8_e4m3fn, **cuda), torch.empty(G, MAX_M, 2, **cuda)
        b4, sfb = torch.empty(G, N, K // 2, dtype=torch.int8, **cuda), torch.empty(G, N, K // 32, dtype=torch.uint8,
                                                                                  **cuda)
        d, masked_m = torch.empty(G, MAX_M, N, dtype=bf16, **cuda), torch.empty(G, dtype=torch.int32, **cuda)
        assert torch.ops.cute_moe.m_grouped_fp8_fp4_gemm_nt_masked(a8, sfa, b4, sfb, d, masked_m, 8) is None
        assert (d.shape, d.dtype, d.device.type) == ((G, MAX_M, N), bf16, "cuda")
        a, b = torch.empty(M_DENSE, K, dtype=bf16, **cuda), torch.empty(N, K, **cuda)
        d, sqr = torch.empty(2, M_DENSE, N, **cuda), torch.empty(2, M_DENSE, **cuda)
        assert torch.ops.cute_moe.tf32_hc_prenorm_gemm(a, b, d, sqr, 2) is None
        assert (d.shape, sqr.shape) == ((2, M_DENSE, N), (2, M_DENSE))


# ------------------------------------------------------------------ torch.compile(fullgraph=True)
def _fp4_and_hc_step(a8, a8c, a8m, a16c, a16m, w, wg, row_experts, psum, masked_m, a_hc, b_hc):
    """Every newly registered public op once, through its public function (outputs NaN-poisoned)."""
    dense = torch.full((a8[0].shape[0], w[0].shape[0]), float("nan"), dtype=f32)
    cute_moe.fp8_fp4_gemm_nt(a8, w, dense, torch.ones_like(dense), recipe_a=(1, 128), recipe_b=(1, 32))
    contiguous_rows = torch.full((a8c[0].shape[0], N), float("nan"), dtype=bf16)
    cute_moe.m_grouped_fp8_fp4_gemm_nt_contiguous(a8c, wg, contiguous_rows, row_experts)
    contiguous_psum = torch.full((a16c.shape[0], N), float("nan"), dtype=f32)
    cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a16c, wg, contiguous_psum, psum, use_psum_layout=True)
    masked8 = torch.full((G, MAX_M, N), float("nan"), dtype=bf16)
    cute_moe.m_grouped_fp8_fp4_gemm_nt_masked(a8m, wg, masked8, masked_m, 8)
    masked16 = torch.full((G, MAX_M, N), float("nan"), dtype=bf16)
    cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a16m, wg, masked16, masked_m, 8)
    hc_d, hc_sqr = torch.empty(a_hc.shape[0], N), torch.empty(a_hc.shape[0])
    cute_moe.tf32_hc_prenorm_gemm(a_hc, b_hc, hc_d, hc_sqr)
    split_d, split_sqr = torch.empty(2, a_hc.shape[0], N), torch.empty(2, a_hc.shape[0])
    cute_moe.tf32_hc_prenorm_gemm(a_hc, b_hc, split_d, split_sqr, num_splits=2)
    return dense, contiguous_rows, contiguous_psum, masked8, masked16, hc_d, hc_sqr, split_d, split_sqr


def _step_inputs():
    return (_fp8(M_DENSE, K), _fp8(M_CONTIGUOUS, K), _fp8(G, MAX_M, K), _bf16(M_CONTIGUOUS, K), _bf16(G, MAX_M, K),
            _fp4(N, K), _fp4(G, N, K), _row_experts(), _psum(), _masked_m(), _bf16(M_DENSE, K), torch.randn(N, K))


def _graph_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_traces_the_fp4_and_hc_ops(monkeypatch, backend):
    _mock_launches(monkeypatch)
    torch.manual_seed(0)
    inputs = _step_inputs()
    expected = _fp4_and_hc_step(*inputs)
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    got = torch.compile(_fp4_and_hc_step, fullgraph=True, backend=recording_backend)(*inputs)
    assert len(graphs) == 1
    traced = " ".join(_graph_ops(graphs[0]))
    for name in WRITTEN_ARGS:
        assert f"cute_moe.{name}" in traced, name
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
    dense, rows, psum_rows, masked8, masked16, hc_d, hc_sqr, split_d, split_sqr = got
    assert torch.isfinite(dense).all() and torch.isfinite(hc_d).all()
    layout = _row_experts()
    assert torch.isfinite(rows[layout >= 0]).all() and torch.isnan(rows[layout < 0]).all()  # -1 rows unwritten
    psum_layout = cute_moe.psum_to_grouped_layout(_psum(), M_CONTIGUOUS)
    assert torch.isfinite(psum_rows[psum_layout >= 0]).all() and torch.isnan(psum_rows[psum_layout < 0]).all()
    for masked in (masked8, masked16):
        for g, m in enumerate(MASKED_M):
            assert torch.isfinite(masked[g, :m]).all() and torch.isnan(masked[g, m:]).all()
    torch.testing.assert_close(split_d.sum(0), hc_d, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(split_sqr.sum(0), hc_sqr, rtol=1e-5, atol=1e-4)


def test_bad_arguments_are_refused_at_run_time_under_compile():
    """Tracing skips the checks (fakes); the custom op's implementation runs them on the real
    tensors, so a bad argument still raises the error that names it."""
    def masked_step(a, w, d, masked_m):
        cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, w, d, masked_m, 8)
        return d

    torch._dynamo.reset()
    compiled = torch.compile(masked_step, fullgraph=True, backend="aot_eager")
    a, w, d = _bf16(G, MAX_M, K), _fp4(G, N, K), _nan(G, MAX_M, N)
    with pytest.raises(TypeError, match=r"^masked_m: expected dtype int32, got int64"):
        compiled(a, w, d, _masked_m().long())
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):  # valid CPU arguments: the device check
        compiled(a, w, d, _masked_m())
