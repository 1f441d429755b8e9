"""Shared fixtures. Everything runs offline and writes only under temporary folders."""

import atexit
import contextlib
import gc
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

# Before any library is imported, and so for every process a test starts: none of the caller's settings that change
# what the code under test does (a PYTHONPATH that imports the checkout instead of an installed package, a
# TRANSFORMERS_OFFLINE that huggingface_hub also reads, a CATDOG_MODEL, an accelerate config's precision)...
_INHERITED = ("PYTHONPATH", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "ACCELERATE_", "CATDOG_", "GRADIO_")
for _name in [name for name in os.environ if name.startswith(_INHERITED)]:
    del os.environ[_name]
# ...then the suite's own: a private, temporary Hugging Face cache and no network.
_CACHE = tempfile.mkdtemp(prefix="catdog-tests-hf-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # the datasets cache of the mini set is 130 MB a run
os.environ["HF_HOME"] = _CACHE
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

import torch  # noqa: E402

from harness import complete_folder, start_app as start_server, torch_reference  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
MINI_DATASET = ROOT.parent / "shared" / "data" / "cats_vs_dogs_mini"


def training_command(output_dir: Path, *flags: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """train_accelerate.py as a user would run it, on the mini dataset, small and random-initialised."""
    return [
        *launcher, str(ROOT / "train_accelerate.py"),
        "--dataset", str(MINI_DATASET), "--output-dir", str(output_dir),
        "--image-size", "64", "--no-pretrained", "--num-workers", "0", *flags,
    ]


def run_training(output_dir: Path, *flags: str, launcher: tuple[str, ...] = (sys.executable,), check: bool = True,
                 env: dict | None = None):
    result = subprocess.run(training_command(output_dir, *flags, launcher=launcher), cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def in_process(command: Callable[[], None], argv: list[str]) -> subprocess.CompletedProcess:
    """A command's ``main`` run in this process: the same code from the command line on, without the seconds of
    imports a new process pays. Its stderr (log lines in the commands' format, bars, the one-line error) and exit
    code come back as ``subprocess.run``'s do; an exception that is no exit propagates, as a traceback would show.
    Runs that need a process of their own (a kill, loader workers, a file-size limit, several processes, a clean
    environment) stay subprocesses."""
    from catdog_model.cli import LOG_FORMAT

    stderr, handler, root = io.StringIO(), logging.StreamHandler(), logging.getLogger()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setStream(stderr)
    level, root.level = root.level, logging.INFO
    root.addHandler(handler)
    environment, returncode = dict(os.environ), 0
    try:
        with contextlib.redirect_stderr(stderr):
            command()
    except SystemExit as exit:
        returncode = exit.code if isinstance(exit.code, int) else 1
    finally:  # what a process's end would undo: its environment, its handler, what it held (a folder's lock)
        os.environ.clear()
        os.environ.update(environment)
        root.removeHandler(handler)
        root.level = level
        gc.collect()
    return subprocess.CompletedProcess(argv, returncode, "", stderr.getvalue())


def train_in_process(output_dir: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    """``run_training``'s command line, through train_accelerate.py's ``main`` in this process (``in_process``)."""
    from accelerate.state import AcceleratorState, GradientState

    import train_accelerate
    from catdog_model.training.settings import settings

    argv = training_command(output_dir, *flags)[2:]  # the flags, without the interpreter and the script
    AcceleratorState._reset_state(reset_partial_state=True)  # a new run, as a new process would start it
    GradientState._reset_state()
    result = in_process(lambda: train_accelerate.main(settings(argv)), argv)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def assert_clean_error(result, *phrases: str) -> None:
    """A non-zero exit with the phrases in stderr and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-2000:]


def weights_equal(folder_a: Path, folder_b: Path) -> bool:
    """Bitwise equality of two model.safetensors files, tensor by tensor."""
    from safetensors.torch import load_file
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hub_snapshot(cache: Path, repo_id: str, folder: Path, commit: str = "c" * 40, refs=("main",)) -> Path:
    """Lay ``folder``'s files out in a Hugging Face cache as a download of ``repo_id`` would leave them."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns(".*", "checkpoints"))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def mini_dataset() -> Path:
    if not MINI_DATASET.is_dir():
        pytest.fail(f"the mini dataset is missing: expected it at {MINI_DATASET}")
    return MINI_DATASET


@pytest.fixture(scope="session")
def spec_model():
    """The project's model as specified (ResNet50 at 224 px, random weights), built once: tests/test_model.py counts
    it, tests/test_engine.py weighs what a Space downloads of it."""
    from catdog_model import CatDogClassifier

    torch.manual_seed(0)
    return CatDogClassifier().eval()


@pytest.fixture(scope="session")
def trained_model(mini_dataset, tmp_path_factory) -> Path:
    """A tiny model, trained once per session: 32 training images, no augmentation, 6 epochs."""
    output_dir = tmp_path_factory.mktemp("trained")
    result = train_in_process(output_dir, "--epochs", "6", "--batch-size", "8", "--max-train-samples", "32",
                              "--max-eval-samples", "32", "--no-augmentation")
    output_dir.with_name(output_dir.name + ".log").write_text(result.stderr)  # beside it: the folder holds the run's only
    return output_dir


def start_app(model: str | None, tmp_path, cwd=ROOT):
    """`python app.py --model ...` (or with no model named) on a free loopback port; returns (url, process)."""
    env = {"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "CATDOG_THREADS": "1"}
    return start_server(model, env, tmp_path / "app.log", cwd=cwd)


@pytest.fixture(scope="session")
def app_url(trained_model, tmp_path_factory):
    url, process = start_app(str(trained_model), tmp_path_factory.mktemp("app"))
    yield url
    process.terminate()
    process.wait(timeout=30)
