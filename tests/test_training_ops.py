"""Training GEMMs on the CPU: argument validation (errors name the argument), the torch.library
custom ops' fake implementations, and torch.compile(fullgraph=True) tracing with the launch mocked."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cute_moe
from cute_moe import ops
from cute_moe.library import CUSTOM_OPS

bf16 = torch.bfloat16


def z(*shape, dtype=bf16):
    return torch.zeros(*shape, dtype=dtype)


# ------------------------------------------------------------------ validation (CPU: before any launch)
@pytest.mark.parametrize("fn,a,b,match", [
    (cute_moe.bf16_gemm_nn, z(8, 64), z(48, 32),
     r"^a: expected K=48 \(from b of shape \(48, 32\) as \[\.\., K, MN\]\)"),
    (cute_moe.bf16_gemm_tn, z(64, 8), z(48, 32), r"^a: expected K=48 .* got a of shape \(64, 8\) as \[\.\., K, MN\]"),
    (cute_moe.bf16_gemm_tt, z(64, 8), z(32, 48), r"^a: expected K=48"),
])
def test_transposed_dense_k_mismatch_names_a(fn, a, b, match):
    with pytest.raises(ValueError, match=match):
        fn(a, b, z(8, 32))


def test_tn_needs_m_in_whole_16_byte_units():
    match = r"^a: expected M \(a \[K, M\] is read in 16-byte rows\) to be a multiple of 8, got 12"
    with pytest.raises(ValueError, match=match):
        cute_moe.bf16_gemm_tn(z(64, 12), z(64, 32), z(12, 32))


def test_nn_output_shape_and_cpu_device_are_refused():
    with pytest.raises(ValueError, match=r"^d: expected shape \(8, 32\)"):
        cute_moe.bf16_gemm_nn(z(8, 64), z(64, 32), z(8, 16))
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.bf16_gemm_nn(z(8, 64), z(64, 32), z(8, 32))


def test_nn_contiguous_takes_b_as_g_k_n():
    a, d, layout = z(128, 64), z(128, 32), torch.zeros(128, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^a: expected K=32"):
        cute_moe.m_grouped_bf16_gemm_nn_contiguous(a, z(2, 32, 64), d, layout)  # [G, N, K] given
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.m_grouped_bf16_gemm_nn_contiguous(a, z(2, 64, 32), d, layout)


def k_grouped_args(ks=(3, 0, 13), m=16, n=24):
    total = sum(ks)
    d = z(len(ks), m, n, dtype=torch.float32)
    return z(total, m), z(total, n), d, list(ks), torch.tensor(ks, dtype=torch.int32)


@pytest.mark.parametrize("change,error,match", [
    (dict(ks=[3, 0, 12]), ValueError, r"^ks: expected non-negative sizes summing to 16"),
    (dict(ks=[3, 13]), ValueError, r"^ks: expected 3 group sizes"),
    (dict(ks=[3, -1, 14]), ValueError, r"^ks: expected non-negative"),
    (dict(ks=(3.0, 0, 13)), TypeError, r"^ks: expected a list of ints"),
    (dict(d=z(3, 16, 24, dtype=torch.float16)), TypeError, r"^d: expected dtype bfloat16 or float32"),
    (dict(d=z(3, 16, 16, dtype=torch.float32)), ValueError, r"^d: expected shape \(3, 16, 24\)"),
    (dict(b=z(15, 24)), ValueError, r"^b: expected 16 rows"),
    (dict(ks_tensor=torch.zeros(3, dtype=torch.int64)), TypeError, r"^ks_tensor: expected dtype int32"),
    (dict(ks_tensor=torch.zeros(2, dtype=torch.int32)), ValueError, r"^ks_tensor: expected shape \(3,\)"),
    (dict(c=z(3, 16, 24)), TypeError, r"^c: expected dtype float32"),  # c in d's dtype
    (dict(a=z(16, 12), d=z(3, 12, 24, dtype=torch.float32)), ValueError, r"^a: expected M to be a multiple of 8"),
    (dict(), ValueError, r"^a: expected a CUDA tensor"),
    (dict(ks=None), ValueError, r"^a: expected a CUDA tensor"),  # sizes known on the device only
])
def test_k_grouped_validation_names_the_argument(change, error, match):
    a, b, d, ks, ks_tensor = k_grouped_args()
    args = dict(a=a, b=b, d=d, ks=ks, ks_tensor=ks_tensor, c=None, **{})
    args.update(change)
    with pytest.raises(error, match=match):
        cute_moe.k_grouped_bf16_gemm_tn_contiguous(**args)


def test_grouped_mm_2d_2d_validation():
    offs = torch.tensor([4, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^a: expected sum K .* to be a multiple of 8, got 12"):
        cute_moe.grouped_mm(z(16, 12), z(12, 24), offs)
    with pytest.raises(ValueError, match=r"^b: expected 16 rows"):
        cute_moe.grouped_mm(z(16, 16), z(8, 24), offs)
    with pytest.raises(TypeError, match=r"^offs: expected dtype int32"):
        cute_moe.grouped_mm(z(16, 16), z(16, 24), offs.long())
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.grouped_mm(z(16, 16), z(16, 24), offs)


def test_grouped_mm_accepts_n_major_b_until_the_device_check():
    offs = torch.tensor([4, 16], dtype=torch.int32)
    b = z(2, 64, 32)  # row-major [G, K, N]: N contiguous
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.grouped_mm(z(16, 64), b, offs)
    with pytest.raises(ValueError, match=r"^b: grouped_mm expects b as \[G, K, N\]"):
        cute_moe.grouped_mm(z(16, 48), b, offs)


# ------------------------------------------------------------------ torch.library: fake implementations
def test_every_public_gemm_is_a_custom_op():
    for name in CUSTOM_OPS:
        assert hasattr(torch.ops.cute_moe, name)
        assert hasattr(cute_moe, name), name


def test_grouped_mm_fake_propagates_shapes_and_dtypes():
    with FakeTensorMode():
        offs = torch.empty(4, dtype=torch.int32, device="cuda")
        out = torch.ops.cute_moe.grouped_mm(torch.empty(100, 64, dtype=bf16, device="cuda"),
                                            torch.empty(4, 64, 48, dtype=bf16, device="cuda"), offs, None)
        assert (out.shape, out.dtype, out.device.type) == ((100, 48), bf16, "cuda")
        out = torch.ops.cute_moe.grouped_mm(torch.empty(32, 96, dtype=bf16, device="cuda"),
                                            torch.empty(96, 40, dtype=bf16, device="cuda"), offs, torch.float32)
        assert (out.shape, out.dtype) == ((4, 32, 40), torch.float32)


def test_mutating_fakes_return_nothing_and_leave_d_alone():
    with FakeTensorMode():
        a, b, d = (torch.empty(16, 32, dtype=bf16, device="cuda"), torch.empty(32, 24, dtype=bf16, device="cuda"),
                   torch.empty(16, 24, dtype=bf16, device="cuda"))
        assert torch.ops.cute_moe.bf16_gemm_nn(a, b, d, None) is None
        assert d.shape == (16, 24)


# ------------------------------------------------------------------ torch.compile with the launch mocked
def _mock_launches(monkeypatch):
    """Replace the kernels by CPU math (the custom ops' implementations look OPS up at call time)."""
    def dense(trans_a, trans_b):
        def run(a, b, d, c=None):
            a = a.float().t() if trans_a else a.float()
            b = b.float() if trans_b else b.float().t()
            d.copy_(a @ b + (c.float() if c is not None else 0))
        return run

    def k_grouped(a, b, d, ks, ks_tensor, c=None):
        start = 0
        for g, rows in enumerate(ks):
            d[g] = a[start:start + rows].float().t() @ b[start:start + rows].float() + (c[g] if c is not None else 0)
            start += rows

    def grouped_mm_k(a, b, offs, out_dtype=None):
        ends = [0] + offs.tolist()
        return torch.stack([a[:, s:e].float() @ b[s:e].float() for s, e in zip(ends, ends[1:])]).to(out_dtype or bf16)

    monkeypatch.setitem(ops.OPS, "bf16_gemm_nt", dense(False, False))
    monkeypatch.setitem(ops.OPS, "bf16_gemm_nn", dense(False, True))
    monkeypatch.setitem(ops.OPS, "bf16_gemm_tn", dense(True, True))
    monkeypatch.setitem(ops.OPS, "k_grouped_bf16_gemm_tn_contiguous", k_grouped)
    monkeypatch.setitem(ops.OPS, "grouped_mm_k_offs", grouped_mm_k)


def _weight_and_input_grads(x, dy, w, ks, ks_tensor, offs):
    """A backward step written with the public ops: dX = dY . W (nn), dW per group (k-grouped), dW via
    grouped_mm (2-D x 2-D), and a tn product."""
    dx = torch.empty(dy.shape[0], w.shape[1], dtype=bf16)
    cute_moe.bf16_gemm_nn(dy, w, dx)
    dw = torch.empty(len(ks), x.shape[1], dy.shape[1], dtype=torch.float32)
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(x, dy, dw, ks, ks_tensor)
    dw2 = cute_moe.grouped_mm(x.t().contiguous(), dy, offs, torch.float32)
    xtx = torch.empty(x.shape[1], x.shape[1], dtype=torch.float32)
    cute_moe.bf16_gemm_tn(x, x, xtx)
    return dx, dw, dw2, xtx


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_traces_the_training_ops(monkeypatch, backend):
    _mock_launches(monkeypatch)
    torch.manual_seed(0)
    ks = [5, 0, 11]
    x, dy, w = torch.randn(16, 8).to(bf16), torch.randn(16, 24).to(bf16), torch.randn(24, 8).to(bf16)
    ks_tensor, offs = torch.tensor(ks, dtype=torch.int32), torch.tensor([5, 5, 16], dtype=torch.int32)
    expected = _weight_and_input_grads(x, dy, w, ks, ks_tensor, offs)
    torch._dynamo.reset()
    compiled = torch.compile(_weight_and_input_grads, fullgraph=True, backend=backend)
    got = compiled(x, dy, w, ks, ks_tensor, offs)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    assert torch.equal(got[1][1], torch.zeros_like(got[1][1]))  # the empty group
    torch.testing.assert_close(got[2], got[1].to(got[2].dtype), rtol=1e-2, atol=1e-2)


def test_opcheck_k_grouped_grouped_mm_and_nn(monkeypatch):
    _mock_launches(monkeypatch)
    torch.library.opcheck(torch.ops.cute_moe.bf16_gemm_nn,
                          (torch.randn(8, 16).to(bf16), torch.randn(16, 24).to(bf16), z(8, 24), None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    a, b, d, ks, ks_tensor = k_grouped_args()
    a, b = torch.randn(a.shape).to(bf16), torch.randn(b.shape).to(bf16)
    torch.library.opcheck(torch.ops.cute_moe.k_grouped_bf16_gemm_tn_contiguous, (a, b, d, ks, ks_tensor, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    offs = torch.tensor([3, 3, 16], dtype=torch.int32)
    torch.library.opcheck(torch.ops.cute_moe.grouped_mm, (a.t().contiguous(), b, offs, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
