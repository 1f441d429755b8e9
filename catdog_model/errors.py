"""The base of the errors a user can fix: each entry point prints one as a single line (``--debug``: the traceback)."""

from __future__ import annotations

__all__ = ["CatdogError", "TRAIN_EXTRA"]

TRAIN_EXTRA = 'needs datasets and accelerate: pip install "catdog-classifier[train]"'


class CatdogError(Exception):
    """A problem the user can fix, said in one line."""

