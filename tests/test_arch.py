"""Arch registry, lazy import, compiling without environment variables, warm keys (CPU only)."""

import os
import subprocess
import sys

import pytest
import torch

import cute_moe
from cute_moe import arch, dispatch, launcher
from cute_moe.kernels.sm90.config import Sm90Config


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CUTE_DSL_", "CUTE_MOE_"))}
    return subprocess.run([sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True,
                          timeout=300)


def test_an_arch_without_backend_is_refused_by_the_registry():
    with pytest.raises(ValueError, match=r"^arch: no cute-moe backend for 'sm_100a' in this build \(registered: sm_90a\)"):
        arch.get_backend("sm_100a")
    with pytest.raises(ValueError, match="^arch: no cute-moe backend for 'sm_100a'"):
        cute_moe.GemmSpec("dense", 64, 64, arch="sm_100a")


def test_compute_capability_maps_to_an_arch_and_the_override_wins(monkeypatch):
    assert arch.arch_of_capability((9, 0)) == "sm_90a"
    with pytest.raises(ValueError, match="compute capability 8.0"):
        arch.arch_of_capability((8, 0))
    monkeypatch.setenv(arch.ARCH_ENV, "sm_90a")
    assert arch.arch_of_device(0) == "sm_90a" and arch.default_arch() == "sm_90a"


def test_backend_owns_config_rules_and_family():
    backend = arch.get_backend("sm_90a")
    assert backend.config_type is Sm90Config and backend.max_groups == 1024
    family = backend.kernel_family(cute_moe.GemmSpec("masked", 64, 64))
    assert all(path.is_file() for path in family.sources)
    assert {p.name for p in family.sources} >= {"grouped_gemm.py", "grouped_schedulers.py", "scheduler.py"}


def test_import_does_not_load_cutlass():
    result = _run("import sys, cute_moe; print('cutlass' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_compiling_needs_no_environment_variable():
    # The new user's call from the platform issue, on a CPU, with no CUTE_DSL_ARCH exported.
    code = ("from cute_moe import runtime, GemmSpec, KernelConfig\n"
            "fn = runtime.get_kernel(GemmSpec(kind='contiguous', n=256, k=512), KernelConfig())\n"
            "print(callable(fn))")
    result = _run(code, CUTE_MOE_CACHE="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True")


def _record_configs(monkeypatch) -> list:
    """Let dense launches run on CPU tensors: validation off, each build records its config."""
    built = []

    def build(self, key, *, device, **facts):
        config = dispatch.resolve(dispatch.problem_of(a=self.a.operand, b=self.b.operand, **facts))
        launch = launcher._launches[key] = launcher.Launch(lambda *args: built.append(config), 1, config)
        return launch

    monkeypatch.setattr(launcher.GemmOp, "_build", build)
    monkeypatch.setattr(launcher.DenseOp, "validate", lambda self, *args: None)
    monkeypatch.setattr(launcher, "_launches", {})
    return built


def test_contiguous_and_ragged_launches_carry_their_rows_per_group_hint(monkeypatch):
    built = _record_configs(monkeypatch)
    hints = []
    build = launcher.GemmOp._build

    def build_and_record_hint(self, key, **facts):
        hints.append((facts["kind"], facts["expected_m"]))
        return build(self, key, **facts)

    monkeypatch.setattr(launcher.GemmOp, "_build", build_and_record_hint)
    for op in (launcher.ContiguousOp, launcher.RaggedOp):
        monkeypatch.setattr(op, "validate", lambda self, *args: None)
    groups, k, n = 32, 7168, 4096
    b = torch.zeros(groups, n, k, dtype=torch.bfloat16)
    for rows in (128, 4096, 128, 200):  # rows per group; 128 again: the warm entry, no new build
        a = torch.zeros(groups * rows, k, dtype=torch.bfloat16)
        d = torch.zeros(groups * rows, n, dtype=torch.bfloat16)
        layout = torch.zeros(groups * rows, dtype=torch.int32)
        if rows % 128 == 0:
            cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout)
        offs = torch.arange(1, groups + 1, dtype=torch.int32) * rows
        cute_moe.grouped_mm(a, b.transpose(1, 2), offs)
    assert hints == [("contiguous", 128), ("ragged", 128), ("contiguous", 4096), ("ragged", 4096), ("ragged", 200)]
    assert built[-1] == dispatch.choose_config("ragged", n, k, groups, 200, 0)


@pytest.mark.parametrize("order", [(64, 100), (100, 64), (128, 200), (200, 128)])
def test_warm_key_buckets_rows_as_dispatch_does(monkeypatch, order):
    built = _record_configs(monkeypatch)
    b = torch.zeros(4096, 7168, dtype=torch.bfloat16)
    for m in order + order:
        a = torch.zeros(m, 7168, dtype=torch.bfloat16)
        cute_moe.bf16_gemm_nt(a, b, torch.zeros(m, 4096, dtype=torch.bfloat16))
    expected = [dispatch.choose_config("dense", 4096, 7168, 1, m, 0) for m in order + order]
    assert built == expected
