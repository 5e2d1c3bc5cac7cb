"""Which CUDA GPUs this machine has, asked of the driver itself.

Written by hand over ctypes because nothing else answers without a heavy dependency: torch may be
the CPU build, cuda-python is not installed, and TensorRT's own calls fail with driver errors
rather than saying "no GPU". No driver, no device, or any driver error means no GPU.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass

# CUdevice_attribute values from cuda.h.
_COMPUTE_CAPABILITY_MAJOR = 75
_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "SM89"


def _driver():
    names = ("nvcuda.dll",) if sys.platform.startswith("win") else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.cache
def cuda_devices() -> tuple[CudaDevice, ...]:
    driver = _driver()
    if driver is None or driver.cuInit(0) != 0:
        return ()
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    devices = []
    for index in range(count.value):
        handle = ctypes.c_int(0)
        if driver.cuDeviceGet(ctypes.byref(handle), index) != 0:
            continue
        name = ctypes.create_string_buffer(256)
        driver.cuDeviceGetName(name, len(name), handle)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        driver.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, handle)
        driver.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, handle)
        devices.append(CudaDevice(index, name.value.decode(errors="replace"), f"SM{major.value}{minor.value}"))
    return tuple(devices)


def no_gpu_reason() -> str | None:
    """None when a CUDA GPU is usable here; else why not, in a few words."""
    if _driver() is None:
        return "no NVIDIA driver (libcuda) on this machine"
    if not cuda_devices():
        return "the NVIDIA driver reports no usable CUDA device"
    return None
