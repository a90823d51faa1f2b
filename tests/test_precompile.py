"""Model presets, precompile planning and the CLI, end to end on a machine without a GPU."""

import json
import os
import re
import subprocess
import sys

import pytest

from cute_moe import cache, dispatch, runtime
from cute_moe.arch import get_backend
from cute_moe.layouts.alignment import align
from cute_moe.models import PRESETS, MoeModel, expected_rows, expert_gemms, get_preset, load_shapes
from cute_moe.specs import GemmSpec
from cute_moe.tools import cli, precompile

TINY = {"name": "tiny", "hidden": 256, "moe_intermediate": 128, "experts": 8, "top_k": 2}


@pytest.fixture(autouse=True)
def rules_only(monkeypatch):
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, "off")
    dispatch.reload_tuned_table()
    yield
    dispatch.reload_tuned_table()


def test_presets_match_the_published_shapes():
    shapes = {name: (m.hidden, m.moe_intermediate, m.experts, m.top_k) for name, m in PRESETS.items()}
    assert shapes == {
        "DeepSeek-V3": (7168, 2048, 256, 8), "DeepSeek-V4-Flash": (4096, 2048, 256, 6),
        "DeepSeek-V4-Pro": (7168, 3072, 384, 6), "Qwen3-30B-A3B": (2048, 768, 128, 8),
        "Qwen3-235B-A22B": (4096, 1536, 128, 8), "Mixtral-8x7B": (4096, 14336, 8, 2),
        "gpt-oss-120b": (2880, 2880, 128, 4), "Kimi-K2": (7168, 2048, 384, 8)}
    assert get_preset("deepseek-v3") is PRESETS["DeepSeek-V3"]


def test_expert_gemms_under_ep_and_tp():
    gate_up, down = expert_gemms(get_preset("DeepSeek-V3"), ep=8, tp=2)
    assert (gate_up.n, gate_up.k, gate_up.num_groups) == (2048, 7168, 32)
    assert (down.n, down.k, down.num_groups) == (7168, 1024, 32)
    with pytest.raises(ValueError, match="--ep"):
        expert_gemms(get_preset("Mixtral-8x7B"), ep=16)
    with pytest.raises(ValueError, match="--tp"):
        expert_gemms(get_preset("Qwen3-30B-A3B"), tp=64)  # 12 columns per rank: not a multiple of 8
    with pytest.raises(ValueError, match="--tp"):
        expert_gemms(get_preset("DeepSeek-V3"), tp=3)


def test_expected_rows_spreads_routed_tokens_over_local_experts():
    model = get_preset("DeepSeek-V3")  # 256 experts, top-8
    assert expected_rows(model, 4096, ep=1) == 128  # 4096 * 8 / 256
    assert expected_rows(model, 4096, ep=8) == 1024  # 32 local experts receive 8 ranks' tokens
    assert expected_rows(model, 1, ep=1) == 1


def test_shapes_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([TINY, {**TINY, "name": "tiny2", "experts": 16}]))
    assert [m.experts for m in load_shapes(str(path))] == [8, 16]
    path.write_text(json.dumps(TINY))
    assert load_shapes(str(path)) == [MoeModel(**TINY)]
    for bad, match in ((json.dumps({**TINY, "top_k": 0}), "top_k"), (json.dumps({"name": "x"}), "exactly the keys"),
                       ("{", "cannot read"), (json.dumps({**TINY, "top_k": 9}), "top_k")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=match) as info:
            load_shapes(str(path))
        assert info.value.args[0].startswith("--shapes")


def test_plan_covers_every_dispatcher_choice_over_the_token_range():
    model = get_preset("DeepSeek-V3")
    tasks = precompile.plan([model], archs=("sm_90a",), dtypes=("bf16",), ep=8, max_tokens=4096)
    planned = {(t.spec, t.config) for t in tasks}
    assert len(planned) == len(tasks)
    for gemm in expert_gemms(model, ep=8):
        for tokens in (0, 1, 3, 17, 100, 1000, 4096):
            rows = expected_rows(model, tokens, ep=8)
            # contiguous: A's rows per expert, padding included (at most one alignment above the mean)
            for kind, hint, alignment in (("masked", rows, 0), ("contiguous", align(rows, 128), 128),
                                          ("contiguous", rows + 127, 128), ("contiguous", 0, 128), ("psum", 0, 128),
                                          ("ragged", rows, 0), ("ragged", 0, 0)):
                config = dispatch.choose_config(kind, gemm.n, gemm.k, gemm.num_groups, hint, alignment)
                spec = GemmSpec(kind, gemm.n, gemm.k, alignment=alignment if kind == "psum" else 0)
                assert (spec, config) in planned
    assert {t.spec.kind for t in tasks} == {"contiguous", "psum", "masked", "ragged"}
    assert {(t.spec.n, t.spec.k) for t in tasks} == {(4096, 7168), (7168, 2048)}


