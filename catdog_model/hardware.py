"""What this machine computes fast: the one place that reads CPU flags and cores and picks precisions from them,
and sets up the process every entry point shares (its log format, glibc's malloc arenas).

The serving engine (engine.py) is compiled in bf16 where ``native_bf16()``; training (train_accelerate.py)
trains in bf16 autocast there unless told otherwise; the benchmarks record ``describe()`` next to
every number they print.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = ["cap_malloc_arenas", "cpu_flags", "cpu_name", "default_mixed_precision", "default_num_workers", "describe",
           "native_bf16", "setup_logging", "usable_cores"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """The one log format of the training script, the evaluation command and the app."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    # huggingface_hub prints through a handler of its own and also passes records on to ours: each Hub retry
    # warning came out twice. Keep one, in this format.
    logging.getLogger("huggingface_hub").handlers.clear()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cap_malloc_arenas(arenas: int) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core) and rarely hands the
    memory back; a server answering on many worker threads grew by hundreds of MB per few hundred requests
    without levelling off. A cap keeps it flat (benchmarks/load_test.py). It is set in the process, not
    the environment, because a Space starts `python app.py` with none of ours. 0 leaves glibc's default."""
    if arenas > 0 and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX
        except (OSError, AttributeError):  # not glibc: nothing to cap
            pass


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next(line for line in cpuinfo if line.startswith(("flags", "Features"))).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 convolutions beat float32 here: AMX or AVX-512 BF16."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def default_mixed_precision(device: "torch.device", configured: str | None = None,
                            flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The precision to train in when no flag names one, and why.

    ``configured`` is what ``accelerate config`` / ``accelerate launch`` chose (ACCELERATE_MIXED_PRECISION):
    a choice other than "no" is kept. Otherwise bf16 autocast wherever the hardware computes bf16
    natively (the weights stay float32), measured 2.3× faster per CPU train step on an AVX-512 BF16 EPYC.
    """
    if configured and configured != "no":
        return configured, "accelerate config"
    if device.type == "cpu":
        if native_bf16(flags):
            return "bf16", "default: the CPU computes bf16 natively (AVX-512 BF16 or AMX)"
        return "no", "default: the CPU has no native bf16 (fp32 is faster there)"
    import torch  # here, not at the top: the serving engine reads CPU flags without torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", "default: the GPU computes bf16 natively"
    return "no", f"default: no native bf16 known for {device.type}"


def default_num_workers(device: "torch.device", processes: int = 1) -> int:
    """DataLoader workers per process.

    On a GPU, the cores this process may use, shared among the processes (at most 8): decoding must keep
    up with the GPU. On a CPU, one: the train step costs ~100 ms per image there and decoding ~2 ms, so
    more workers would only take cores from the step.
    """
    if device.type == "cpu":
        return 1
    return max(1, min(8, usable_cores() // max(1, processes)))


def describe(threads: int | None = None) -> dict:
    """The machine a benchmark ran on: CPU model and flags, cores, torch threads and version, GPU if any."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "native_bf16": native_bf16(), "cores": usable_cores(),
            "torch_threads": threads or torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu,
            "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))}
