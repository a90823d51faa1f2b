"""The MoE layer benchmark on the CPU (tools/bench_moe_layer.py): arguments, the FLOP formula, the
router, the torch._grouped_mm reference layer against moe_reference (forward and the four gradients,
eagerly and traced by torch.compile), the saved-tensor accounting, and one shape end to end with
CPU stand-ins for the GPU pieces."""

import functools
import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cute_moe.moe_layer import moe_reference
from cute_moe.testing import calc_diff
from cute_moe.tools import bench_moe_layer as bench, cli
from cute_moe.tools.autograd_memory import saved_tensor_bytes
from cute_moe.tools.grouped_mm_moe import grouped_mm_moe, permute_by_expert, permuted_rows

T, H, I, E, TOPK = 37, 32, 24, 5, 3
EMPTY_EXPERT = 3


def _inputs(dtype=torch.float32, seed=0):
    """x, topk_idx (an expert without tokens, dropped slots: -1 and ids >= E), topk_weights, w13, w2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    logits = torch.randn(T, E, generator=gen)
    logits[:, EMPTY_EXPERT] = -1e9
    weights, idx = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    idx[::4, 1] = -1
    idx[1::5, 2] = E + 2
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    return x, idx.to(torch.int32), weights, w13, w2


def _run(layer, x, idx, weights, w13, w2, grad):
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    out = layer(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


# --- arguments -----------------------------------------------------------------------------------

def test_shape_selection():
    assert [s.name for s in bench.select_shapes(None, False, None)] == list(bench.SHAPES)
    assert [s.name for s in bench.select_shapes(None, True, None)] == list(bench.QUICK_SHAPES)
    chosen = bench.select_shapes("qwen3-30b-a3b, deepseek-v3-ep8,Qwen3-30B-A3B", False, 1000)
    assert [(s.name, s.tokens) for s in chosen] == [("Qwen3-30B-A3B", 1000), ("DeepSeek-V3-EP8", 1000)]
    assert bench.select_shapes("ALL", True, None) == list(bench.SHAPES.values())
    olmoe = bench.SHAPES["OLMoE-1B-7B"]
    assert (olmoe.tokens, olmoe.hidden, olmoe.intermediate, olmoe.experts, olmoe.top_k) == (32768, 2048, 1024, 64, 8)
    deepseek = bench.SHAPES["DeepSeek-V3-EP8"]
    assert (deepseek.hidden, deepseek.intermediate, deepseek.experts, deepseek.top_k) == (7168, 2048, 32, 8)
    with pytest.raises(ValueError, match=r"^--shapes: unknown shape 'nope'; expected among OLMoE-1B-7B"):
        bench.select_shapes("olmoe-1b-7b,nope", False, None)
    with pytest.raises(ValueError, match=r"^--tokens: expected >= 1, got 0"):
        bench.select_shapes(None, False, 0)


def _failure(capsys, argv):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and not captured.out
    assert len(captured.err.splitlines()) == 1, captured.err
    return info.value.code, captured.err.strip()


@pytest.mark.parametrize("argv,code,message", [
    (["--shapes", "nope"], 2, "cute-moe bench-layer: error: --shapes: unknown shape 'nope'"),
    (["--tokens", "-3"], 2, "cute-moe bench-layer: error: --tokens: expected >= 1, got -3"),
    (["--tokens", "x"], 2, "cute-moe bench-layer: error: argument --tokens: invalid int value: 'x'"),
    (["--reference-alignment", "0"], 2, "cute-moe bench-layer: error: --reference-alignment: expected >= 1, got 0"),
    (["--quick"], 1, "cute-moe bench-layer: error: benchmarking needs a GPU, none is visible"),
])
def test_command_line_errors_are_one_line(capsys, monkeypatch, tmp_path, argv, code, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, line = _failure(capsys, argv + ["--out", str(tmp_path / "out")])
    assert status == code and line.startswith(message), line
    assert not (tmp_path / "out").exists()


def test_cute_moe_bench_layer_command(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        cli.main(["bench-layer", "--shapes", "nope"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("cute-moe bench-layer: error: --shapes: unknown shape 'nope'")
    with pytest.raises(SystemExit) as info:
        cli.main(["bench-layer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0 and text.startswith("usage: cute-moe bench-layer [-h] [--quick] [--out OUT]")
    assert all(name in text for name in bench.SHAPES) and "--no-compile" in text


# --- FLOPs and routing ---------------------------------------------------------------------------

def test_flop_formula_counts_the_expert_matmuls_of_the_plain_layer():
    """layer_flops against torch's FLOP counter on moe_reference (one matmul pair per expert)."""
    x, idx, weights, w13, w2 = _inputs()
    routed = int(((idx >= 0) & (idx < E)).sum())
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    with FlopCounterMode(display=False) as counter:
        out = moe_reference(leaves[0], idx, leaves[1], leaves[2], leaves[3])
        forward = counter.get_total_flops()
        out.backward(torch.randn(T, H))
    assert forward == bench.layer_flops(routed, H, I, backward=False) > 0
    assert counter.get_total_flops() == bench.layer_flops(routed, H, I, backward=True) == 3 * forward


