"""Which GPUs this host serves: one worker per GPU, resolved before any worker starts.

GPU ids are *physical* ids: nvidia-smi's numbering, which is NVML's index and CUDA's index under
``CUDA_DEVICE_ORDER=PCI_BUS_ID``. The launcher (:mod:`launcher.supervisor_config`) gives each
worker ``CUDA_VISIBLE_DEVICES=<its id>``, ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``GPU_ID=<its id>``,
so the id in ``/stats``, in the worker's name and in nvidia-smi is the same number.

* ``GPU_IDS`` unset or empty: every candidate GPU.
* ``GPU_IDS=0,2``: exactly those (each must be a candidate); ``GPU_IDS=cpu``: no GPU, one CPU worker.
* Candidates: every GPU NVML counts, or, when ``CUDA_VISIBLE_DEVICES`` is set in the launcher's
  environment, only the ids it lists (read as physical ids; ``""`` or ``-1`` hides every GPU).
* No GPU at all (no NVIDIA driver, or none visible): one CPU worker, so the default
  ``MODEL_ID=tiny`` still serves on a laptop or in CI.

:func:`resolve_gpu_ids` is the pure rule (tested with fake inputs); :func:`nvml_device_count`
is the only part that asks the driver, and it never raises.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CPU_ONLY = "cpu"


class GpuSelectionError(ValueError):
    """GPU_IDS or CUDA_VISIBLE_DEVICES names GPUs this host cannot serve; the message says why."""


def _parse_ids(text: str, variable: str) -> list[int]:
    ids = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.isdigit():
            raise GpuSelectionError(
                f"{variable}={text!r}: {part!r} is not a GPU index. Hint: use nvidia-smi's numbering "
                f"(0,1,...); GPU UUIDs and MIG devices are not supported by the launcher")
        ids.append(int(part))
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise GpuSelectionError(f"{variable}={text!r} lists GPU {duplicates[0]} more than once")
    return ids


def visible_gpu_ids(cuda_visible_devices: str | None, device_count: int) -> list[int]:
    """The physical ids a worker may use: all ``device_count`` GPUs, or those CUDA_VISIBLE_DEVICES lists.

    As CUDA does, a negative entry ends the list (``-1`` alone hides every GPU). Without any GPU
    the list is empty whatever CUDA_VISIBLE_DEVICES says (a CPU host keeps working)."""
    every = list(range(device_count))
    if cuda_visible_devices is None or device_count == 0:
        return every
    entries = [p.strip() for p in cuda_visible_devices.split(",")]
    kept = []
    for entry in entries:
        if entry.startswith("-") and entry[1:].isdigit():
            break
        kept.append(entry)
    ids = _parse_ids(",".join(kept), "CUDA_VISIBLE_DEVICES")
    missing = [i for i in ids if i >= device_count]
    if missing:
        raise GpuSelectionError(
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} names GPU {missing[0]}, but this host has "
            f"{device_count} GPU(s) (ids {_describe(every)})")
    return ids


def resolve_gpu_ids(gpu_ids: str | None, cuda_visible_devices: str | None, device_count: int) -> list[int]:
    """The physical GPU ids to run one worker each on; an empty list means one CPU worker.

    ``gpu_ids`` is GPU_IDS (None or blank: every candidate), ``cuda_visible_devices`` the
    launcher's CUDA_VISIBLE_DEVICES (None: unset), ``device_count`` NVML's count (0: no driver).
    Raises :class:`GpuSelectionError` when GPU_IDS names a GPU that is not a candidate."""
    candidates = visible_gpu_ids(cuda_visible_devices, device_count)
    if gpu_ids is None or not gpu_ids.strip():
        return candidates
    if gpu_ids.strip().lower() == CPU_ONLY:
        return []
    wanted = _parse_ids(gpu_ids, "GPU_IDS")
    unknown = [i for i in wanted if i not in candidates]
    if unknown:
        where = (f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} leaves {_describe(candidates)}"
                 if cuda_visible_devices is not None else f"this host's GPUs are {_describe(candidates)}")
        raise GpuSelectionError(f"GPU_IDS={gpu_ids!r} names GPU {unknown[0]}, but {where}")
    return wanted


def _describe(ids: list[int]) -> str:
    return ",".join(map(str, ids)) if ids else "none"


def nvml_device_count() -> int:
    """How many GPUs the NVIDIA driver reports (all of them: NVML ignores CUDA_VISIBLE_DEVICES).

    0 when nvidia-ml-py is missing, there is no driver, or NVML fails in any way; never raises."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver (NVMLError_LibraryNotFound, DriverNotLoaded, ...)
        log.debug("NVML init failed: no NVIDIA driver", exc_info=True)
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001
        log.debug("NVML device count failed", exc_info=True)
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
