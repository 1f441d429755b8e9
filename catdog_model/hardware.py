"""How every entry point sets up its process: CPU flags and cores, the log format, one-line errors
(``CATDOG_DEBUG=1`` adds the traceback) and glibc's malloc arenas."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from typing import NoReturn, Optional

__all__ = ["cap_malloc_arenas", "cpu_flags", "debug", "exit_with_error", "native_bf16", "parse_command", "setup_logging",
           "usable_cores"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def debug() -> bool:
    """``CATDOG_DEBUG=1`` (or a command's ``--debug``): every one-line error also logs its full traceback."""
    return os.environ.get("CATDOG_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def exit_with_error(error: BaseException | str, status: int = 1) -> NoReturn:
    """Stop with one ``error: ...`` line, never a traceback; with ``debug()``, the traceback is logged first."""
    if debug() and isinstance(error, BaseException):
        logging.getLogger("catdog").error("the full traceback (CATDOG_DEBUG)", exc_info=error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(status)


def setup_logging() -> None:
    """The one log format of the training script, the evaluation command and the app."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    # huggingface_hub prints through a handler of its own and also passes records on to ours: each Hub retry
    # warning came out twice. Keep one, in this format.
    logging.getLogger("huggingface_hub").handlers.clear()


def parse_command(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """``parser``'s arguments and the ``--debug`` every command takes (it sets ``CATDOG_DEBUG``); logging set up."""
    parser.add_argument("--debug", action="store_true", help="log the full traceback behind every one-line error")
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["CATDOG_DEBUG"] = "1"
    setup_logging()
    return args


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cap_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (0: its default of 8 a core): a server answering on many threads otherwise grew by
    hundreds of MB without levelling off (benchmarks/load_test.py). Set in-process: a Space starts plain `python app.py`."""
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


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 convolutions beat float32 here: AMX or AVX-512 BF16."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)