def test_router_is_uneven_deterministic_and_leaves_the_last_expert_empty():
    idx, weights = bench.route(4096, 64, 8, torch.Generator().manual_seed(1))
    assert idx.dtype == torch.int32 and idx.shape == weights.shape == (4096, 8)
    counts = torch.bincount(idx.flatten().long(), minlength=64)
    assert counts[-1] == 0 and int(counts.sum()) == 4096 * 8
    mean = 4096 * 8 / 63
    assert counts.max() > 1.3 * mean and counts[:-1].min() < 0.7 * mean
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts per token
    assert (weights > 0).all() and (weights.sum(dim=1) <= 1 + 1e-6).all()
    again = bench.route(4096, 64, 8, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], idx) and torch.equal(again[1], weights)
    with pytest.raises(ValueError, match=r"^top_k: expected <= 3"):
        bench.route(8, 4, 4, torch.Generator())


# --- the reference layer -------------------------------------------------------------------------

@pytest.mark.parametrize("alignment", [1, 8])
def test_permutation_places_every_routed_slot_once_in_its_aligned_group(alignment):
    _, idx, _, _, _ = _inputs()
    perm = permute_by_expert(idx, E, alignment)
    rows = permuted_rows(idx.numel(), E, alignment)
    assert perm.token.shape == perm.slot.shape == (rows,) and perm.offs.dtype == torch.int32
    ends = perm.offs.tolist()
    starts = [0] + ends[:-1]
    flat = idx.flatten().long()
    for e, (start, end) in enumerate(zip(starts, ends)):
        slots = perm.slot[start:end]
        real = slots[slots < idx.numel()]
        assert start % alignment == 0 and end >= start
        assert sorted(real.tolist()) == (flat == e).nonzero().flatten().tolist()  # each of e's slots, once
        assert torch.equal(perm.token[start:end][slots < idx.numel()], real // TOPK)
        if alignment > 1:
            assert end - start == max(alignment, -(-len(real) // alignment) * alignment)
    assert ends[EMPTY_EXPERT] - starts[EMPTY_EXPERT] == (alignment if alignment > 1 else 0)
    padding = perm.slot == idx.numel()
    assert torch.equal(perm.token[padding], torch.full((int(padding.sum()),), T))  # padding and the tail
    assert (perm.slot[ends[-1]:] == idx.numel()).all()  # dropped slots never reach a group


@pytest.mark.parametrize("dtype,threshold", [(torch.float32, 1e-9), (torch.bfloat16, 1e-4)])
@pytest.mark.parametrize("alignment", [1, 8])
def test_reference_layer_matches_moe_reference_with_all_gradients(dtype, threshold, alignment):
    x, idx, weights, w13, w2 = _inputs(dtype)
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    ours = _run(functools.partial(grouped_mm_moe, alignment=alignment), x, idx, weights, w13, w2, grad)
    ref = _run(lambda *a: moe_reference(*a, dtype=torch.float64), x.double(), idx, weights.double(), w13.double(),
               w2.double(), grad)
    assert ours[0].dtype == dtype and ours[0].shape == (T, H)
    for name, a, b in zip(("out", *bench.GRADIENTS), ours, ref):
        assert torch.isfinite(a).all(), name
        assert calc_diff(a, b) < threshold, name
    assert torch.equal(ours[3][EMPTY_EXPERT], torch.zeros_like(ours[3][EMPTY_EXPERT]))  # d w13 of the empty expert
    assert (ours[2][::4, 1] == 0).all() and (ours[2][1::5, 2] == 0).all()  # d topk_weights of dropped slots


def test_reference_layer_traces_under_torch_compile_with_dynamic_shapes():
    """fullgraph (no graph break, no host sync), one trace for two shapes, same results as eager."""
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(grouped_mm_moe, alignment=8), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for seed in (0, 1):
        x, idx, weights, w13, w2 = _inputs(torch.bfloat16, seed)
        if seed:
            x, idx, weights = x[:29], idx[:29], weights[:29]
        grad = torch.randn(x.shape)
        for a, b in zip(_run(compiled, x, idx, weights, w13, w2, grad),
                        _run(grouped_mm_moe, x, idx, weights, w13, w2, grad)):
            assert torch.equal(a, b)


# --- saved-tensor accounting ---------------------------------------------------------------------

def test_saved_tensor_bytes_counts_each_saved_storage_once_and_skips_the_inputs():
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(7, 3, requires_grad=True)

    def forward():
        h = x @ w  # saves x and w (inputs)
        e = h.exp()  # saves its result e
        pair = e[:, :1] * e[:, 1:]  # saves two views of e: e's storage, counted once
        return pair.sum() + torch.sin(h * 2).sum()  # sin saves h * 2; a scalar factor saves nothing

    saved, out = saved_tensor_bytes(forward, exclude=(x, w))
    assert saved == 2 * 5 * 3 * 4
    everything, _ = saved_tensor_bytes(forward)
    assert everything == saved + x.numel() * 4 + w.numel() * 4
    out.backward()  # the hooks hand the tensors back unchanged
    assert torch.allclose(w.grad, torch.autograd.grad(forward(), w)[0])

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, g):
            return 2 * ctx.saved_tensors[0] * g

    saved, _ = saved_tensor_bytes(lambda: Square.apply(x * 1.0), exclude=(x,))
    assert saved == x.numel() * 4  # ctx.save_for_backward counts too


def test_reference_layer_saves_its_permuted_activations():
    """The reference's saved bytes are at least the gathered x, h, the SwiGLU output and the FP32 y."""
    x, idx, weights, w13, w2 = _inputs(torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w13, w2)]
    saved, _ = saved_tensor_bytes(lambda: grouped_mm_moe(leaves[0], idx, leaves[1], leaves[2], leaves[3], 1),
                                  exclude=(idx, *leaves))
    rows = idx.numel()
    assert saved >= rows * (H * 2 + 2 * I * 2 + I * 2 + H * 4)


# --- one shape end to end, GPU pieces replaced by CPU stand-ins -------------------------------------

class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_one_shape_end_to_end_with_cpu_stand_ins(monkeypatch, tmp_path):
    def no_graph(launch, num_sets):
        launch(0)
        raise RuntimeError("capture")

    monkeypatch.setattr(bench, "graph_of", no_graph)
    monkeypatch.setattr(bench.bench_common, "randn", lambda *shape: torch.randn(*shape).to(torch.bfloat16))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1000)
    shape = bench.LayerShape("Tiny", 32, 24, 6, 2, 50)
    layers = {"ours": functools.partial(grouped_mm_moe, alignment=1), "reference": grouped_mm_moe}
    stages = []
    rows, memory = bench.bench_shape(shape, layers, 3, stages.append)
    assert [r.step for r in rows] == ["fwd", "fwd+bwd"] and stages[-1] == "timing fwd+bwd"
    for row in rows:
        assert row.ours_us > 0 and row.compiled_us is None
        assert row.vs_reference == pytest.approx(row.reference_us / row.ours_us)
        flops = bench.layer_flops(100, 32, 24, row.step == "fwd+bwd")
        assert row.ours_tflops == pytest.approx(flops / row.ours_us / 1e6)
        assert "ours: eager (graph capture failed: RuntimeError)" in row.note
    assert memory.max_calc_diff < 1e-4 and memory.peak_ratio == 1.0
    assert memory.reference_saved_bytes_per_token > memory.ours_saved_bytes_per_token > 0  # padding rows
    bench.write_report(str(tmp_path), {"replays": 3}, rows, [memory], ["Other: RuntimeError"], "cpu")
    text = (tmp_path / "layer_bench.md").read_text()
    assert text.count(shape.label) == 3 and "Failed shapes: Other: RuntimeError" in text
    data = json.loads((tmp_path / "layer_bench.json").read_text())
    assert [r["step"] for r in data["timing"]] == ["fwd", "fwd+bwd"]
    assert data["memory"][0]["saved_ratio"] == pytest.approx(memory.saved_ratio)
