"""GemmSpec / KernelConfig reject values the kernel cannot compile."""

import pytest

from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.specs import GemmSpec


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="batched", n=64, k=64), "kind"),
    (dict(kind="dense", n=60, k=64), "n"),
    (dict(kind="dense", n=64, k=0), "k"),
    (dict(kind="dense", n=64, k=64, d_dtype="fp16"), "d_dtype"),
    (dict(kind="masked", n=64, k=64, has_c=True), "has_c"),
    (dict(kind="dense", n=64, k=64, arch="sm_80"), "arch"),
])
def test_gemm_spec_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemmSpec(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile_m=32), "tile_m"),
    (dict(tile_n=96), "tile_n"),
    (dict(cluster_m=2, cluster_n=2), "cluster"),
    (dict(stages=1), "stages"),
    (dict(panel=0), "panel"),
])
def test_kernel_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelConfig(**kwargs)


def test_keys_distinguish_specializations():
    assert GemmSpec("dense", 64, 64).key() != GemmSpec("dense", 64, 64, d_dtype="fp32").key()
    assert KernelConfig().key() != KernelConfig(cluster_m=2).key()
