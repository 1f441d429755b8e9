"""What the Space keeps on disk: its own temporary folders, removed at exit, and the uploads and results Gradio
keeps for it, bounded in age and in total size. Gradio's app is read, never patched: its list of the files it made
for the app, and its temporary folder."""

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


def remove_expired(paths: Iterable[Path], ttl_s: int) -> None:
    for modified, _, path in _by_age(paths):
        if time.time() - modified > ttl_s:
            _remove(path)


def kept_files(demo: Any, cache: Path) -> list[Path]:
    """What Gradio keeps in its cache for this app: uploads and results (its own clean-up's list, less the files it
    never deletes, such as the examples), and uploads a client abandoned mid-way, which only this app removes."""
    kept = set().union(*(getattr(block, "keep_in_cache", set()) for block in demo.blocks.values()))
    tracked = {name for files in list(demo.temp_file_sets) for name in list(files)} - kept
    return [Path(name) for name in tracked] + [path for path in cache.glob("tmp*") if path.is_file()]


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
    """Gradio deletes the app's files once older than the TTL; in between, they stay within the budget, checked every
    few seconds. An upload the client abandons stays at the top of the cache, where Gradio's clean-up never looks
    (finished uploads move into folders named by hash): removed here past the TTL."""
    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    while True:
        time.sleep(TIDY_EVERY_S)
        remove_expired((path for path in cache.glob("tmp*") if path.is_file()), ttl_s)
        keep_under_budget(kept_files(demo, cache), cache, budget_mb * 2**20)
