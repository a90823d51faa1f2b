"""Dispatcher rules, tuned tables, overrides and config printing (CPU only)."""

import itertools
import json

import pytest

from cute_moe import dispatch
from cute_moe.dispatch import (buckets_between, choose_config, force_config, format_config, m_bucket, parse_config,
                               problem_of, reachable_configs, table_entry)
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.kernels.sm90.rules import can_implement, rule_config
from cute_moe.operands import FP8_PER_BLOCK, FP8_PER_TOKEN, Operand
from cute_moe.specs import ALIGNED_KINDS


def check_config_fits(kind, config, alignment):
    can_implement(problem_of(kind, 4096, 7168, 8, 0, alignment), config)


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """No tuned table unless a test installs one; decisions and tables reloaded around each test."""
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, "off")
    monkeypatch.delenv("CUTE_MOE_PRINT_CONFIGS", raising=False)
    dispatch.reload_tuned_table()
    yield
    dispatch.reload_tuned_table()


@pytest.mark.parametrize("m,bucket", [(-3, 0), (0, 0), (1, 16), (16, 16), (17, 32), (64, 64), (65, 128),
                                      (2048, 2048), (2049, 4096), (10**6, 4096)])
def test_m_bucket(m, bucket):
    assert m_bucket(m) == bucket


def test_buckets_between_covers_every_hint():
    for lo, hi in [(1, 1), (1, 300), (0, 70), (100, 5000), (3000, 9000)]:
        buckets = buckets_between(lo, hi)
        assert {m_bucket(m) for m in range(lo, hi + 1)} == set(buckets)


def test_masked_decode_uses_64_row_tiles_without_cluster():
    config = choose_config("masked", 4096, 7168, 32, 16, 0)
    assert (config.tile_m, config.tile_n, config.cluster_size) == (64, 256, 1)


def test_unknown_rows_take_the_b_multicast_cluster():
    assert choose_config("masked", 4096, 7168, 32, 0, 0) == KernelConfig(tile_m=128, tile_n=256, cluster_m=2)


def test_ragged_multicasts_a_over_an_n_cluster():
    # A ragged group is cut into whole cluster tiles: an M-cluster would idle a CTA of each group's last one.
    assert choose_config("ragged", 7168, 2048, 32, 0, 0) == KernelConfig(tile_m=128, tile_n=256, cluster_n=2)
    assert choose_config("ragged", 256, 2048, 32, 0, 0).cluster_size == 1  # one N tile: nothing to share


def test_ragged_rules_ignore_the_hint_of_uneven_counts():
    # The hint is the mean rows per group; the busiest experts hold 2-3x it (measured: the hinted
    # choices lost up to 15% on the presets' uneven routing).
    assert {choose_config("ragged", 6144, 7168, 48, m, 0) for m in (0, 16, 64, 128, 4000)} == {
        KernelConfig(tile_m=128, tile_n=256, cluster_n=2)}


def test_contiguous_clusters_share_b_along_m_at_any_alignment():
    # M-clusters may span two 128-row segments: the kernel multicasts B only inside one expert.
    for alignment in (128, 256):
        assert choose_config("contiguous", 4096, 7168, 8, 0, alignment) == KernelConfig(tile_n=256, cluster_m=2)
    assert choose_config("contiguous", 5760, 2880, 8, 0, 128).cluster_m == 2
    check_config_fits("contiguous", KernelConfig(tile_m=128, cluster_m=2), 128)
    # 64-row segments need 64-row tiles.
    assert choose_config("contiguous", 4096, 7168, 8, 0, 64).tile_m == 64
    with pytest.raises(ValueError, match="tile_m"):
        check_config_fits("contiguous", KernelConfig(tile_m=128), 64)


def test_psum_tiles_divide_the_alignment():
    assert choose_config("psum", 4096, 7168, 8, 0, 64).tile_m == 64
    assert choose_config("psum", 4096, 7168, 8, 0, 128) == KernelConfig(tile_m=128, tile_n=256, cluster_m=2)
    with pytest.raises(ValueError, match="psum"):
        check_config_fits("psum", KernelConfig(tile_m=128), 64)
    check_config_fits("psum", KernelConfig(tile_m=64, cluster_m=2), 64)  # groups are tiled one by one


