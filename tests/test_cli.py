"""The `cute-moe` command line on a machine without a GPU: one-line errors, exit codes, help texts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cute_moe
from cute_moe import dispatch
from cute_moe.models import PRESETS
from cute_moe.launcher import DEBUG_ENV
from cute_moe.tools import cli, first_call, precompile, tune

TINY = {"name": "Tiny", "hidden": 256, "moe_intermediate": 128, "experts": 8, "top_k": 2}


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Every test sees no GPU, also on a machine with one; rules only (no tuned table), no debug."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, "off")
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def shapes_file(tmp_path: Path, *models: dict) -> str:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(list(models)))
    return str(path)


def failure(capsys, main, argv: list[str]) -> tuple[int, str]:
    """Exit status of ``main(argv)`` and its one stderr line; asserts nothing else was printed."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert not captured.out and len(captured.err.splitlines()) == 1, captured
    return info.value.code, captured.err.rstrip("\n")


@pytest.mark.parametrize("argv,code,message", [
    (["bench", "--nk", "garbage"], 2,
     "cute-moe bench: error: --nk: expected NxK pairs like 4096x7168, got 'garbage'"),
    (["bench", "--nk", "4096x7168,0x128"], 2, "cute-moe bench: error: --nk: "),
    (["bench", "--config", "tile_m=7"], 2, "cute-moe bench: error: --config: tile_m: expected 64 or 128, got 7"),
    (["bench", "--config", "garbage"], 2, "cute-moe bench: error: --config: expected comma-separated field=int"),
    (["bench", "--only", "foo"], 2, "cute-moe bench: error: --only: unknown kind 'foo' (expected among "
                                    "contiguous, ragged, masked, dense, fp8, fp8_masked)"),
    (["bench", "--only", ","], 2, "cute-moe bench: error: --only: expected at least one of contiguous"),
    (["bench", "--alignment", "100"], 2,
     "cute-moe bench: error: --alignment: expected a positive multiple of 64, got 100"),
    (["bench", "--alignment", "x"], 2, "cute-moe bench: error: argument --alignment: invalid int value: 'x'"),
    (["bench", "--bogus"], 2, "cute-moe: error: unrecognized arguments: --bogus"),
    (["bench"], 1, "cute-moe bench: error: benchmarking needs a GPU, none is visible"),
    (["bench", "--only", "dense", "--nk", "256x512", "--alignment", "128", "--config", "tile_m=64"], 1,
     "cute-moe bench: error: benchmarking needs a GPU"),
    (["precompile", "--model", "Kimi-K2", "--jobs", "0"], 2,
     "cute-moe precompile: error: --jobs: expected >= 1, got 0"),
    (["precompile", "--model", "Kimi-K2", "--jobs", "0", "--dry-run"], 2, "cute-moe precompile: error: --jobs"),
    (["precompile"], 2, "cute-moe precompile: error: one of the arguments --model --shapes is required"),
    (["tune", "--model", "Kimi-K2", "--repeats", "0"], 2, "cute-moe tune: error: --repeats: expected >= 1, got 0"),
    (["tune", "--model", "Kimi-K2", "--jobs", "0"], 2, "cute-moe tune: error: --jobs: expected >= 1, got 0"),
    (["tune", "--model", "Kimi-K2"], 1, "cute-moe tune: error: measuring sm_90a kernels needs a GPU"),
    (["tune", "--model", "all", "--ep", "0"], 2, "cute-moe tune: error: --ep: expected >= 1, got 0"),
    (["tune", "--model", "all", "--decode-m", "8,x"], 2,
     "cute-moe tune: error: --decode-m: expected comma-separated positive integers, got '8,x'"),
    (["tune", "--model", "all", "--space", "far"], 2, "cute-moe tune: error: argument --space: invalid choice"),
    (["nope"], 2, "cute-moe: error: argument COMMAND: invalid choice: 'nope'"),
])
def test_errors_are_one_line_naming_the_option(capsys, tmp_path, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    status, line = failure(capsys, cli.main, argv)
    assert status == code and line.startswith(message), line
    assert not any(tmp_path.iterdir())  # nothing written: no bench_results, no tuned table


@pytest.mark.parametrize("command", ["precompile", "tune"])
def test_shapes_errors_blame_the_entry_not_options_left_at_their_defaults(capsys, tmp_path, command):
    odd = {**TINY, "name": "Odd", "moe_intermediate": 50}
    path = shapes_file(tmp_path, TINY, odd)
    status, line = failure(capsys, cli.main, [command, "--shapes", path])
    assert status == 2
    assert line == (f"cute-moe {command}: error: --shapes: {path}: entry 1: Odd: moe_intermediate: expected a "
                    "multiple of 8, got 50")

    path = shapes_file(tmp_path, {**TINY, "hidden": 250})
    assert failure(capsys, cli.main, [command, "--shapes", path])[1].startswith(
        f"cute-moe {command}: error: --shapes: {path}: entry 0: Tiny: hidden: expected a multiple of 8")

    path = shapes_file(tmp_path, TINY, {**TINY, "name": "Huge", "experts": 4096})  # 4096 groups on one rank
    assert failure(capsys, cli.main, [command, "--shapes", path])[1].startswith(
        f"cute-moe {command}: error: --shapes: {path}: entry 1: groups: expected between 1 and")


def test_shapes_errors_name_tp_and_ep_when_given(capsys, tmp_path):
    path = shapes_file(tmp_path, {**TINY, "moe_intermediate": 136})
    assert failure(capsys, cli.main, ["precompile", "--shapes", path, "--tp", "2", "--dry-run"])[1] == (
        "cute-moe precompile: error: --tp: expected a divisor of Tiny's moe_intermediate 136 leaving a multiple "
        "of 8 per rank, got 2")
    assert failure(capsys, cli.main, ["precompile", "--shapes", path, "--ep", "3", "--dry-run"])[1].startswith(
        "cute-moe precompile: error: --ep: expected a divisor of Tiny's 8 experts, got 3")
    assert cli.main(["precompile", "--shapes", path, "--ep", "8", "--dry-run"]) == 0


def test_unexpected_errors_are_one_line_unless_debug(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("first line\n  second line")

    monkeypatch.setattr(precompile, "run", boom)
    status, line = failure(capsys, cli.main, ["precompile", "--model", "Kimi-K2"])
    assert status == 1
    assert line == ("cute-moe precompile: error: RuntimeError: first line second line "
                    "(--debug or CUTE_MOE_DEBUG=1 shows the traceback)")
    with pytest.raises(RuntimeError, match="first line"):
        cli.main(["--debug", "precompile", "--model", "Kimi-K2"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="first line"):
        cli.main(["precompile", "--model", "Kimi-K2"])


def test_ctrl_c_is_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompile, "run", interrupted)
    assert failure(capsys, cli.main, ["precompile", "--model", "Kimi-K2"]) == (130, "cute-moe precompile: interrupted")


def test_first_call_checks_arguments_then_the_gpu(capsys):
    status, line = failure(capsys, first_call.main, ["--rows", "0"])
    assert status == 2 and line.startswith("python -m cute_moe.tools.first_call: error: --rows: expected >= 1, got 0")
    status, line = failure(capsys, first_call.main, [])
    assert status == 1 and line.startswith(
        "python -m cute_moe.tools.first_call: error: timing first calls needs a GPU, none is visible")


@pytest.mark.parametrize("argv,code,message", [
    (["-m", "cute_moe.tools.cli", "bench", "--nk", "garbage"], 2, "cute-moe bench: error: --nk: "),
    (["-m", "cute_moe.tools.bench"], 1, "cute-moe bench: error: benchmarking needs a GPU"),
    (["-m", "cute_moe.tools.first_call"], 1, "python -m cute_moe.tools.first_call: error: timing first calls needs"),
])
def test_modules_end_in_one_line_without_a_gpu(tmp_path, argv, code, message):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", dispatch.TUNED_TABLE_ENV: "off"}
    env.pop(DEBUG_ENV, None)
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "Warning" not in line]  # torch may warn on import
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not any(tmp_path.iterdir())


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_texts(capsys):
    top = help_text(capsys, ["--help"])
    assert top.startswith("usage: cute-moe [-h] [--version] [--debug] COMMAND")
    assert "bench" in top and "--debug" in top and "CUTE_MOE_DEBUG=1" in top
    text = help_text(capsys, ["bench", "--help"])
    assert text.startswith("usage: cute-moe bench [-h] [--section SECTION] [--only ONLY]")
    assert "--presets" in text and "--compare" in text and "--nk" in text
    assert "fp8_masked" in text and "positive multiple of 64" in text
    for command in ("precompile", "tune"):
        text = help_text(capsys, [command, "--help"])
        assert text.startswith(f"usage: cute-moe {command} ")
        assert all(name in text for name in PRESETS), text
    assert "$XDG_CONFIG_HOME/cute-moe/tuned/<arch>.json" in help_text(capsys, ["tune", "--help"])


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"cute-moe {cute_moe.__version__}\n"


def test_tune_writes_to_the_user_config_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    default = tune.output_path(None, "sm_90a")
    assert default == tmp_path / "cute-moe" / "tuned" / "sm_90a.json"
    package = Path(cute_moe.__file__).resolve().parent
    assert package not in default.resolve().parents
    assert tune.output_path(str(tmp_path / "t.json"), "sm_90a") == tmp_path / "t.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tune.output_path(None, "sm_90a") == tmp_path / "home" / ".config" / "cute-moe" / "tuned" / "sm_90a.json"
