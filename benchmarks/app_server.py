"""`python app.py` as a real server on a free loopback port: shared by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def start_app(model: str | None, extra_env: dict, log: Path, cwd: Path = ROOT) -> tuple[str, subprocess.Popen]:
    """`python app.py [--model MODEL]` on a free loopback port, started from ``cwd``; returns (url, process)
    once the page answers. This process's $CATDOG_MODEL is not passed on: the model is the one named (``model`` or
    ``extra_env``'s $CATDOG_MODEL), or the app's default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inherited = {key: value for key, value in os.environ.items() if key != "CATDOG_MODEL"}
    env = {**inherited, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", **extra_env}
    command = [sys.executable, str(ROOT / "app.py"), *(["--model", model] if model else [])]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return url, process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not start within 180 s")


@contextlib.contextmanager
def running_app(model: str | None, extra_env: dict, log: Path, cwd: Path = ROOT) -> Iterator[tuple[str, subprocess.Popen]]:
    """``start_app``, stopped when the block ends, however it ends."""
    url, process = start_app(model, extra_env, log, cwd)
    try:
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def rss_mb(process: subprocess.Popen) -> float:
    """The server's resident memory, in MiB."""
    return psutil.Process(process.pid).memory_info().rss / 2**20
