"""What the Space keeps on disk: its own temporary folders, removed at exit, and the files in Gradio's cache, bounded in
age and total size."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["TIDY_EVERY_S", "keep_under_budget", "kept_files", "remove_expired", "temporary_folder", "tidy_cache"]

TIDY_EVERY_S = 2  # how often the files' total is checked against the budget


def temporary_folder(prefix: str) -> Path:
    """A folder of the app's own in the temporary folder, removed when the app exits (SIGTERM included)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _by_age(paths: Iterable[Path]) -> list[tuple[float, int, Path]]:
    """(modified, size, path) of each path still there, oldest first."""
    found = []
    for path in paths:
        try:
            status = path.stat()
        except OSError:  # another request removed it first
            continue
        found.append((status.st_mtime, status.st_size, path))
    return sorted(found)


def _remove(path: Path, cache: Optional[Path] = None) -> None:
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        if cache and path.parent != cache:  # Gradio keeps each file in a folder of its own, named by its hash
            path.parent.rmdir()
    except OSError:  # removed by another request first, or the folder holds another file
        pass


def remove_expired(paths: Iterable[Path], ttl_s: int, cache: Optional[Path] = None) -> None:
    for modified, _, path in _by_age(paths):
        if time.time() - modified > ttl_s:
            _remove(path, cache)


def kept_files(demo: Any, cache: Path) -> list[Path]:
    """Every file in Gradio's cache but those it keeps for good (examples, figures), including what its own clean-up
    never sees: abandoned uploads, pictures an MCP client sent inline."""
    kept = set().union(*(getattr(block, "keep_in_cache", set()) for block in demo.blocks.values()))
    return [path for path in cache.rglob("*") if path.is_file() and os.path.abspath(path) not in kept]


def keep_under_budget(paths: list[Path], cache: Path, budget_bytes: int) -> None:
    """Remove the oldest files until the rest take at most ``budget_bytes``."""
    files = _by_age(paths)
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= budget_bytes:
            break
        _remove(path, cache)
        total -= size


def tidy_cache(demo: Any, ttl_s: int, budget_mb: int) -> None:
    """Every few seconds: files in Gradio's cache past the TTL removed, then the oldest until the rest fit the budget.
    """
    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    while True:
        time.sleep(TIDY_EVERY_S)
        remove_expired(kept_files(demo, cache), ttl_s, cache)
        keep_under_budget(kept_files(demo, cache), cache, budget_mb * 2**20)