def test_fp8_uses_tiles_of_two_scale_blocks_like_bf16():
    for kind, m in (("masked", 16), ("masked", 0), ("contiguous", 0), ("psum", 0)):
        alignment = 128 if kind in ALIGNED_KINDS else 0
        fp8 = choose_config(kind, 4096, 7168, 32, m, alignment, a=FP8_PER_TOKEN, b=FP8_PER_BLOCK)
        assert fp8.tile_n == 256


def test_small_problems_use_narrower_tiles_to_fill_the_sms():
    # 16 groups x 1 M tile x 8 N blocks of 256 = 128 tiles < 132 SMs -> 128-wide tiles.
    assert choose_config("masked", 2048, 768, 16, 16, 0).tile_n == 128
    assert choose_config("masked", 2048, 768, 16, 16, 0, num_sms=100).tile_n == 256


def test_narrow_n_not_multiple_of_256_uses_128_wide_tiles():
    assert choose_config("ragged", 720, 2880, 16, 0, 0).tile_n == 128
    assert choose_config("ragged", 2880, 2880, 16, 0, 0).tile_n == 256


def test_rules_always_fit_and_only_see_the_bucket():
    for kind, n, groups, m, alignment in itertools.product(
            ("dense", "contiguous", "psum", "masked", "ragged"), (256, 720, 1536, 4096, 7168), (1, 8, 256),
            (0, 1, 5, 40, 64, 100, 128, 129, 700, 3000, 9000), (64, 128, 256, 512)):
        alignment = alignment if kind in ALIGNED_KINDS else 0
        config = choose_config(kind, n, 2048, groups, m, alignment)
        check_config_fits(kind, config, alignment)
        assert config == choose_config(kind, n, 2048, groups, m_bucket(m), alignment)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="sm_100a"), "arch"), (dict(a=Operand("fp8_e4m3", scale="ue8m0_1x32")), "operands"),
    (dict(d_dtype="fp16"), "d_dtype"),
    (dict(num_sms=0), "num_sms"),
])
def test_choose_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_config("masked", 4096, 7168, 32, 16, 0, **kwargs)


def test_reachable_configs_cover_every_hint_and_honour_force():
    hints = (0,) + buckets_between(1, 5000)
    reachable = reachable_configs("masked", 4096, 7168, 32, hints, 0)
    assert {choose_config("masked", 4096, 7168, 32, m, 0) for m in range(0, 5001, 7)} <= reachable
    forced = KernelConfig(tile_m=64, tile_n=64)
    with force_config(forced):
        assert reachable_configs("masked", 4096, 7168, 32, hints, 0) == {forced}


def _write_table(path, entries):
    path.write_text(json.dumps({"format": dispatch.TUNED_TABLE_FORMAT, "entries": entries}))


def test_tuned_table_wins_for_its_key_only(tmp_path, monkeypatch):
    problem = dispatch.problem_of("masked", 4096, 7168, 32, 40, 0)
    tuned = KernelConfig(tile_m=64, tile_n=128, cluster_n=2)
    _write_table(tmp_path / "t.json", [table_entry(problem, tuned, rules_us=1.0)])
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "t.json"))
    dispatch.reload_tuned_table()
    assert choose_config("masked", 4096, 7168, 8, 33, 0) == tuned  # same bucket (64), any group count
    assert choose_config("masked", 4096, 7168, 32, 65, 0) != tuned  # another bucket: the rules
    assert choose_config("masked", 4096, 2048, 32, 40, 0) != tuned  # another K


