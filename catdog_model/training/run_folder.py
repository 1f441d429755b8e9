"""What a training run leaves behind: its output folder, claimed, cleared only of its own files, and published
whole in one atomic step (config.json with its manifest last), and its copy on the Hub."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import accelerate
import datasets
import timm
import torch
from accelerate import Accelerator
from filelock import FileLock, Timeout
from huggingface_hub import HfApi
from huggingface_hub.errors import HTTPError

from ..config import INT8_IR_FILES, IR_FILES, MANIFEST_KEY, OOD_FILE, REPORT_FIGURES, WEIGHTS
from ..model import CatDogClassifier
from ..serving.files import TEMPORARY_PREFIX, check_writable, manifest_of
from .calibration import save_detector
from .card import make_model_card
from .data import SPLIT_FILE, load_split, make_transform, save_split
from .evaluate import EVALUATION_FILE, report_training_run
from .export import CALIBRATION_PHOTOS, CHECK_PHOTOS, model_inputs, save_openvino
from .run_state import BEST, CHECKPOINTS, Fitted, Progress, RunData, TrainingError, save_atomically

__all__ = ["LOCK_FILE", "NOT_PUSHED", "RUN_FILES", "RUN_RECORD", "SPLIT_FILE", "TRACKER_PROJECT",
           "claim_output_dir", "publish_run", "push_run", "remove_unused_folder", "start_run"]

logger = logging.getLogger(__name__)

TRACKER_PROJECT = "catdog"  # trackers log under output_dir/catdog
# What a run writes into its output folder (with checkpoints/): --overwrite-output-dir removes these, nothing else.
RUN_FILES = ("config.json", WEIGHTS, *IR_FILES, *INT8_IR_FILES, OOD_FILE, "metrics.json", SPLIT_FILE, "README.md", EVALUATION_FILE,
             *REPORT_FIGURES, TRACKER_PROJECT)
LOCK_FILE = ".catdog.lock"
RUN_RECORD = ".catdog-run.json"
OWN_NAMES = (*RUN_FILES, CHECKPOINTS, LOCK_FILE, RUN_RECORD)
NOT_PUSHED = (f"{CHECKPOINTS}/*", f"{TRACKER_PROJECT}/*", LOCK_FILE, RUN_RECORD, f"{TEMPORARY_PREFIX}*")


def _recorded_names(output_dir: Path) -> tuple[str, ...]:
    """The names a previous run of this script recorded writing here; () if nothing says it was one."""
    try:
        return tuple(json.loads((output_dir / RUN_RECORD).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def claim_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> FileLock:
    """Lock the folder for this run, once it is writable and new, empty or a previous run's. Nothing is deleted here:
    ``start_run`` clears a previous run once every check has passed."""
    check_writable(output_dir)
    recorded = _recorded_names(output_dir)
    foreign = sorted(entry.name for entry in output_dir.iterdir()
                     if entry.name not in (*recorded, LOCK_FILE) and not entry.name.startswith(TEMPORARY_PREFIX))
    if foreign:  # refused before the lock file is made: the folder is left exactly as it was
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise TrainingError(f"--output-dir {output_dir} holds files this script did not write ({listed}); pick a new "
                            "or empty folder (--overwrite-output-dir replaces only a previous run's own files).")
    lock = FileLock(output_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise TrainingError(f"Another training run is writing to {output_dir}; wait for it, or pick another --output-dir.") from None
    problem = None
    if not overwrite and not resuming and (output_dir / WEIGHTS).exists():
        problem = f"{output_dir} already holds a model; pass --overwrite-output-dir or another --output-dir."
    elif not overwrite and not resuming and any((output_dir / CHECKPOINTS).glob("step_*")):
        problem = (f"{output_dir} holds checkpoints of an earlier run: continue it with --resume-from-checkpoint "
                   "latest, or start afresh with --overwrite-output-dir.")
    if problem:
        lock.release()
        raise TrainingError(problem)
    if not (output_dir / RUN_RECORD).is_file():  # from now on the folder is known as a run's, even if this one is killed
        save_atomically(output_dir, lambda temp: (temp / RUN_RECORD).write_text(
            json.dumps({"written_by": "train_accelerate.py", "files": list(OWN_NAMES)}, indent=2)))
    return lock


def remove_unused_folder(output_dir: Path, lock: FileLock) -> None:
    """A folder this run created, then was refused in: removed, if it holds only what ``claim_output_dir`` put there."""
    lock.release()
    if {entry.name for entry in output_dir.iterdir()} <= {LOCK_FILE, RUN_RECORD}:
        shutil.rmtree(output_dir, ignore_errors=True)


def start_run(output_dir: Path, overwrite: bool) -> None:
    """Every check has passed: remove interrupted writes and, with ``overwrite``, what the previous run recorded writing
    here."""
    stale = [entry for entry in output_dir.iterdir() if entry.name.startswith(TEMPORARY_PREFIX)]
    if overwrite:
        stale += [output_dir / name for name in _recorded_names(output_dir) if name not in (LOCK_FILE, RUN_RECORD)]
    try:
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    except OSError as error:
        raise TrainingError(f"Could not clear the previous run in {output_dir}: {error.strerror or error}.") from None


def publish_run(config, accelerator: Accelerator, model: CatDogClassifier, progress: Progress, fitted: Fitted,
                run: RunData) -> None:
    """The finished model in one atomic step, config.json and its manifest last; a previous model's files not written
    again are removed."""
    output_dir, best = Path(config.output_dir), Path(config.output_dir) / BEST
    name = config.hub_model_id or output_dir.resolve().name
    model_config = {**json.loads((best / "config.json").read_text()), "temperature": fitted.calibration["temperature"],
              "ood_threshold": model.ood_threshold}
    tested = {}
    exported = CatDogClassifier.from_pretrained(str(best))  # fp32, on the CPU
    exported.temperature, exported.ood_threshold = model_config["temperature"], model_config["ood_threshold"]
    plain = {split: run.used[split].with_transform(make_transform(run.data, model.image_size, train=False))
             for split in ("train", "validation")}

    def write(temp: Path) -> None:
        shutil.copyfile(best / WEIGHTS, temp / WEIGHTS)
        save_detector(fitted.detector, temp / OOD_FILE)
        logger.info("exporting the serving engines (OpenVINO IR, int8) from %s", WEIGHTS)
        check = save_openvino(exported, temp, model_inputs(plain["train"], CALIBRATION_PHOTOS),
                              model_inputs(plain["validation"], CHECK_PHOTOS), fitted.detector)
        save_split(temp / SPLIT_FILE, run.splits, run.rows, run.data, dataset=config.dataset,
                   revision=config.dataset_revision, seed=config.seed, fingerprint=run.fingerprint)
        test_rows = load_split(temp / SPLIT_FILE, run.data, "test", used=True)
        evaluation = tested["evaluation"] = report_training_run(model, fitted.detector, fitted.test_outputs,
                                                               lambda i: test_rows[i][run.data.image_column], temp)
        metrics = _run_record(config, accelerator, progress, fitted.calibration, run)
        (temp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        make_model_card(model, metrics, evaluation, name, check if check["passed"] else None).save(temp / "README.md")
        model_config[MANIFEST_KEY] = manifest_of(temp, sorted(path.name for path in temp.iterdir()), model_config)
        if check["passed"]:  # the figures it passed on, vouched for beside the file
            model_config[MANIFEST_KEY]["files"][INT8_IR_FILES[0]]["check"] = check
        (temp / "config.json").write_text(json.dumps(model_config, indent=2))

    written = save_atomically(output_dir, write)
    for stale in set(RUN_FILES) - set(written) - {TRACKER_PROJECT}:
        (output_dir / stale).unlink(missing_ok=True)
    logger.info("saved the model, its engine, report and card to %s", output_dir)
    evaluation = tested["evaluation"]  # the run's result, in the last lines a console shows
    logger.info("test accuracy %.4f on %d held-out photos (best epoch %d of %d). Serve it: python app.py --model %s",
                evaluation["accuracy"], evaluation["samples"], progress.best_epoch, config.epochs, output_dir)


def _run_record(config, accelerator: Accelerator, progress: Progress, calibration: dict, run: RunData) -> dict:
    """metrics.json: how the model was trained. How good it is lives in evaluation.json alone."""
    return {
        "history": progress.history,
        "best_epoch": progress.best_epoch,
        "calibration": calibration,
        "dataset": config.dataset,
        "dataset_revision": config.dataset_revision,
        "dataset_fingerprint": run.fingerprint,
        "split_sizes": {name: len(split) for name, split in run.rows.items()},
        "full_split_sizes": {name: len(split) for name, split in run.splits.items()},
        "skipped_rows": len(run.data.skipped_rows),
        "pretrained": not config.no_pretrained,  # timm's ImageNet weights, or a random start
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "mixed_precision_reason": config.precision_reason,
        "seed": config.seed,
        "args": config.public(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__},
    }


def push_run(config, output_dir: Path) -> None:
    """Upload the output folder; the local files stay whatever happens."""
    api = HfApi(token=config.hub_token)
    try:
        api.create_repo(config.hub_model_id, private=config.hub_private, exist_ok=True)
        commit = api.upload_folder(repo_id=config.hub_model_id, folder_path=output_dir, ignore_patterns=list(NOT_PUSHED),
                                   commit_message="Upload catdog model from train_accelerate.py")
    except (HTTPError, OSError, ValueError) as error:  # HTTPError: huggingface_hub's, a dropped connection included
        raise TrainingError(
            f"Could not push to {config.hub_model_id}: {str(error).splitlines()[0]}. The files are kept in {output_dir}; "
            f"upload them later with `hf upload {config.hub_model_id} {output_dir} "
            + " ".join(f"--exclude '{pattern}'" for pattern in NOT_PUSHED) + "`."
        ) from None
    logger.info("pushed to %s", commit.commit_url)
