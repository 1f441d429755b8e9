"""Interrupted runs: atomic checkpoints, `latest`, bit-exact resume, run identity, one run per folder."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock
from safetensors.torch import load_file

from catdog_model.serving.files import TEMPORARY_PREFIX
from catdog_model.training.run_folder import LOCK_FILE, RUN_RECORD
from catdog_model.training import TrainingError
from catdog_model.training.checkpoints import find_latest, read_manifest, save_checkpoint
from conftest import (ROOT, assert_clean_error, run_training, torch_reference, train_in_process, training_command,
                      weights_equal)

# Augmentation on: the hard case for an exact resume (with loader workers, below). timm's 0.4M-parameter test_resnet:
# what is tested is the run's state, not the architecture. Runs that need no process of their own run in this one.
FLAGS = ("--backbone", "test_resnet", "--epochs", "2", "--batch-size", "8", "--max-train-samples", "24",
         "--max-eval-samples", "8", "--checkpointing-steps", "1")
RESUME = ("--resume-from-checkpoint", "latest")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run: 3 batches an epoch, a checkpoint after every step."""
    output_dir = tmp_path_factory.mktemp("full")
    train_in_process(output_dir, *FLAGS)
    return output_dir


def _history(folder):
    return json.loads((folder / "metrics.json").read_text())["history"]


def _resume_from(full_run, tmp_path, step: int, *flags: str, check: bool = True):
    """A fresh folder holding only one checkpoint of the full run, as if the run had been killed after it."""
    name = f"step_{step:08d}"
    shutil.copytree(full_run / "checkpoints" / name, tmp_path / "checkpoints" / name)
    shutil.copy(full_run / RUN_RECORD, tmp_path / RUN_RECORD)  # written before any checkpoint: a killed run has it
    return train_in_process(tmp_path, *FLAGS, *RESUME, *flags, check=check)


def test_every_step_left_a_complete_checkpoint_with_the_runs_identity(full_run):
    steps = sorted(p.name for p in (full_run / "checkpoints").glob("step_*"))
    assert steps == [f"step_{i:08d}" for i in range(1, 7)]
    folder = full_run / "checkpoints" / "step_00000004"
    manifest = read_manifest(folder)
    assert (manifest["epoch"], manifest["batches_in_epoch"], manifest["optimizer_steps"]) == (1, 1, 4)
    assert {"model.safetensors", "optimizer.bin"} <= {path.name for path in folder.iterdir()}
    identity = manifest["identity"]
    assert identity["--batch-size"] == 8 and identity["--image-size"] == 64 and identity["number of processes"] == 1
    assert identity["dataset content"].startswith("sha256:") and "--num-workers" not in identity


@pytest.mark.parametrize("step, workers", [(2, "0"), pytest.param(3, "1", marks=pytest.mark.slow)])
def test_resume_mid_epoch_or_at_its_last_step_is_bit_exact(full_run, tmp_path, step, workers):
    # Step 2 is mid-epoch 1; step 3 is its last batch. Another --num-workers must not matter either.
    if workers == "0":
        result = _resume_from(full_run, tmp_path, step, "--num-workers", workers)
    else:  # a loader worker forks: from a process of its own, as a user's resume does
        shutil.copytree(full_run / "checkpoints" / f"step_{step:08d}", tmp_path / "checkpoints" / f"step_{step:08d}")
        shutil.copy(full_run / RUN_RECORD, tmp_path / RUN_RECORD)
        result = run_training(tmp_path, *FLAGS, *RESUME, "--num-workers", workers)
    assert f"at epoch 1, batch {step}" in result.stderr
    # The resumed epoch's bar starts at the batches already done, out of the epoch's three.
    assert re.search(rf"epoch 1/2: +{round(100 * step / 3)}%\|[^|]*\| {step}/3 ", result.stderr), result.stderr[-2000:]
    assert weights_equal(full_run, tmp_path)
    assert _history(tmp_path) == _history(full_run)  # epoch 1's train metrics complete, not restarted


@pytest.mark.slow
def test_num_workers_do_not_change_the_result(full_run, tmp_path):
    # Two loader workers, in a process of its own as a user runs it: also what lets a run in this process stand for
    # one in its own, bit for bit.
    run_training(tmp_path, *FLAGS, "--num-workers", "2")
    assert weights_equal(full_run, tmp_path) and _history(tmp_path) == _history(full_run)


