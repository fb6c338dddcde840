"""The CUDA runtime library (libcudart) of NVIDIA's pip wheels, found and shown to Polygraphy.

Polygraphy's CUDA wrapper (polygraphy.cuda.wrapper(), made on its first CUDA call) looks for
libcudart.so* in the folders of LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib, /lib and, from
0.53, <site-packages>/nvidia/cuda_runtime/lib: the layout of the CUDA 12 wheels. The CUDA 13
wheels that torch's CUDA 13 builds install put it in nvidia/cu13/lib, where Polygraphy does not
look. It reads LD_LIBRARY_PATH from os.environ when that wrapper is made, not at process start,
and loads the file it finds by its full path: so adding the folder to os.environ in the running
process is enough, if it happens before Polygraphy's first CUDA call. (The dynamic loader reads
LD_LIBRARY_PATH at process start only: this changes nothing that is loaded by name.)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from resfuse.errors import BackendUnavailableError

_CUDART = re.compile(r"libcudart\.so\.(\d+)(\.\d+)*")


def find_cudart(search: Iterable[str | Path] | None = None) -> Path | None:
    """libcudart.so.N in an nvidia wheel under the `search` folders (default: sys.path), in any
    wheel layout: nvidia/cuda_runtime/lib (CUDA 12), nvidia/cu13/lib (CUDA 13), nvidia/cuNN/lib.
    The highest N wins (a driver that runs torch's CUDA runs it), then the earlier folder;
    None when there is none."""
    found = []
    for rank, root in enumerate(sys.path if search is None else search):
        if not (root and Path(root).is_dir()):  # sys.path may hold "" or a zip file
            continue
        for lib in Path(root).glob("nvidia/*/lib/libcudart.so.*"):
            match = _CUDART.fullmatch(lib.name)
            if match:
                found.append((-int(match[1]), rank, str(lib)))
    return Path(min(found)[2]) if found else None


def expose_cudart(search: Iterable[str | Path] | None = None) -> Path:
    """Put the folder of find_cudart(search) first in os.environ["LD_LIBRARY_PATH"], where
    Polygraphy's CUDA wrapper looks when it is made, and return the library. Call it before
    Polygraphy's first CUDA call: the wrapper is made once per process."""
    lib = find_cudart(search)
    if lib is None:
        raise BackendUnavailableError(
            "no libcudart.so.* in an nvidia wheel on sys.path (nvidia/*/lib); install a CUDA "
            "build of torch or nvidia-cuda-runtime, or put the CUDA toolkit's lib64 on "
            "LD_LIBRARY_PATH"
        )
    folder = str(lib.parent)
    others = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p != folder]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([folder, *filter(None, others)])
    return lib


def cuda_driver_version() -> int:
    """The CUDA version the installed NVIDIA driver supports, as cuDriverGetVersion gives it
    (12080 for 12.8), read from the driver's libcuda; 0 where there is none. TensorRT-RTX's
    runtime caches are tied to it (resfuse.runtime.backends.tensorrt.runtime_cache_name)."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version = ctypes.c_int(0)
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0


_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, _MINOR


def cuda_device(index: int = 0) -> tuple[str, str] | None:
    """The name and compute capability ("9.0") of CUDA device `index`, numbered as
    CUDA_VISIBLE_DEVICES makes them, read from the driver's libcuda: no torch (the base install
    has none, and importing it costs seconds). None without a driver or that device. It
    initialises the driver (cuInit), after which a fork cannot use CUDA: call it only in a
    process about to run on the GPU."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    calls = (
        lambda: libcuda.cuInit(0),
        lambda: libcuda.cuDeviceGet(ctypes.byref(device), index),
        lambda: libcuda.cuDeviceGetName(name, len(name), device),
        lambda: libcuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device),
        lambda: libcuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device),
    )
    if any(call() != 0 for call in calls):  # CUDA_SUCCESS is 0
        return None
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"
