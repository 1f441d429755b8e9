"""What the tests and the benchmarks share: `python app.py` as a real server on a free loopback port, and a
finished model folder for a model made in code (random weights: speed needs no training)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what the platform says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe(threads: int | None = None) -> dict:
    """The machine a benchmark ran on: CPU model and flags, cores, and the versions that compute (torch if installed)."""
    import openvino

    from catdog_model.hardware import cpu_flags, native_bf16, usable_cores

    try:
        import torch

        versions = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    except ImportError:
        versions = {}
    return {"cpu": cpu_name(), "native_bf16": native_bf16(), "cores": usable_cores(), "threads": threads,
            "openvino": openvino.__version__.split("-")[0], **versions,
            "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))}


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


def vouch_for(folder: Path) -> None:
    """Rewrite the manifest of a model folder for the files it holds now, as a training run would have written it:
    for tests that need a folder whose run wrote, say, NaN weights."""
    from catdog_model.serving.files import manifest_of

    config = json.loads((folder / "config.json").read_text())
    names = [name for name in config["manifest"]["files"] if (folder / name).is_file()]
    (folder / "config.json").write_text(json.dumps({**config, "manifest": manifest_of(folder, names, config)}))


def complete_folder(model, folder: Path, threshold: float = 1e9) -> Path:
    """A finished model folder for a model made in a test: its weights, its engine, a detector that calls
    nothing "neither" (below ``threshold``), and a manifest, as a training run would have written them."""
    from catdog_model.config import HIDDEN, IR_FILES, OOD_FILE, STAGE_FEATURES, WEIGHTS
    from catdog_model.training.calibration import save_detector
    from catdog_model.training.export import save_openvino

    model.save_pretrained(folder)
    save_openvino(model, folder)
    engine_sizes = {HIDDEN: model.head[1].out_features,
                    **{name: 2 * model.backbone.feature_info[i]["num_chs"] for i, name in STAGE_FEATURES.items()}}
    save_detector({f"{layer}.{part}": values for layer, size in engine_sizes.items() for part, values in
                   (("means", np.zeros((2, size))), ("precision", np.eye(size)), ("scale", np.ones(1)))},
                  folder / OOD_FILE)
    config = json.loads((folder / "config.json").read_text())
    names = [WEIGHTS, *IR_FILES, OOD_FILE]
    config.update(ood_threshold=threshold, manifest={"files": {name: {} for name in names}})
    (folder / "config.json").write_text(json.dumps(config))
    vouch_for(folder)
    return folder


def torch_reference(folder: Path):
    """The folder's predictor answering with its eager float32 weights (model.safetensors run through the export's
    ``ServingGraph``, in torch): the reference the OpenVINO engine is measured against."""
    import dataclasses

    import torch

    from catdog_model import CatDogClassifier, load_predictor
    from catdog_model.config import OUTPUT_NAMES
    from catdog_model.serving.engine import EngineOutputs
    from catdog_model.training.export import ServingGraph

    graph = ServingGraph(CatDogClassifier.from_pretrained(str(folder)).eval())

    @torch.inference_mode()
    def engine(pixels: np.ndarray) -> EngineOutputs:
        return EngineOutputs.from_named(dict(zip(OUTPUT_NAMES, (value.numpy() for value in graph(torch.from_numpy(pixels))))))

    engine.name = "torch-fp32"
    return dataclasses.replace(load_predictor(str(folder)), engine=engine)
