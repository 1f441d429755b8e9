"""Several processes and machines: same numbers as one process, only the main one writes, no orphans."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from catdog_model import CatDogClassifier
from catdog_model.training.checkpoints import read_manifest
from catdog_model.training.data import collate, load_image_dataset, load_split, make_transform
from conftest import MINI_DATASET, ROOT, run_training, training_command, weights_equal
from test_data import write_parquet_dataset

pytestmark = pytest.mark.slow

# timm's 0.4M-parameter test_resnet: what is tested is how the processes share the work, not the architecture.
# torchrun gives each process one thread when a machine runs several, and all cores when it runs one:
# the same thread count everywhere makes the runs comparable bit for bit.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = ("--cpu", "--backbone", "test_resnet", "--epochs", "1", "--max-train-samples", "40", "--max-eval-samples", "21", "--batch-size", "4",
         "--checkpointing-steps", "2")


def _launcher(*options: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", *options)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("two-processes")
    result = run_training(output_dir, *FLAGS, launcher=_launcher("--num_processes", "2", "--num_machines", "1"), env=ONE_THREAD)
    assert "world size 2" in result.stderr
    return output_dir


def test_two_processes_give_the_test_metrics_of_one_process_on_the_same_weights(two_processes):
    metrics = json.loads((two_processes / "metrics.json").read_text())
    evaluation = json.loads((two_processes / "evaluation.json").read_text())
    # gather_for_metrics drops the padding of uneven shards: each of the 21 test images counts exactly once.
    assert metrics["world_size"] == 2 and evaluation["samples"] == 21
    data = load_image_dataset(str(MINI_DATASET))
    test = load_split(two_processes / "split.json", data, "test", used=True)
    test.set_transform(make_transform(data, 64, train=False))
    model = CatDogClassifier.from_pretrained(two_processes).eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=5, collate_fn=collate):
            correct += int(((model(batch["pixels"]) > 0).float() == batch["labels"]).sum())
    assert len(test) == 21 and correct / len(test) == pytest.approx(evaluation["accuracy"], abs=1e-6)  # a float32 mean


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_on_loopback_train_what_two_processes_on_one_machine_do(two_processes, tmp_path):
    port = str(_free_port())
    machines = [
        subprocess.Popen(
            training_command(tmp_path / "out", *FLAGS, launcher=_launcher(
                "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", port)),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ONE_THREAD,
        )
        for rank in (0, 1)
    ]
    errors = [machine.communicate(timeout=600)[1] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert weights_equal(two_processes, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text()) == \
        json.loads((two_processes / "evaluation.json").read_text())
    read_manifest(tmp_path / "out" / "checkpoints" / "step_00000004")  # complete, both machines' parts in it


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return found


def _descendants(process: psutil.Process, at_least: int = 0) -> list[psutil.Process]:
    """Its children and theirs; [] until there are ``at_least`` of them."""
    try:
        found = process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return found if len(found) >= at_least else []


@contextlib.contextmanager
def _two_ranks_training(tmp_path):
    """`accelerate launch` with two ranks, each with a loader worker, yielded once all four are up.
    Whatever is left of them is killed afterwards, pass or fail."""
    log = tmp_path / "training.log"
    launcher = subprocess.Popen(
        training_command(tmp_path / "out", "--cpu", "--epochs", "50", "--batch-size", "4", "--num-workers", "1",
                         launcher=_launcher("--num_processes", "2", "--num_machines", "1")),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
    )
    agent, family = psutil.Process(launcher.pid), []
    # The splits are logged once the ranks have passed the dataset check, so each has long since asked to die
    # with its launcher; without it, short-lived children of still-importing ranks (a library's subprocess)
    # could pass for the loader workers.
    started = lambda: "rows skipped" in log.read_text() and _descendants(agent, at_least=4)  # noqa: E731
    try:
        family = _wait_for(started, 300, "two ranks training")
        yield launcher, agent, family
    finally:
        for process in [agent, *family]:
            if process.is_running():
                process.kill()
        launcher.wait()


def test_a_kill_9_of_one_worker_leaves_no_process_behind(tmp_path):
    with _two_ranks_training(tmp_path) as (_, agent, family):
        rank = next(p for p in agent.children() if "train_accelerate.py" in " ".join(p.cmdline()))
        rank.kill()
        _, alive = psutil.wait_procs([agent, *family], timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"


def test_a_kill_9_of_the_launcher_takes_the_workers_with_it(tmp_path):
    with _two_ranks_training(tmp_path) as (launcher, agent, family):
        agent.kill()  # no chance to stop its workers: they must notice on their own
        launcher.wait()
        _, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, f"left behind: {[p.pid for p in alive]}"


def _slow_to_check_dataset(folder):
    """200 twelve-megapixel JPEGs (50 ms each to decode): the image check takes seconds per pool worker."""
    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (3000, 1)), np.tile(ramp[::-1], (3000, 1)), np.full((3000, 4000), 90, np.uint8)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return write_parquet_dataset(folder, [(buffer.getvalue(), i % 2) for i in range(200)])


def test_a_kill_9_during_the_image_check_leaves_no_process_behind(tmp_path):
    dataset = _slow_to_check_dataset(tmp_path / "big")
    command = training_command(tmp_path / "out", "--num-workers", "2")
    command[command.index("--dataset") + 1] = str(dataset)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        training = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    parent = psutil.Process(training.pid)
    try:
        _wait_for(lambda: "Checking images" in log.read_text(), 300, "the image check")
        time.sleep(0.5)
        helpers = _descendants(parent)  # whatever does the checking beside the main process
        assert "100%" not in log.read_text().rpartition("Checking images")[2]  # still checking: that takes seconds
        parent.kill()
        training.wait()
        _, alive = psutil.wait_procs(helpers, timeout=2)
        assert not alive, f"orphans: {[(p.pid, p.name()) for p in alive]}"
    finally:
        for process in _descendants(parent) + [p for p in locals().get("helpers", []) if p.is_running()]:
            process.kill()