def test_a_bucket_without_entry_takes_the_hint_free_entry_then_the_rules(tmp_path, monkeypatch):
    hint_free = KernelConfig(tile_m=64, tile_n=256, cluster_m=2)
    bucket_256 = KernelConfig(tile_m=128, tile_n=128, cluster_n=2)
    _write_table(tmp_path / "t.json", [
        table_entry(dispatch.problem_of("ragged", 4096, 7168, 32, 0, 0), hint_free),
        table_entry(dispatch.problem_of("ragged", 4096, 7168, 32, 200, 0), bucket_256)])
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "t.json"))
    dispatch.reload_tuned_table()
    assert choose_config("ragged", 4096, 7168, 32, 129, 0) == bucket_256
    assert choose_config("ragged", 4096, 7168, 32, 40, 0) == hint_free
    assert dispatch.fallback_choice(dispatch.problem_of("ragged", 4096, 7168, 32, 200, 0)) == (hint_free,
                                                                                            "tuned, no hint")
    rules = rule_config(dispatch.problem_of("ragged", 2048, 7168, 32, 40, 0))
    assert choose_config("ragged", 2048, 7168, 32, 40, 0) == rules  # no entry of either key
    assert dispatch.fallback_choice(dispatch.problem_of("ragged", 4096, 7168, 32, 0, 0)) == (
        rule_config(dispatch.problem_of("ragged", 4096, 7168, 32, 0, 0)), "rules")


def test_tuned_config_that_does_not_fit_falls_back_to_rules(tmp_path, monkeypatch):
    problem = dispatch.problem_of("contiguous", 4096, 7168, 8, 0, 64)
    _write_table(tmp_path / "t.json", [table_entry(problem, KernelConfig(tile_m=128, cluster_m=2))])
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "t.json"))
    dispatch.reload_tuned_table()
    assert choose_config("contiguous", 4096, 7168, 8, 0, 64) == rule_config(problem)  # 128-row tiles, 64-row segments
    assert choose_config("contiguous", 4096, 7168, 8, 0, 128) == KernelConfig(tile_m=128, cluster_m=2)


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot read"),
    (json.dumps({"entries": []}), "not a cute-moe tuned table"),
    (json.dumps({"format": dispatch.TUNED_TABLE_FORMAT, "entries": [{"kind": "masked"}]}), "entry 0"),
    (json.dumps({"format": dispatch.TUNED_TABLE_FORMAT, "entries": [
        {"arch": "sm_90a", "kind": "masked", "operands": "bf16", "d_dtype": "bf16", "n": 64, "k": 64,
         "expected_m": 40, "config": {}}]}), "expected_m"),
    (json.dumps({"format": dispatch.TUNED_TABLE_FORMAT, "entries": [
        {"arch": "sm_90a", "kind": "masked", "operands": "bf16", "d_dtype": "bf16", "n": 64, "k": 64,
         "expected_m": 64, "config": {"tile_m": 96}}]}), "tile_m"),
])
def test_broken_tuned_table_is_an_error_naming_the_file(tmp_path, monkeypatch, content, match):
    (tmp_path / "t.json").write_text(content)
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "t.json"))
    dispatch.reload_tuned_table()
    with pytest.raises(ValueError, match=match) as info:
        choose_config("masked", 64, 64, 1, 64, 0)
    assert "t.json" in str(info.value)


def test_missing_tuned_table_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "absent.json"))
    dispatch.reload_tuned_table()
    with pytest.raises(ValueError, match="absent.json"):
        choose_config("masked", 64, 64, 1, 64, 0)


def test_package_table_is_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv(dispatch.TUNED_TABLE_ENV)
    monkeypatch.setattr(dispatch, "default_table_path", lambda arch: tmp_path / f"{arch}.json")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert dispatch.tuned_table_paths("sm_90a") == []
    _write_table(tmp_path / "sm_90a.json", [])
    assert dispatch.tuned_table_paths("sm_90a") == [tmp_path / "sm_90a.json"]


