"""The Mega MoE benchmark on the CPU (tools/bench_mega_moe.py): argument parsing and one-line command
errors, the local routing of the "ours local" measurement, the row arithmetic, the report from
synthetic numbers, and the parent process end to end with the ranks stubbed out."""

import argparse
import json
import math
import pickle

import pytest
import torch

from cute_moe.tools import bench_mega_moe as bench, cli

FLASH, V3 = bench.SHAPES["flash"], bench.SHAPES["v3"]


# --- arguments -----------------------------------------------------------------------------------

def test_shapes_and_tokens_parsing():
    assert bench.parse_shapes(None) == ["flash", "v3"]
    assert bench.parse_shapes(" V3,flash ,v3") == ["v3", "flash"]
    assert bench.parse_shapes("ALL") == ["flash", "v3"]
    assert (FLASH.hidden, FLASH.intermediate, FLASH.experts, FLASH.top_k) == (4096, 2048, 256, 6)
    assert (V3.hidden, V3.intermediate, V3.experts, V3.top_k) == (7168, 2048, 256, 8)
    assert bench.parse_tokens(None, False) == [1, 8, 32, 128, 512, 2048, 8192]
    assert bench.parse_tokens(None, True) == [8, 128, 2048]
    assert bench.parse_tokens("128, 8,128", True) == [8, 128]
    with pytest.raises(ValueError, match=r"^--shapes: unknown shape 'nope'; expected among flash, v3 or all$"):
        bench.parse_shapes("flash,nope")
    with pytest.raises(ValueError, match=r"^--tokens: expected >= 1, got 0$"):
        bench.parse_tokens("8,0", False)
    with pytest.raises(ValueError, match=r"^--tokens: expected comma-separated integers, got '8;9'$"):
        bench.parse_tokens("8;9", False)


def test_plan_checks_name_the_option(monkeypatch):
    bench.check_plan(2, ["flash", "v3"], [1, 8192])
    bench.check_plan(8, ["v3"], [8192])
    with pytest.raises(ValueError, match=r"^--world 3 / --tokens up to 8: DeepSeek-V4-Flash: num_experts: expected "
                                         r"a multiple of the group size 3"):
        bench.check_plan(3, ["flash"], [8])
    with pytest.raises(ValueError, match=r"^--world: expected >= 1, got 0$"):
        bench.check_plan(0, ["flash"], [8])
    with pytest.raises(ValueError, match=r"num_max_tokens_per_rank: expected group size x tokens below"):
        bench.check_plan(2, ["v3"], [1 << 20])
    # fewer local experts than top-k (the buffer's own checks accept it: 16 experts on 8 ranks)
    monkeypatch.setitem(bench.SHAPES, "narrow", bench.MegaShape("narrow", 512, 256, 16, 4))
    with pytest.raises(ValueError, match=r"^--world: narrow has 2 experts per rank at world 8, fewer than top-4"):
        bench.check_plan(8, ["narrow"], [8])
    bench.check_plan(4, ["narrow"], [8])


