"""SM clock, board power and clock-limit reasons of a CUDA device, read through NVML (read only).

The benchmark samples them while its CUDA graphs replay, so each row says at which clock it ran and
whether the power cap held the clock down. NVML is loaded with ctypes from the driver's
``libnvidia-ml.so.1``; without it (no driver, another vendor) every sample is ``None``.
"""

import ctypes
import functools
import statistics
from dataclasses import dataclass
from typing import Optional

import torch

NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0
NVML_CLOCK_SM = 1
NVML_FI_DEV_POWER_INSTANT = 186  # field id of the instantaneous board power (mW); GetPowerUsage averages 1 s
# nvmlClocksEventReasons bits (nvml.h): what holds the clocks below their maximum.
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80
POWER_REASONS = REASON_SW_POWER_CAP | REASON_HW_POWER_BRAKE
THERMAL_REASONS = REASON_SW_THERMAL | REASON_HW_THERMAL | REASON_HW_SLOWDOWN


@dataclass(frozen=True)
class Sample:
    """One reading: SM clock (MHz), board power (W), clock-limit reason bits."""

    sm_mhz: int
    watts: float
    reasons: int


@dataclass(frozen=True)
class ClockPower:
    """Medians of a run of samples and the share of samples whose clock the power cap or heat held down."""

    sm_mhz: float
    watts: float
    power_capped: float  # fraction of samples with a power reason (software cap or hardware brake)
    thermal: float  # fraction of samples with a thermal or hardware slowdown reason


def summarize(samples: list[Optional[Sample]]) -> Optional[ClockPower]:
    """The medians and shares over the samples that were read (``None`` when none was)."""
    read = [s for s in samples if s is not None]
    if not read:
        return None
    return ClockPower(statistics.median(s.sm_mhz for s in read), statistics.median(s.watts for s in read),
                      sum(bool(s.reasons & POWER_REASONS) for s in read) / len(read),
                      sum(bool(s.reasons & THERMAL_REASONS) for s in read) / len(read))


class _ValueUnion(ctypes.Union):
    _fields_ = [("dVal", ctypes.c_double), ("uiVal", ctypes.c_uint), ("ulVal", ctypes.c_ulong),
                ("ullVal", ctypes.c_ulonglong), ("sllVal", ctypes.c_longlong), ("siVal", ctypes.c_int)]


class _FieldValue(ctypes.Structure):
    """nvmlFieldValue_t."""

    _fields_ = [("fieldId", ctypes.c_uint), ("scopeId", ctypes.c_uint), ("timestamp", ctypes.c_longlong),
                ("latencyUsec", ctypes.c_longlong), ("valueType", ctypes.c_int), ("nvmlReturn", ctypes.c_int),
                ("value", _ValueUnion)]


class _Nvml:
    """The NVML handle of one CUDA device (matched by PCI bus id, so CUDA_VISIBLE_DEVICES is honoured)."""

    def __init__(self, library: ctypes.CDLL, pci_bus_id: str):
        self.lib = library
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlInit_v2())
        self._check(self.lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(self.handle)))
        self._reasons = getattr(self.lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            self.lib.nvmlDeviceGetCurrentClocksThrottleReasons

    @staticmethod
    def _check(status: int) -> None:
        if status != NVML_SUCCESS:
            raise OSError(f"NVML returned {status}")

    def sample(self) -> Sample:
        mhz, reasons = ctypes.c_uint(), ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetClockInfo(self.handle, NVML_CLOCK_SM, ctypes.byref(mhz)))
        self._check(self._reasons(self.handle, ctypes.byref(reasons)))
        return Sample(mhz.value, self._milliwatts() / 1000, reasons.value)

    def _milliwatts(self) -> int:
        """Instantaneous board power, or NVML's one-second average where the driver lacks the field."""
        field = _FieldValue(fieldId=NVML_FI_DEV_POWER_INSTANT)
        if self.lib.nvmlDeviceGetFieldValues(self.handle, 1, ctypes.byref(field)) == NVML_SUCCESS and \
                field.nvmlReturn == NVML_SUCCESS:
            return field.value.uiVal
        milliwatts = ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(milliwatts)))
        return milliwatts.value


def _pci_bus_id(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


@functools.lru_cache(maxsize=None)
def _device(device_index: int) -> Optional[_Nvml]:
    try:
        return _Nvml(ctypes.CDLL(NVML_LIBRARY), _pci_bus_id(device_index))
    except (OSError, AttributeError):  # no driver library, an old one, or no such device
        return None


def sample(device_index: Optional[int] = None) -> Optional[Sample]:
    """The device's clock, power and limit reasons now (the current device by default); ``None`` when
    NVML cannot be read."""
    nvml = _device(torch.cuda.current_device() if device_index is None else device_index)
    if nvml is None:
        return None
    try:
        return nvml.sample()
    except OSError:
        return None
