"""The machine: CPU/GPU description, load average, the automatic thread count and the glibc allocator what-if."""

import os
import platform

import torch


def machine_info(device, threads, auto_note):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "unknown"
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "threads_choice": auto_note,
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
            "device": str(device), "loadavg_start": loadavg()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from importlib.metadata import version

        import pytorch_optimizer  # noqa: F401

        info["pytorch_optimizer"] = version("pytorch_optimizer")
    except Exception:
        info["pytorch_optimizer"] = None
    return info


def loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def auto_threads():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = (loadavg() or [0.0])[0]
    free = max(1, min(cores, int(round(cores - load))))
    return free, f"auto: {cores} cores, 1-min load {load:.2f} -> {free} free"


def tune_malloc(trim_mb=1024, mmap_mb=32):
    """glibc only: keep freed temporaries in the heap (no trim, no per-allocation mmap). Returns True if applied.

    The per-tensor rules allocate and free full-size temporaries; with glibc's defaults the heap top is trimmed and
    big blocks are mmapped, so the next temporary page-faults its memory in again (minor faults/step in the JSON).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        trim = libc.mallopt(M_TRIM_THRESHOLD, trim_mb << 20)
        return bool(trim) and bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_mb << 20))
    except (OSError, AttributeError):
        return False


def minor_faults():
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0