def _failure(capsys, argv, entry=bench.main):
    with pytest.raises(SystemExit) as info:
        entry(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and not captured.out
    assert len(captured.err.splitlines()) == 1, captured.err
    return info.value.code, captured.err.strip()


@pytest.mark.parametrize("argv,code,message", [
    (["--shapes", "nope"], 2, "cute-moe bench-mega-moe: error: --shapes: unknown shape 'nope'"),
    (["--tokens", "-3"], 2, "cute-moe bench-mega-moe: error: --tokens: expected >= 1, got -3"),
    (["--tokens", "x"], 2, "cute-moe bench-mega-moe: error: --tokens: expected comma-separated integers, got 'x'"),
    (["--world", "x"], 2, "cute-moe bench-mega-moe: error: argument --world: invalid int value: 'x'"),
    (["--world", "3"], 2, "cute-moe bench-mega-moe: error: --world 3 / --tokens up to 8192: DeepSeek-V4-Flash: "
                          "num_experts: expected a multiple of the group size 3"),
    (["--timeout", "0"], 2, "cute-moe bench-mega-moe: error: --timeout: expected > 0, got 0"),
    (["--quick"], 1, "cute-moe bench-mega-moe: error: benchmarking needs a GPU, none is visible"),
])
def test_command_line_errors_are_one_line(capsys, monkeypatch, tmp_path, argv, code, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, line = _failure(capsys, argv + ["--out", str(tmp_path / "out")])
    assert status == code and line.startswith(message), line
    assert not (tmp_path / "out").exists()


def test_world_above_the_visible_gpus(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status, line = _failure(capsys, ["--world", "2", "--out", str(tmp_path / "out")])
    assert (status, line) == (2, "cute-moe bench-mega-moe: error: --world: expected at most 1 (visible GPUs), got 2")


def test_cute_moe_bench_mega_moe_command(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, line = _failure(capsys, ["bench-mega-moe", "--tokens", "0"], cli.main)
    assert (status, line) == (2, "cute-moe bench-mega-moe: error: --tokens: expected >= 1, got 0")


# --- the local routing ---------------------------------------------------------------------------

def test_apportion_is_proportional_capped_and_exact():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 20, (1,), generator=gen))
        weights = torch.randint(0, 50, (n,), generator=gen).tolist()
        cap = int(torch.randint(1, 40, (1,), generator=gen))
        total = int(torch.randint(0, cap * n + 1, (1,), generator=gen))
        shares = bench.apportion(weights, total, cap)
        assert sum(shares) == total and all(0 <= s <= cap for s in shares)
        if sum(weights) > 0 and all(w * total / sum(weights) <= cap - 1 for w in weights):  # no share capped
            assert all(abs(s - w * total / sum(weights)) < 1 for s, w in zip(shares, weights))
    assert bench.apportion([0, 0, 0, 0], 6, 2) == [2, 2, 1, 1]
    assert bench.apportion([100, 1, 1], 12, 5) == [5, 4, 3]  # the hot expert capped, the rest filled
    with pytest.raises(ValueError, match=r"^total: expected at most 2 x 3 entries, got 7$"):
        bench.apportion([1, 1, 1], 7, 2)


@pytest.mark.parametrize("tokens,top_k,experts", [(1, 6, 128), (5, 8, 8), (37, 6, 128), (128, 8, 32), (3, 3, 4)])
def test_local_routing_keeps_rows_per_expert_and_distinct_experts(tokens, top_k, experts):
    gen = torch.Generator().manual_seed(tokens * 100 + top_k)
    rows = torch.randint(0, 3 * tokens, (experts,), generator=gen)
    rows[0] = rows[1:].sum() + 1  # one hot expert: over half the slots, capped at one per token
    first = 3 * experts
    idx = bench.local_routing(rows.tolist(), tokens, top_k, first)
    assert idx.shape == (tokens, top_k) and idx.dtype == torch.int64
    assert ((idx >= first) & (idx < first + experts)).all()
    assert all(len(set(row)) == top_k for row in idx.tolist())  # no expert twice in a token
    counts = torch.bincount(idx.reshape(-1) - first, minlength=experts).tolist()
    assert counts == bench.apportion(rows.tolist(), tokens * top_k, tokens)
    assert counts[0] == tokens


def test_received_rows_counts_only_the_ranks_experts():
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(-3, 300, (2 * 37, 8), generator=gen)
    for rank in range(2):
        expected = [0] * 128
        for e in idx.reshape(-1).tolist():
            if rank * 128 <= e < (rank + 1) * 128:
                expected[e - rank * 128] += 1
        assert bench.received_rows(idx, rank, 128).tolist() == expected


# --- rows and the report -------------------------------------------------------------------------

TIMES = {"ours": 200.0, "ours_local": 180.0, "unfused": 300.0, "nccl": 500.0, "comm": 80.0}
GOOD_DIFFS = {"unfused": 2e-4, "local": 3e-4, "nccl": 1e-5}


def test_make_row_arithmetic():
    row = bench.make_row(FLASH, 128, TIMES, GOOD_DIFFS, slots=768.0, touched_experts=100.5)
    assert row.vs_unfused == pytest.approx(1.5) and row.vs_nccl == pytest.approx(2.5)
    assert row.nvlink_hidden == pytest.approx(0.75)  # 20 µs of 80 µs of communication left over
    flops = 6 * 4096 * 2048 * 768.0
    assert row.tflops == pytest.approx(flops / 200e-6 / 1e12)
    weight_bytes = 3 * 4096 * 2048 * (1 + 4 / 128 ** 2)
    assert row.weights_gbps == pytest.approx(100.5 * weight_bytes / 200e-6 / 1e9)
    assert (row.status, row.local_us, row.comm_us) == ("ok", 180.0, 80.0)


@pytest.mark.parametrize("bad", [1e-3, 0.5, math.inf, math.nan])
def test_a_large_or_undefined_diff_fails_the_row(bad):
    row = bench.make_row(V3, 8, TIMES, {**GOOD_DIFFS, "local": bad}, 64.0, 51.0)
    assert row.status.startswith("FAIL: calc_diff local ") and "limit 0.001" in row.status
    assert "FAIL" in bench.format_row(row)


def _rows():
    return [bench.make_row(FLASH, 128, TIMES, GOOD_DIFFS, 768.0, 128.0),
            bench.make_row(V3, 128, {**TIMES, "unfused": 280.0}, GOOD_DIFFS, 1024.0, 128.0),
            bench.make_row(V3, 8192, {**TIMES, "ours": 6000.0, "unfused": 7000.0}, GOOD_DIFFS, 65536.0, 128.0),
            bench.make_row(FLASH, 8, TIMES, {**GOOD_DIFFS, "unfused": 0.02}, 48.0, 40.0)]


def test_targets_and_summary():
    rows = _rows()
    targets = bench.target_results(rows)
    assert [(t["shape"], t["tokens"], t["met"]) for t in targets] == [
        ("DeepSeek-V4-Flash", 128, True), ("DeepSeek-V3", 128, True), ("DeepSeek-V3", 8192, True)]
    slow = [bench.make_row(V3, 8192, {**TIMES, "unfused": 210.0}, GOOD_DIFFS, 1.0, 1.0)]
    assert [(t["tokens"], t["speedup"], t["met"]) for t in bench.target_results(slow)] == [
        (128, None, None), (8192, pytest.approx(1.05), False)]
    lines = bench.summary_lines(slow, ["rank 1 DeepSeek-V3: RuntimeError"])
    assert "- >= 1.3x vs unfused at 128 tokens per rank: not measured in this run" in lines
    assert "- >= 1.1x vs unfused at 8192 tokens per rank: DeepSeek-V3 1.05x, NOT met" in lines
    assert lines[-1] == "Failed jobs: rank 1 DeepSeek-V3: RuntimeError"
    failed = bench.make_row(V3, 128, {**TIMES, "unfused": 1000.0}, {**GOOD_DIFFS, "nccl": 0.1}, 1.0, 1.0)
    assert bench.target_results([failed])[0]["met"] is False  # fast but wrong does not meet a target


def test_report_files(tmp_path):
    rows = _rows()
    bench.write_report(str(tmp_path), {"ranks": "2"}, rows, ["rank 0 DeepSeek-V3: ValueError"], "NVIDIA H200")
    md = (tmp_path / "mega_moe.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| DeepSeek")]
    assert len(table) == 4 and all(line.count("|") == bench.HEADER.splitlines()[0].count("|") for line in table)
    assert table[0] == ("| DeepSeek-V4-Flash | 128 | 200.0 | 300.0 | 500.0 | 1.50x | 2.50x | "
                        f"{6 * 4096 * 2048 * 768 / 200e6:.0f} | {128 * FLASH.expert_bytes('fp8') / 200e3:.0f} | 180.0 | "
                        "80.0 | 75% | 3.0e-04 | ok |")
    assert "GPU: NVIDIA H200. ranks: 2" in md and "Accuracy FAIL: DeepSeek-V4-Flash T=8: FAIL: calc_diff unfused" in md
    assert "Failed jobs: rank 0 DeepSeek-V3: ValueError" in md
    data = json.loads((tmp_path / "mega_moe.json").read_text())
    assert [bench.MegaRow(**r) for r in data["rows"]] == rows
    assert data["failures"] == ["rank 0 DeepSeek-V3: ValueError"] and data["device"] == "NVIDIA H200"
    assert data["targets"] == bench.target_results(rows)


# --- the parent process, ranks stubbed -----------------------------------------------------------

def test_run_writes_the_report_and_fails_on_a_fail_row(capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_run_ranks(fn, world, args, timeout_s):
        seen.update(fn=fn, world=world, plan=args[0], timeout=timeout_s)
        result = {"rows": [vars(r) for r in _rows()], "failures": [], "device": "NVIDIA H200"}
        return [result, {**result, "failures": ["rank 1 DeepSeek-V3: RuntimeError"]}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("cute_moe.ep_launch.run_ranks", fake_run_ranks)
    out = tmp_path / "mega"
    status = bench.main(["--quick", "--shapes", "v3", "--out", str(out), "--timeout", "300"])
    assert status == 1  # the FAIL row and the failed job
    plan = seen["plan"]
    assert (seen["fn"], seen["world"], seen["timeout"]) == (bench.bench_rank, 2, 300.0)
    assert (plan.shapes, plan.tokens, plan.samples) == (("v3",), (8, 128, 2048), bench.QUICK_SAMPLES)
    assert plan.out == str(out)
    assert dict(plan.settings)["unfused"].startswith("EPBuffer sized for each T")  # the baseline's sizing is stated
    data = json.loads((out / "mega_moe.json").read_text())
    assert len(data["rows"]) == 4 and data["failures"] == ["rank 1 DeepSeek-V3: RuntimeError"]
    captured = capsys.readouterr()
    assert "- >= 1.1x vs unfused at 8192 tokens per rank: DeepSeek-V3 1.17x, met" in captured.out
    assert "[bench_mega_moe] 2 rank(s), shapes DeepSeek-V3, tokens 8, 128, 2048" in captured.err


def test_a_dead_rank_is_one_line_naming_the_partial_report(capsys, monkeypatch, tmp_path):
    def fake_run_ranks(fn, world, args, timeout_s):
        raise RuntimeError("rank 1 raised:\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "RuntimeError: cute_moe.ep: mega_moe (grid barrier) on rank 1 timed out\n"
                           "rank 0 still running after 300 s: killed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("cute_moe.ep_launch.run_ranks", fake_run_ranks)
    with pytest.raises(SystemExit) as info:
        bench.main(["--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert info.value.code == 1 and "Traceback" not in captured.err and not captured.out
    progress, line = captured.err.strip().splitlines()  # the start line, then the error in one line
    assert progress.startswith("[bench_mega_moe] 2 rank(s)")
    assert line == ("cute-moe bench-mega-moe: error: RuntimeError: rank 1 raised: RuntimeError: cute_moe.ep: mega_moe "
                    "(grid barrier) on rank 1 timed out; rank 0 still running after 300 s: killed (rows finished "
                    f"before are in {tmp_path}/mega_moe.md) (--debug or CUTE_MOE_DEBUG=1 shows the traceback)")


def test_the_plan_survives_the_trip_to_the_ranks():
    # run_ranks spawns processes: the rank function is imported by name, the plan pickled
    plan = bench.Plan(("flash",), (8, 128), 10, "/tmp/out", (("ranks", "2"),))
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert pickle.loads(pickle.dumps(bench.bench_rank)) is bench.bench_rank


def test_weight_bytes_per_format_and_the_weights_option():
    """MXFP4 experts stream half a byte per weight plus one exponent byte per 32; FP8 a byte plus
    one FP32 scale per 128 x 128 block; ``--weights`` takes only the two formats."""
    elements = 3 * 4096 * 2048
    assert FLASH.expert_bytes("fp4") == elements // 2 + elements // 32
    assert FLASH.expert_bytes("fp8") == elements + 4 * elements // (128 * 128)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args(["--out", "x", "--weights", "fp4"]).weights == "fp4"
    assert parser.parse_args(["--out", "x"]).weights == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--weights", "fp16"])
