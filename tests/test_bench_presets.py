"""The model-preset section of the benchmark: routing, plan, summary, --compare (CPU only)."""

import json

import pytest
import torch

from cute_moe.models import PRESETS, SERVING_EP
from cute_moe.tools import bench, bench_presets
from cute_moe.tools.bench_common import Row


def test_router_counts_are_uneven_and_conserve_the_routes():
    model = PRESETS["Qwen3-30B-A3B"]
    counts = bench_presets.route_counts(model, 4096, 1, torch.Generator().manual_seed(1))
    assert len(counts) == model.experts and sum(counts) == 4096 * model.top_k
    mean = sum(counts) / len(counts)
    assert max(counts) > 1.5 * mean and min(counts) < 0.7 * mean
    local = bench_presets.route_counts(PRESETS["DeepSeek-V3"], 512, 8, torch.Generator().manual_seed(1))
    assert len(local) == 256 // 8 and 0 < sum(local) < 512 * 8 * 8


def test_plan_covers_every_preset_gemm_kind_and_load_deterministically():
    items = bench_presets.plan(list(PRESETS), quick=True)
    assert {p.model.name for _, p in items} == set(PRESETS)
    assert {kind for kind, _ in items} == set(bench_presets.PRESET_KINDS)
    assert {p.load for _, p in items} == {"T=4096", "m~16", "m~64"}
    assert [p.shape for _, p in items] == [p.shape for _, p in bench_presets.plan(list(PRESETS), quick=True)]
    full = bench_presets.plan(["Mixtral-8x7B"], quick=False)
    assert len(full) == 2 * (len(bench_presets.TOKENS) * 3 + len(bench_presets.DECODE_EXPECTED_M) * 2)


def test_decode_loads_hit_the_expected_rows_on_average():
    for name in PRESETS:
        model, ep = PRESETS[name], SERVING_EP.get(name, 1)
        tokens = bench_presets.decode_tokens(model, ep, 16)
        assert 16 <= tokens * model.top_k * ep / model.experts < 16 + model.top_k * ep


def _row(kind, shape, ratio, ours=10.0):
    return Row(kind, shape, ours, ours * ratio, 1.0, 1.0, ratio, 0.0, "base")


def test_summary_gives_geomean_and_minimum_per_kind():
    rows = [_row("masked", "a", 2.0), _row("masked", "b", 0.5), _row("ragged", "c", 1.1)]
    lines = bench_presets.summary(rows)
    assert any(line.startswith("| masked | 2 | 1.000x | 0.500x (b)") for line in lines)
    assert any(line.startswith("| ragged | 1 | 1.100x | 1.100x (c)") for line in lines)


def test_compare_reads_an_earlier_run_and_reports_each_change(tmp_path):
    path = tmp_path / "old.json"
    old_rows = [_row("masked", "a", 1.2, ours=20.0)]
    path.write_text(json.dumps({"rows": [], "preset_rows": [vars(r) for r in old_rows]}))
    old = bench.load_compare(str(path))
    lines = bench.comparison(old, "presets", [_row("masked", "a", 1.5, ours=10.0), _row("masked", "z", 1.0)])
    assert "20.0 -> 10.0 us (2.000x speed)" in lines[0] and "ratio 1.200 -> 1.500" in lines[0]
    assert lines[1].endswith("new row")
    path.write_text("{broken")
    with pytest.raises(ValueError, match="^--compare: cannot read"):
        bench.load_compare(str(path))


def test_preset_names_are_checked():
    assert bench.parse_presets("all") == list(PRESETS)
    assert bench.parse_presets("qwen3-30b-a3b,Kimi-K2") == ["Qwen3-30B-A3B", "Kimi-K2"]
    with pytest.raises(ValueError, match="^--presets: unknown model 'nope'"):
        bench.parse_presets("nope")
