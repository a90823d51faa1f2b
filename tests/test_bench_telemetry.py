"""The benchmark's clock / power telemetry and per-row roofline (CPU only)."""

import pytest

from cute_moe.tools import bench_common, gpu_telemetry
from cute_moe.tools.bench_common import HEADER, Roofline, Row, format_row
from cute_moe.tools.gpu_telemetry import REASON_HW_THERMAL, REASON_SW_POWER_CAP, Sample, summarize


def test_summary_takes_medians_and_the_share_of_limited_samples():
    samples = [Sample(1500, 690.0, REASON_SW_POWER_CAP), None, Sample(1600, 700.0, 0),
               Sample(1400, 650.0, REASON_SW_POWER_CAP | REASON_HW_THERMAL), Sample(1700, 600.0, 0)]
    s = summarize(samples)
    assert s.sm_mhz == 1550 and s.watts == 670.0
    assert s.power_capped == 0.5 and s.thermal == 0.25
    assert summarize([None, None]) is None and summarize([]) is None


def test_sample_is_none_without_nvml(monkeypatch):
    gpu_telemetry._device.cache_clear()
    monkeypatch.setattr(gpu_telemetry, "NVML_LIBRARY", "libno-such-nvml.so.0")
    try:
        assert gpu_telemetry.sample(0) is None
    finally:
        gpu_telemetry._device.cache_clear()


def test_roofline_picks_the_higher_ceiling():
    roof = Roofline({"bf16": 4096 * 132, "fp8": 8192 * 132}, 4.0e12)
    flops = 4096 * 132 * 1500e6 * 1e-3  # one millisecond of tensor work at 1500 MHz
    assert roof.ceiling("bf16", flops, 1e9, 1500) == (pytest.approx(1000.0), "tensor")
    assert roof.ceiling("fp8", flops, 1e9, 1500) == (pytest.approx(500.0), "tensor")
    assert roof.ceiling("fp8", flops, 4e9, 1500) == (pytest.approx(1000.0), "memory")


def test_rows_show_clock_and_roofline_only_when_read():
    plain = Row("masked", "s", 10.0, 12.0, 1.0, 1.0, 1.2, 0.0, "base")
    read = Row("masked", "s", 10.0, 12.0, 1.0, 1.0, 1.2, 0.0, "base", "", 1515.0, 1530.0, 690.4, 0.95, 0.0, 0.87,
               "memory")
    hot = Row("masked", "s", 10.0, 12.0, 1.0, 1.0, 1.2, 0.0, "base", "", 1515.0, 1530.0, 690.4, 0.95, 0.25, 0.87,
              "memory")
    columns = HEADER.splitlines()[0].count("|")
    assert format_row(plain).count("|") == columns and format_row(read).count("|") == columns
    assert format_row(plain).endswith("| — | — |")
    assert format_row(read).endswith("| 1515 / 1530, 690 W, 95% | 87% memory |")
    assert format_row(hot).endswith("| 1515 / 1530, 690 W, 95%, thermal 25% | 87% memory |")


def test_timed_row_records_what_the_telemetry_read(monkeypatch):
    readings = iter([Sample(1500, 700.0, REASON_SW_POWER_CAP | REASON_HW_THERMAL), Sample(1700, 500.0, 0)] * 20)

    def fake_time_pair(ours, base, num_sets, repeats=20, telemetry=None):
        for _ in range(repeats):
            telemetry[0].append(next(readings))
            telemetry[1].append(next(readings))
        return 10.0, 11.0

    monkeypatch.setattr(bench_common, "time_pair", fake_time_pair)
    monkeypatch.setattr(bench_common.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(bench_common, "device_roofline", lambda index: Roofline({"bf16": 1e6}, 1e12))
    row = bench_common.timed_row("dense", "s", None, None, 1, flops=6e9, bytes_moved=1e6, diff=0.0, baseline="b")
    assert (row.ours_us, row.base_us, row.ratio) == (10.0, 11.0, pytest.approx(1.1))
    assert (row.sm_mhz, row.base_sm_mhz, row.watts, row.power_capped, row.thermal) == (1500, 1700, 700.0, 1.0, 1.0)
    assert row.bound == "tensor" and row.roofline == pytest.approx(6e9 / (1e6 * 1500) / 10.0)
