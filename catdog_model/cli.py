"""How every command talks: its log format, its arguments (with the ``--debug`` each takes) and its one-line
errors (``CATDOG_DEBUG=1`` adds the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Optional

__all__ = ["LOG_FORMAT", "debug", "exit_with_error", "parse_command", "setup_logging"]

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
