"""Objects precompiled on a machine without a GPU load and run correctly on the GPU, compiling nothing.

The cache comes from CUTE_MOE_CACHE_DIR when it is set (filled on a CPU-only machine with
``cute-moe precompile --model Qwen3-30B-A3B --ep 8 --dtype bf16 --cache-dir .precompiled``); otherwise a fixture
precompiles the same preset into a temporary directory in CPU worker processes. Every launch below
goes through the public ops with the dispatcher's choices over the token range; compiling is made an
error, and the in-memory caches are emptied first so each specialization must come from disk.
"""

import os
from pathlib import Path

import pytest
import torch

import cute_moe
from cute_moe import cache, dispatch, launcher, runtime
from cute_moe.layouts.alignment import align
from cute_moe.models import expected_rows, expert_gemms, get_preset
from cute_moe.testing import calc_diff
from cute_moe.tools import precompile

pytestmark = pytest.mark.gpu

MODEL, EP, MAX_TOKENS = "Qwen3-30B-A3B", 8, 8192
TOKENS = (1, 16, 200, 1000, 8192)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    given = os.environ.get("CUTE_MOE_CACHE_DIR")
    if given:
        root = Path(given)
        if not cache.list_entries(root)[0]:
            pytest.fail(f"CUTE_MOE_CACHE_DIR={given} holds no entry for this build's fingerprint "
                        f"{cache.fingerprint()} ({cache.fingerprint_parts()}); stale builds there: "
                        f"{cache.list_entries(root)[1]}")
        return root
    root = tmp_path_factory.mktemp("precompiled")
    tasks = precompile.plan([get_preset(MODEL)], archs=("sm_90a",), dtypes=("bf16",), ep=EP, max_tokens=MAX_TOKENS)
    results = precompile.build(tasks, root, jobs=4)
    assert all(isinstance(outcome, cache.BuildResult) for _, outcome in results), results
    return root


@pytest.fixture
def from_disk_only(cache_root, monkeypatch):
    """Point the cache at the precompiled root, forget what is in memory, make compiling an error."""
    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(cache_root))
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, "off")  # the plan above was made with the rules
    dispatch.reload_tuned_table()
    runtime.clear_memory()
    launcher.clear_launches()  # the per-shape launch table also holds the functions

    def no_compile(spec, config):
        raise AssertionError(f"compiled {spec} {config}: not covered by the precompiled cache")

    monkeypatch.setattr(cache, "_compile", no_compile)
    yield
    runtime.clear_memory()
    launcher.clear_launches()
    dispatch.reload_tuned_table()


def _randn(*shape):
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


def _reference(a_rows, w, group_of_row):
    out = torch.zeros(a_rows.shape[0], w.shape[1], device="cuda")
    for g in range(w.shape[0]):
        rows = group_of_row == g
        out[rows] = a_rows[rows].float() @ w[g].float().T
    return out


def _counts(total_rows, groups, gen):
    """Uneven rows per group (some empty) summing to total_rows."""
    weights = torch.rand(groups, generator=gen) * (torch.rand(groups, generator=gen) > 0.2)
    counts = (weights / weights.sum().clamp_min(1e-9) * total_rows).floor().long()
    counts[0] += total_rows - counts.sum()
    return counts


def test_precompiled_objects_run_correctly_without_compiling(from_disk_only):
    model = get_preset(MODEL)
    gen = torch.Generator().manual_seed(0)
    compiled_before, loaded_before = runtime.compiled_count(), runtime.loaded_count()
    alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
    for gemm in expert_gemms(model, EP):
        g, n, k = gemm.num_groups, gemm.n, gemm.k
        w = _randn(g, n, k)
        for tokens in TOKENS:
            rows = expected_rows(model, tokens, EP)
            counts = _counts(rows * g, g, gen)

            # masked (decode): expected_m is the rows-per-expert hint
            max_m = max(1, int(counts.max()))
            a = _randn(g, max_m, k)
            d = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            masked_m = counts.int().cuda()
            cute_moe.m_grouped_bf16_gemm_nt_masked(a, w, d, masked_m, rows)
            valid = torch.arange(max_m, device="cuda")[None, :] < masked_m[:, None]
            ref = torch.einsum("gmk,gnk->gmn", a.float(), w.float())
            assert calc_diff(d[valid], ref[valid]) < 1e-5, ("masked", n, k, tokens)

            # contiguous (prefill): aligned segments, -1 on padding rows; then the same rows in psum form
            seg = [align(int(c), alignment) for c in counts]
            layout = torch.cat([torch.cat([torch.full((int(c),), i, dtype=torch.int32),
                                           torch.full((s - int(c),), -1, dtype=torch.int32)])
                                for i, (c, s) in enumerate(zip(counts, seg, strict=True))]).cuda()
            ends = (torch.tensor([0, *seg[:-1]]).cumsum(0) + counts).int().cuda()
            a2 = _randn(layout.numel(), k)
            real = layout >= 0
            ref = _reference(a2, w, layout)[real]
            for psum in (False, True):
                d2 = torch.empty(layout.numel(), n, device="cuda", dtype=torch.bfloat16)
                cute_moe.m_grouped_bf16_gemm_nt_contiguous(a2, w, d2, ends if psum else layout, use_psum_layout=psum)
                assert calc_diff(d2[real], ref) < 1e-5, ("psum" if psum else "contiguous", n, k, tokens)

            # ragged (torch._grouped_mm): unaligned cumulative offsets
            offs = counts.cumsum(0).int().cuda()
            a3 = _randn(int(counts.sum()), k)
            out = cute_moe.grouped_mm(a3, w.transpose(1, 2), offs)
            ids = torch.repeat_interleave(torch.arange(g, device="cuda"), counts.cuda())
            assert calc_diff(out, _reference(a3, w, ids)) < 1e-5, ("ragged", n, k, tokens)
    torch.cuda.synchronize()
    assert runtime.compiled_count() == compiled_before
    assert runtime.loaded_count() > loaded_before