def _write_incomplete_checkpoints(checkpoints, source):
    """Folders a checkpoint step never leaves (it appears by rename once whole), as hands or other tools might: one
    with no manifest, one whose manifest cannot be read."""
    no_manifest = checkpoints / "step_00000098"
    shutil.copytree(source, no_manifest)
    (no_manifest / "checkpoint.json").unlink()
    unreadable = checkpoints / "step_00000099"
    shutil.copytree(source, unreadable)
    (unreadable / "checkpoint.json").write_text("{not json")
    return no_manifest, unreadable


def test_latest_skips_incomplete_checkpoints_and_names_them(full_run, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(full_run / "checkpoints" / "step_00000002", checkpoints / "step_00000002")
    no_manifest, unreadable = _write_incomplete_checkpoints(checkpoints, checkpoints / "step_00000002")
    (checkpoints / "step_00000097").mkdir()  # an empty folder
    with caplog.at_level(logging.WARNING):
        path, manifest = find_latest(checkpoints)
    assert path.name == "step_00000002" and manifest["optimizer_steps"] == 2
    assert f"{unreadable}: unreadable checkpoint.json (JSONDecodeError)" in caplog.text
    assert f"{no_manifest}: no checkpoint.json" in caplog.text
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        find_latest(tmp_path / "elsewhere")


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path):
    # resnet18's 53 MB checkpoints take tens of milliseconds to write: long enough for the kill to land inside one.
    flags = tuple("resnet18" if flag == "test_resnet" else flag for flag in FLAGS)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen(training_command(killed, *flags, "--num-workers", "2"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints, deadline = killed / "checkpoints", time.monotonic() + 300
    try:  # kill -9 while step 3 is being written (its temporary folder exists)
        while not (checkpoints / f"{TEMPORARY_PREFIX}step_00000003").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before step 3 was written"
            time.sleep(0.001)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for folder in checkpoints.glob("step_*"):  # whatever the timing, no half-written step_ folder
        read_manifest(folder)
    _write_incomplete_checkpoints(checkpoints, checkpoints / "step_00000002")

    result = train_in_process(killed, *flags, *RESUME)
    assert "skipping incomplete checkpoint" in result.stderr and "step_00000099" in result.stderr
    train_in_process(whole, *flags)
    assert weights_equal(whole, killed) and _history(killed) == _history(whole)
    assert not list(checkpoints.glob(f"{TEMPORARY_PREFIX}*"))


@pytest.mark.parametrize("flags, named", [
    (("--batch-size", "16"), "--batch-size was 8, now 16"),
    (("--image-size", "32"), "--image-size was 64, now 32"),
    (("--backbone", "resnet18"), "--backbone was 'test_resnet', now 'resnet18'"),
    (("--seed", "1", "--no-augmentation"), "--no-augmentation was False, now True; --seed was 42, now 1"),
])
def test_a_resume_with_another_identity_is_refused_in_one_line(full_run, tmp_path, flags, named):
    result = _resume_from(full_run, tmp_path, 2, *flags, check=False)
    assert_clean_error(result, "belongs to another run", named)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints" / "best").exists()  # before any work


@pytest.mark.slow
def test_more_epochs_extend_a_run_and_fewer_are_refused(full_run, tmp_path):
    shutil.copytree(full_run, tmp_path / "out")
    result = train_in_process(tmp_path / "out", *FLAGS, *RESUME, "--epochs", "1", check=False)
    assert_clean_error(result, "has already reached epoch 2; --epochs 1 would end the run before it")
    train_in_process(tmp_path / "out", *FLAGS, *RESUME, "--epochs", "3")
    assert [row["epoch"] for row in _history(tmp_path / "out")] == [1, 2, 3]
    assert _history(tmp_path / "out")[:2] == _history(full_run)


def test_a_resume_whose_best_model_is_gone_or_replaced_is_refused(full_run, tmp_path):
    result = _resume_from(full_run, tmp_path, 4, check=False)  # epoch 1's best model was not copied
    assert_clean_error(result, "checkpoints/best/model.safetensors, the best model so far (epoch 1), is missing")
    weights = bytearray((full_run / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # any other file, even one bit off
    (tmp_path / "checkpoints" / "best").mkdir()
    (tmp_path / "checkpoints" / "best" / "model.safetensors").write_bytes(bytes(weights))
    assert_clean_error(train_in_process(tmp_path, *FLAGS, *RESUME, check=False), "was replaced")


@pytest.mark.slow
def test_a_checkpoint_at_an_epochs_last_batch_resumes_though_validation_saved_a_model_after_it(full_run, tmp_path):
    # Step 6 was written before epoch 2's validation, which may have saved a better model than the one the
    # checkpoint knows (it does with bf16 on this project's CPUs): the resumed run validates epoch 2 again.
    shutil.copytree(full_run / "checkpoints" / "best", tmp_path / "checkpoints" / "best")  # what validation saved
    result = _resume_from(full_run, tmp_path, 6)
    assert "at epoch 2, batch 3" in result.stderr
    assert weights_equal(full_run, tmp_path) and _history(tmp_path) == _history(full_run)


@pytest.mark.slow
def test_checkpoints_total_limit_keeps_the_newest(tmp_path):
    train_in_process(tmp_path, *FLAGS, "--epochs", "1", "--checkpoints-total-limit", "2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]


@pytest.mark.slow
def test_overwrite_removes_the_previous_run_only_after_the_flags_and_the_data_are_checked(full_run, tmp_path):
    old = tmp_path / "out"
    shutil.copytree(full_run, old)
    assert_clean_error(train_in_process(old, "--overwrite-output-dir", "--batch-size", "0", check=False), "--batch-size")
    # A training split of one photo holds one class: refused by the data check, after the dataset is read.
    assert_clean_error(train_in_process(old, "--overwrite-output-dir", "--max-train-samples", "1", check=False),
                       "The train split (1 images) holds no")
    assert (old / "checkpoints").is_dir() and weights_equal(full_run, old)
    assert (old / "split.json").read_text() == (full_run / "split.json").read_text()

    train_in_process(old, "--overwrite-output-dir", "--backbone", "test_resnet", "--epochs", "1", "--max-train-samples", "8",
                     "--max-eval-samples", "8", "--seed", "1")
    assert not list((old / "checkpoints").glob("step_*"))  # the previous run's checkpoints went
    assert json.loads((old / "metrics.json").read_text())["seed"] == 1
    assert json.loads((old / "split.json").read_text())["seed"] == 1
    assert_clean_error(train_in_process(old, *RESUME, check=False), "no complete checkpoint")


@pytest.mark.parametrize("flags", [(), ("--overwrite-output-dir",)])
def test_a_folder_holding_what_the_script_did_not_write_is_refused_before_any_work(full_run, tmp_path, flags):
    clone = tmp_path / "clone"  # `--output-dir .` in a clone of this project
    clone.mkdir()
    (clone / "README.md").write_text("the project's own README")
    (clone / "catdog").mkdir()  # the name trackers log under: still the user's, the folder has no run record
    (clone / "catdog" / "main.py").write_text("print('mine')")
    (clone / ".tmp-mywork").mkdir()
    run = tmp_path / "run"  # a previous run's folder, into which the user put a file of theirs
    shutil.copytree(full_run, run)
    (run / "notes.txt").write_text("mine")
    for folder, named in ((clone, ".tmp-mywork, README.md, catdog"), (run, "notes.txt")):
        before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
        result = train_in_process(folder, "--epochs", "1", *flags, check=False)
        assert_clean_error(result, "holds files this script did not write", named)
        assert "rows skipped" not in result.stderr  # refused before the dataset was read
        assert sorted(path.relative_to(folder) for path in folder.rglob("*")) == before
    assert (clone / "README.md").read_text() == "the project's own README" and weights_equal(full_run, run)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(full_run, tmp_path):
    shutil.copytree(full_run / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "step_00000002")
    shutil.copy(full_run / RUN_RECORD, tmp_path / RUN_RECORD)
    assert_clean_error(train_in_process(tmp_path, *FLAGS, check=False), "holds checkpoints of an earlier run",
                       "--resume-from-checkpoint latest")


def test_a_second_run_on_a_busy_folder_exits_at_once(tmp_path):
    with FileLock(tmp_path / LOCK_FILE):  # as a running training holds it
        result = train_in_process(tmp_path, "--epochs", "1", check=False)
    assert_clean_error(result, "Another training run is writing to")
    assert not (tmp_path / "split.json").exists()


def test_a_non_finite_loss_stops_training_and_saves_nothing_non_finite(tmp_path):
    result = train_in_process(tmp_path, *FLAGS, "--learning-rate", "1e30", check=False)
    assert_clean_error(result, "The training loss became nan at optimizer step 2 (epoch 1, batch 2)", "Lower --learning-rate")
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "checkpoints" / "best").exists()
    saved = list((tmp_path / "checkpoints").glob("step_*"))
    assert [folder.name for folder in saved] == ["step_00000001"]
    assert all(t.isfinite().all() for t in load_file(saved[0] / "model.safetensors").values())


class _OneProcess:
    """The part of an Accelerator that save_checkpoint uses, writing two files per checkpoint."""

    is_main_process = is_local_main_process = True
    disk_full = False

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        (Path(folder) / "random_states_0.pkl").write_bytes(b"state")


def test_a_full_disk_during_a_checkpoint_is_one_clear_error_and_keeps_the_earlier_ones(tmp_path):
    accelerator = _OneProcess()
    save_checkpoint(accelerator, tmp_path, 1, {"identity": {}, "epoch": 0, "batches_in_epoch": 1}, keep=None)
    accelerator.disk_full = True
    with pytest.raises(TrainingError, match="Could not write .*step_00000002: No space left on device"):
        save_checkpoint(accelerator, tmp_path, 2, {"identity": {}, "epoch": 0, "batches_in_epoch": 2}, keep=None)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000001"]
    assert find_latest(tmp_path)[0].name == "step_00000001"


def _predictions(folder) -> list:
    from catdog_model import load_predictor

    pictures = [str(ROOT / "examples" / name) for name in ("chelsea_cat.jpg", "beagle_puppy.jpg", "coffee_cup.jpg")]
    return [predictor.predict(pictures) for predictor in (load_predictor(str(folder)), torch_reference(folder))]


@pytest.mark.slow
def test_an_extension_killed_midway_leaves_the_finished_model_served_as_it_was(full_run, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(full_run, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")}
    process = subprocess.Popen(training_command(folder, *FLAGS, *RESUME, "--epochs", "4"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    best, deadline = folder / "checkpoints" / "best" / "model.safetensors", time.monotonic() + 300
    saved = best.stat().st_mtime_ns
    try:  # kill -9 once the extension has saved a new best epoch, or at its third epoch's first checkpoint
        while best.stat().st_mtime_ns == saved and not (folder / "checkpoints" / "step_00000007").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the extension ended before it was killed"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert {name: (folder / name).read_bytes() for name in before} == before  # the served files, untouched
    assert _predictions(folder) == _predictions(full_run)


@pytest.mark.slow
def test_a_fresh_run_killed_before_it_finished_is_refused_with_the_command_that_resumes_it(tmp_path):
    from catdog_model import ModelLoadError, load_predictor

    process = subprocess.Popen(training_command(tmp_path, *FLAGS), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:  # kill -9 once its first best epoch is saved: the engine, report and card are not written yet
        while not (tmp_path / "checkpoints" / "best" / "model.safetensors").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with pytest.raises(ModelLoadError, match="holds a training run that has not finished: continue it with .*"
                                             "--resume-from-checkpoint latest"):
        load_predictor(str(tmp_path))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_finished_model(full_run, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(full_run, folder)
    # Writes past 2 MB fail with EFBIG, as on a full disk: the first checkpoint's 3 MB of weights.
    full_disk = ("prlimit", "--fsize=2000000", sys.executable)
    result = run_training(folder, *FLAGS, *RESUME, "--epochs", "3", launcher=full_disk, check=False)
    assert_clean_error(result, "Could not write", "are kept")
    assert _predictions(folder) == _predictions(full_run)
    fresh = run_training(tmp_path / "fresh", "--backbone", "test_resnet", "--epochs", "1", "--max-train-samples", "8",
                         "--max-eval-samples", "8", launcher=full_disk, check=False)
    assert_clean_error(fresh, "Could not write", "are kept")
