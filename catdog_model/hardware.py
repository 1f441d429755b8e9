"""What the machine offers a process: its usable cores, its CPU's flags (native bf16?) and glibc's malloc arenas."""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["cap_malloc_arenas", "cpu_flags", "int8_pays", "native_bf16", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cap_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (0: its default, 8 a core, and nothing else changed): a server answering on many
    threads otherwise grew by hundreds of MB (benchmarks/load_test.py). Buffers of 1 MB or more (a decoded picture,
    Pillow's blocks) are then mapped on their own, so that freeing one returns it to the OS at once (glibc's own
    threshold rises past them after the first free, and its heap kept them); the heap is trimmed only past 64 MB
    free, as trimming after every request cost a photo's explain 20%. Set in-process: a Space starts plain
    `python app.py`."""
    if arenas > 0 and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-8, arenas)  # M_ARENA_MAX
            libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD, fixed from here on
            libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD: fixed too, so not trimmed after every request
        except (OSError, AttributeError):  # not glibc: nothing to cap
            pass


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next(line for line in cpuinfo if line.startswith(("flags", "Features"))).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 convolutions beat float32 here: AMX or AVX-512 BF16."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def int8_pays(flags: frozenset[str] | None = None) -> bool:
    """Whether int8 convolutions beat bf16 here: int8 dot products in one instruction (AVX-512 VNNI, AVX-VNNI, AMX)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