def test_print_configs_prints_each_decision_once(monkeypatch, capsys):
    monkeypatch.setenv("CUTE_MOE_PRINT_CONFIGS", "1")
    for _ in range(3):
        choose_config("masked", 4096, 7168, 32, 16, 0)
        choose_config("masked", 4096, 7168, 32, 15, 0)  # same bucket: same decision
    choose_config("ragged", 4096, 7168, 32, 0, 0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "masked" in lines[0] and "64x256 c1x1" in lines[0] and "(rules)" in lines[0]


def test_print_configs_off_by_default(capsys):
    choose_config("masked", 4096, 7168, 32, 16, 0)
    assert capsys.readouterr().err == ""


def test_parse_and_format_config():
    config = parse_config("tile_m=64, tile_n=128,cluster_n=2,stages=4")
    assert config == KernelConfig(tile_m=64, tile_n=128, cluster_n=2, stages=4)
    assert format_config(config) == "64x128 c1x2 stages=4"
    with pytest.raises(ValueError, match="CUTE_MOE_CONFIG"):
        parse_config("tile_q=3")


def test_force_config_nests_and_restores():
    outer, inner = KernelConfig(tile_m=64), KernelConfig(tile_n=128)
    assert dispatch.forced_config() is None
    with force_config(outer):
        with force_config(inner):
            assert dispatch.forced_config() == inner
        assert dispatch.forced_config() == outer
    assert dispatch.forced_config() is None


def test_small_m_dense_streams_b_with_paired_m_blocks():
    # Measured on the H200 (M=128): 64x64 c2x1 at N=4096, 64x128 c2x1 at N=7168.
    assert choose_config("dense", 4096, 7168, 1, 128, 0) == KernelConfig(tile_m=64, tile_n=64, cluster_m=2)
    assert choose_config("dense", 7168, 2048, 1, 128, 0) == KernelConfig(tile_m=64, tile_n=128, cluster_m=2)
    single = choose_config("dense", 4096, 7168, 1, 16, 0)
    assert (single.tile_m, single.cluster_m) == (64, 1)


def test_tuned_table_with_a_float_field_names_the_file_and_entry(tmp_path, monkeypatch):
    entry = {"arch": "sm_90a", "kind": "masked", "operands": "bf16", "d_dtype": "bf16", "n": 64, "k": 64,
             "expected_m": 64, "config": {"tile_m": 64, "stages": 2.5}}
    _write_table(tmp_path / "t.json", [entry])
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "t.json"))
    dispatch.reload_tuned_table()
    with pytest.raises(ValueError, match=r"t\.json: entry 0 is invalid: .*stages: expected int, got float 2\.5"):
        choose_config("masked", 64, 64, 1, 64, 0)


def test_tables_merge_shipped_then_user_then_explicit(tmp_path, monkeypatch):
    problem = problem_of("masked", 4096, 7168, 32, 16, 0)
    shipped, user, explicit = (KernelConfig(tile_m=64, tile_n=n) for n in (64, 128, 256))
    other = problem_of("masked", 4096, 2048, 32, 16, 0)
    monkeypatch.setattr(dispatch, "default_table_path", lambda arch: tmp_path / "shipped.json")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    _write_table(tmp_path / "shipped.json", [table_entry(problem, shipped), table_entry(other, shipped)])
    monkeypatch.delenv(dispatch.TUNED_TABLE_ENV)
    dispatch.reload_tuned_table()
    assert choose_config("masked", 4096, 7168, 32, 16, 0) == shipped
    dispatch.user_table_path("sm_90a").parent.mkdir(parents=True)
    _write_table(dispatch.user_table_path("sm_90a"), [table_entry(problem, user)])
    dispatch.reload_tuned_table()
    assert choose_config("masked", 4096, 7168, 32, 16, 0) == user
    assert choose_config("masked", 4096, 2048, 32, 16, 0) == shipped  # entries the user table lacks
    _write_table(tmp_path / "explicit.json", [table_entry(problem, explicit)])
    monkeypatch.setenv(dispatch.TUNED_TABLE_ENV, str(tmp_path / "explicit.json"))
    dispatch.reload_tuned_table()
    assert choose_config("masked", 4096, 7168, 32, 16, 0) == explicit


def test_malformed_config_variable_fails_at_the_first_launch_not_at_import(monkeypatch):
    monkeypatch.setattr(dispatch, "_ENV_CONFIG", "tile_m=7")
    dispatch._config_from_env.cache_clear()
    with pytest.raises(ValueError, match="^CUTE_MOE_CONFIG: tile_m: expected 64 or 128, got 7"):
        dispatch.forced_config()
    dispatch._config_from_env.cache_clear()