def test_plan_honours_kinds_and_a_forced_config():
    model = get_preset("Qwen3-30B-A3B")
    tasks = precompile.plan([model], archs=("sm_90a",), dtypes=("bf16",), kinds=("ragged",))
    assert {t.spec.kind for t in tasks} == {"ragged"} and {t.spec.n for t in tasks} == {1536, 2048}
    forced = dispatch.parse_config("tile_m=64,tile_n=64")
    with dispatch.force_config(forced):
        tasks = precompile.plan([model], archs=("sm_90a",), dtypes=("bf16",))
    assert {t.config for t in tasks} == {forced} and len(tasks) == 8  # 2 GEMMs x 4 kinds


def test_fp8_plan_uses_the_fp8_kinds_and_tiles():
    tasks = precompile.plan([get_preset("DeepSeek-V3")], archs=("sm_90a",), dtypes=("fp8",), ep=8)
    assert {t.spec.kind for t in tasks} == {"contiguous", "psum", "masked"}
    assert {t.spec.a.dtype for t in tasks} == {"fp8_e4m3"}
    assert {t.config.tile_n for t in tasks} == {256}  # FP8 tiles of two 128 x 128 scale blocks


def test_dtype_without_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(precompile, "PRECISIONS", {"bf16": precompile.DTYPES["bf16"]})
    with pytest.raises(ValueError, match=r"^--dtype: fp8 kernels not available in this build \(available: bf16\)"):
        precompile.parse_dtypes("bf16,fp8")


