"""SM count and cluster occupancy of a device, from cutlass's HardwareInfo.

HardwareInfo compiles an empty DSL kernel to query the driver (a DSL compile per query); here the
empty kernel is a few lines of PTX loaded once per device, so the query costs milliseconds on the
first launch of a process.
"""

import torch
from cuda.bindings import driver
from cutlass.utils import HardwareInfo

_EMPTY_KERNEL = "cute_moe_occupancy_probe"
# Thread-block clusters exist from sm_90 on; the driver JIT-compiles this PTX for the device at hand.
_EMPTY_PTX = f"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry {_EMPTY_KERNEL}() {{ ret; }}
""".encode() + b"\0"


class _ProbeHardwareInfo(HardwareInfo):
    """HardwareInfo whose occupancy probe is the PTX empty kernel above."""

    _functions: dict = {}  # device index -> the probe loaded into that device's context

    def _get_device_function(self):
        function = self._functions.get(self.device_id)
        if function is None:
            module = self._checkCudaErrors(driver.cuModuleLoadData(_EMPTY_PTX))
            function = self._functions[self.device_id] = self._checkCudaErrors(
                driver.cuModuleGetFunction(module, _EMPTY_KERNEL.encode()))
        return function


def max_active_clusters(device_index: int, cluster_size: int) -> int:
    """Clusters of ``cluster_size`` CTAs (one CTA per SM, all shared memory) resident at once."""
    with torch.cuda.device(device_index):
        torch.cuda.init()
        return _ProbeHardwareInfo(device_index).get_max_active_clusters(cluster_size)


def multiprocessor_count(device_index: int) -> int:
    """SMs of the device, from the same hardware info."""
    with torch.cuda.device(device_index):
        torch.cuda.init()
        return _ProbeHardwareInfo(device_index).get_device_multiprocessor_count()