@pytest.mark.parametrize("argv,message", [
    (["--model", "Llama-MoE"], "--model: unknown model 'Llama-MoE'; presets: DeepSeek-V3"),
    (["--model", "Kimi-K2", "--arch", "sm_100a"],
     "--arch: sm_100a: no SM100 kernels in this build; supported archs: sm_90a"),
    (["--model", "Kimi-K2", "--arch", "sm_86"], "--arch: unknown arch 'sm_86'"),
    (["--model", "Kimi-K2", "--dtype", "int4"], "--dtype: unknown dtype 'int4'"),
    (["--model", "Kimi-K2", "--ep", "5"], "--ep: expected a divisor"),
    (["--model", "Kimi-K2", "--kinds", "dense"], "--kinds: unknown kind 'dense'"),
    (["--model", "Kimi-K2", "--max-tokens", "0"], "--max-tokens"),
    (["--model", "Kimi-K2", "--alignment", "96"], "--alignment"),
    (["--model", "Kimi-K2", "--jobs", "0"], "--jobs"),
])
def test_precompile_argument_errors_name_the_argument(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["precompile", *argv, "--cache-dir", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_lists_the_plan_and_compiles_nothing(capsys, tmp_path):
    assert cli.main(["precompile", "--model", "Qwen3-30B-A3B", "--ep", "8", "--dry-run",
                     "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    planned = precompile.plan([get_preset("Qwen3-30B-A3B")], archs=("sm_90a",), dtypes=("bf16",), ep=8)
    assert f"{len(planned)} specializations" in out and "masked bf16->bf16 n=1536 k=2048" in out
    assert not any(tmp_path.iterdir())


def _totals(text):
    match = re.search(r"totals: (\d+) specializations, (\d+) compiled, (\d+) rebuilt, (\d+) cached, (\d+) failed", text)
    assert match, text
    return tuple(map(int, match.groups()))


def test_small_preset_end_to_end_then_loaded_without_compiling(capsys, tmp_path, monkeypatch):
    argv = ["precompile", "--model", "Qwen3-30B-A3B", "--ep", "8", "--kinds", "ragged",
            "--arch", "sm_90a", "--dtype", "bf16", "--jobs", "2", "--cache-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert _totals(captured.out) == (2, 2, 0, 0, 0)  # the rules take one ragged config per GEMM
    assert "[2/2]" in captured.err
    rows = [line for line in captured.out.splitlines() if line.startswith("ragged")]
    assert len(rows) == 2 and all("KiB" in row and "compiled" in row for row in rows)

    assert cli.main(argv) == 0
    assert _totals(capsys.readouterr().out) == (2, 0, 0, 2, 0)

    monkeypatch.setenv("CUTE_MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "_kernels", {})
    before = runtime.compiled_count(), runtime.loaded_count()
    gate_up = expert_gemms(get_preset("Qwen3-30B-A3B"), ep=8)[0]
    config = dispatch.choose_config("ragged", gate_up.n, gate_up.k, gate_up.num_groups, 0, 0)
    assert callable(runtime.get_kernel(GemmSpec("ragged", gate_up.n, gate_up.k), config))
    assert (runtime.compiled_count(), runtime.loaded_count()) == (before[0], before[1] + 1)

    assert cli.main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    assert "2 good entries, 0 problems" in capsys.readouterr().out
    assert cli.main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "2 entries" in listing and "ragged bf16->bf16 n=1536 k=2048" in listing


def test_two_processes_precompiling_the_same_keys_compile_each_once(tmp_path):
    shapes = tmp_path / "tiny.json"
    shapes.write_text(json.dumps(TINY))
    root = tmp_path / "cache"
    argv = [sys.executable, "-m", "cute_moe.tools.precompile", "--shapes", str(shapes), "--kinds", "ragged",
            "--jobs", "1", "--cache-dir", str(root)]
    env = {**os.environ, "CUTE_MOE_TUNED_TABLE": "off"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    totals = [_totals(out) for out, _ in outputs]
    assert all(t[0] == 2 and t[4] == 0 for t in totals)
    assert sum(t[1] for t in totals) == 2 and sum(t[3] for t in totals) == 2
    assert cache.verify(root) == (2, [])


def test_cache_clear(tmp_path, capsys):
    (tmp_path / "0123456789abcdef").mkdir()
    (tmp_path / "0123456789abcdef" / ("a" * 32 + ".o")).write_bytes(b"x")
    (tmp_path / "unrelated").mkdir()
    assert cli.main(["cache", "clear", "--stale", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 1 objects" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def test_tune_validates_arguments_on_a_cpu(capsys, tmp_path):
    for argv, message in ((["--model", "nope"], "--model"), (["--model", "Kimi-K2", "--tokens", "0"], "--tokens"),
                          (["--model", "Kimi-K2", "--kinds", "dense"], "--kinds"),
                          (["--model", "Kimi-K2", "--out", str(tmp_path / "t.json")], "needs a GPU")):
        with pytest.raises(SystemExit) as info:
            cli.main(["tune", *argv])
        expected_code = 1 if message == "needs a GPU" else 2  # no GPU is not an argument error
        assert info.value.code == expected_code and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", "--help"])
    assert info.value.code == 0 and "--tokens" in capsys.readouterr().out


def test_tune_writes_only_entries_that_beat_the_rules_by_the_margin(tmp_path, monkeypatch):
    from cute_moe.tools import tune

    monkeypatch.setattr(tune, "require_gpu", lambda what: None)
    monkeypatch.setattr(tune.cache, "cache_enabled", lambda: False)
    keyed = tune.plan_workloads(tune_args(), 128)
    winners = iter([0.95, 0.99, 0.90, 1.0])  # relative times of the best candidate, one per table key

    def measure(items, candidates, baseline, alignment, repeats):
        return {candidates[0]: next(winners)}, 10.0

    monkeypatch.setattr(tune, "measure", measure)
    out = tmp_path / "t.json"
    stale = [dict(zip(dispatch.TABLE_KEY_FIELDS, key), config={"tile_m": 64}) for key in list(keyed)[1:2]]
    out.write_text(json.dumps({"format": dispatch.TUNED_TABLE_FORMAT, "entries": stale}))
    args = tune_args(out=str(out))
    assert tune.run(args) == 0
    written = json.loads(out.read_text())["entries"]
    assert sorted(e["relative_time"] for e in written) == [0.9, 0.95]  # 0.99 and 1.0 are within the margin
    assert all(tuple(e[f] for f in dispatch.TABLE_KEY_FIELDS) != list(keyed)[1] for e in written)  # stale removed
    assert tune.beats_baseline(0.98) and not tune.beats_baseline(0.981)


def test_tune_never_writes_the_baseline_own_config(tmp_path, monkeypatch):
    from cute_moe.tools import tune

    monkeypatch.setattr(tune, "require_gpu", lambda what: None)
    monkeypatch.setattr(tune.cache, "cache_enabled", lambda: False)

    def measure(items, candidates, baseline, alignment, repeats):  # the baseline "beats" itself: noise
        assert baseline == dispatch.fallback_choice(items[0][0])[0]
        return {baseline: 0.9}, 10.0

    monkeypatch.setattr(tune, "measure", measure)
    out = tmp_path / "t.json"
    assert tune.run(tune_args(out=str(out))) == 0
    assert json.loads(out.read_text())["entries"] == []


def test_tune_near_space_is_the_rules_choice_and_its_one_field_neighbours():
    from cute_moe.tools import tune

    for items in tune.plan_workloads(tune_args(dtype="bf16,fp8", kinds=None), 128).values():
        problem = items[0][0]
        centres = (get_backend("sm_90a").rule_config(problem), dispatch.fallback_choice(problem)[0])
        near, full = tune.candidate_configs(problem, "near"), tune.candidate_configs(problem)
        assert set(centres) <= set(near) <= set(full) and len(near) < len(full)
        for config in set(full) - set(near):
            for centre in centres:
                changed = [config.tile_m != centre.tile_m, config.tile_n != centre.tile_n,
                           (config.cluster_m, config.cluster_n) != (centre.cluster_m, centre.cluster_n)]
                assert sum(changed) >= 2, config


def test_tune_all_models_use_their_serving_ep_and_decode_rows_for_masked():
    from cute_moe.models import PRESETS, SERVING_EP, expected_rows
    from cute_moe.tools import tune

    keyed = tune.plan_workloads(tune_args(model="all", ep=None, kinds="masked,ragged", tokens="4096",
                                          decode_m="8,64"), 128)
    workloads = [w for items in keyed.values() for _, w in items]
    assert {w.hint for w in workloads if w.kind == "masked"} == {8, 64}
    ragged = {(w.n, w.k, w.groups, sum(w.counts)) for w in workloads if w.kind == "ragged"}
    for model in PRESETS.values():
        ep = SERVING_EP.get(model.name, 1)
        # every rank routes 4096 tokens top-k over all experts: the local experts get their share
        assert any(groups == model.experts // ep and 0.5 < rows / (expected_rows(model, 4096, ep) * groups) < 1.5
                   for _, _, groups, rows in ragged), model.name
    one = tune.plan_workloads(tune_args(model="Kimi-K2", ep=None, kinds="ragged", tokens="4096"), 128)
    assert {w.groups for items in one.values() for _, w in items} == {PRESETS["Kimi-K2"].experts}  # EP 1


def test_tune_workloads_are_uneven_and_keyed_by_the_hint_their_launch_carries():
    from cute_moe.dispatch import m_bucket, rows_per_group
    from cute_moe.tools import tune

    keyed = tune.plan_workloads(tune_args(kinds="contiguous,ragged,masked", tokens="512,16384"), 128)
    kinds = set()
    for key, items in keyed.items():
        for problem, w in items:
            kinds.add(w.kind)
            assert dispatch.table_key(problem) == key and len(set(w.counts)) > 1  # the router's counts differ
            if w.kind == "contiguous":  # A holds every expert's rows padded to 128
                assert problem.expected_m == m_bucket(rows_per_group(sum(align(c, 128) for c in w.counts), w.groups))
            elif w.kind == "ragged":
                assert problem.expected_m == m_bucket(rows_per_group(sum(w.counts), w.groups))
            else:
                assert problem.expected_m == m_bucket(w.hint)
    assert kinds == {"contiguous", "ragged", "masked"}
    assert len({key for key in keyed if key[1] == "ragged"}) == 4  # 2 GEMMs x 2 loads, buckets apart


def tune_args(**overrides):
    import argparse

    values = dict(model="Qwen3-30B-A3B", shapes=None, ep=8, tp=1, dtype="bf16", kinds="masked,ragged", tokens="16",
                  decode_m=None, space="all", repeats=1, jobs=1, out=None, arch="sm_90a")
    return argparse.Namespace(**{**values, **overrides})
