"""What a training run leaves behind: its files in the output folder, and their copy on the Hub.

A run writes only into a folder that is new, empty, or a previous run's. A run's folder holds
``.catdog-run.json``, the record of the names this script writes there; anything else in the folder is
the user's, so the run is refused before any work, and ``--overwrite-output-dir`` removes only what the
record names, once every check (the data's included) has passed. Used by train_accelerate.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import accelerate
import datasets
import timm
import torch
from accelerate import Accelerator
from filelock import FileLock, Timeout
from huggingface_hub import HfApi
from huggingface_hub.errors import HTTPError

from .card import make_model_card
from .data import load_split
from .evaluate import EVALUATION_FILE, FIGURES, REPORT_FILE, report_training_run
from .engine import IR_FILES
from .export import save_openvino
from .manifest import MANIFEST_KEY, WEIGHTS, make_manifest
from .model import CatDogClassifier
from .ood import OOD_FILE, save_detector
from .checkpoints import CHECKPOINTS
from .training import Progress, TrainingError, save_file_atomically

__all__ = ["LOCK_FILE", "NOT_PUSHED", "RUN_FILES", "RUN_RECORD", "SPLIT_FILE", "TRACKER_PROJECT", "backbone_init",
           "claim_output_dir", "push_run", "start_run", "write_evaluation", "write_metrics_and_card"]

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
TRACKER_PROJECT = "catdog"  # trackers log under output_dir/catdog
# What a run writes into its output folder (with checkpoints/): --overwrite-output-dir removes these, nothing else.
RUN_FILES = ("config.json", WEIGHTS, *IR_FILES, OOD_FILE, "metrics.json", SPLIT_FILE, "README.md", EVALUATION_FILE,
             REPORT_FILE, *(f"{name}.png" for name in FIGURES), TRACKER_PROJECT)
LOCK_FILE = ".catdog.lock"
RUN_RECORD = ".catdog-run.json"
OWN_NAMES = (*RUN_FILES, CHECKPOINTS, LOCK_FILE, RUN_RECORD)
# What this script's own interrupted writes leave (a model, engine or file save cut short by a kill).
OWN_TEMPORARY = (".tmp-model-", ".tmp-engine-", *(f".tmp-{name}" for name in (*RUN_FILES, ".catdog-run.json")))
NOT_PUSHED = (f"{CHECKPOINTS}/*", f"{TRACKER_PROJECT}/*", LOCK_FILE, RUN_RECORD, ".tmp-*")


def _recorded_names(output_dir: Path) -> tuple[str, ...]:
    """The names a previous run of this script recorded writing here; () if nothing says it was one.

    A folder written before runs kept a record counts as a run's when it holds a model or checkpoints."""
    try:
        return tuple(json.loads((output_dir / RUN_RECORD).read_text())["files"])
    except FileNotFoundError:
        older = (output_dir / WEIGHTS).is_file() or (output_dir / CHECKPOINTS).is_dir()
        return OWN_NAMES if older else ()
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def claim_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> FileLock:
    """Lock the folder for this run, once it is known to be writable and new, empty or a previous run's.

    Nothing is deleted here: ``start_run`` clears a previous run once every check has passed."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise TrainingError(f"--output-dir {output_dir} is not writable: {error.strerror or error}.") from None
    recorded = _recorded_names(output_dir)
    foreign = sorted(entry.name for entry in output_dir.iterdir()
                     if entry.name not in (*recorded, LOCK_FILE) and not entry.name.startswith(OWN_TEMPORARY))
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
        save_file_atomically(output_dir / RUN_RECORD, lambda path: Path(path).write_text(
            json.dumps({"written_by": "train_accelerate.py", "files": list(OWN_NAMES)}, indent=2)))
    return lock


def start_run(output_dir: Path, overwrite: bool) -> None:
    """Every check has passed: remove this script's interrupted writes and, with ``overwrite``, what the
    previous run recorded writing here. Nothing else is touched."""
    stale = [entry for entry in output_dir.iterdir() if entry.name.startswith(OWN_TEMPORARY)]
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


def backbone_init(settings) -> str:
    """How the backbone started, in words, for the run's identity and the model card."""
    if settings.pretrained_weights:
        return "ImageNet weights from " + settings.pretrained_weights
    return "random (--no-pretrained)" if settings.no_pretrained else "timm ImageNet weights"


def write_evaluation(settings, model: CatDogClassifier, output_dir: Path, progress: Progress,
                     test_outputs, detector: dict, data) -> dict:
    """ood.safetensors and the serving engine (made from model.safetensors as saved, on the CPU), then the
    evaluation report on the test split."""
    save_file_atomically(output_dir / OOD_FILE, lambda path: save_detector(detector, path))
    save_engine(output_dir)
    test_rows = load_split(output_dir / SPLIT_FILE, data, "test", used=True)
    return report_training_run(model, detector, test_outputs, lambda i: test_rows[i][data.image_column], output_dir,
                               progress.history, title=f"catdog evaluation: {settings.hub_model_id or settings.output_dir}, test split")


def save_engine(output_dir: Path) -> None:
    """openvino_model.xml/.bin next to the weights, written in a temporary folder and renamed into place."""
    logger.info("exporting the serving engine (OpenVINO IR, int8 weights) from %s", WEIGHTS)
    weights = CatDogClassifier.from_pretrained(str(output_dir))
    try:
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-engine-") as temp:
            save_openvino(weights, temp)
            for name in IR_FILES:
                os.chmod(Path(temp) / name, 0o644)
                os.replace(Path(temp) / name, output_dir / name)
    except OSError as error:
        raise TrainingError(f"Could not write the OpenVINO engine in {output_dir}: {error.strerror or error}.") from None


def write_metrics_and_card(settings, accelerator: Accelerator, output_dir: Path, progress: Progress,
                           test: dict, calibration: dict, evaluation: dict, data, splits, used, fingerprint: str) -> None:
    """metrics.json and the model card (README.md) record the whole run; then config.json gains the calibration
    and, written last, the manifest of every file the run wrote."""
    # The temperature and the "neither" threshold join the model's config, the one source of truth the predictor reads.
    config = {**json.loads((output_dir / "config.json").read_text()), "temperature": calibration["temperature"],
              "ood_threshold": evaluation["ood"]["threshold"]}
    metrics = {
        "history": progress.history,
        "best_epoch": progress.best_epoch,
        "test": test,
        "calibration": calibration,
        "evaluation": {k: v for k, v in evaluation.items() if k not in ("figures", "report")},
        "dataset": settings.dataset,
        "dataset_revision": settings.dataset_revision,
        "dataset_fingerprint": fingerprint,
        "split_sizes": {name: len(split) for name, split in used.items()},
        "full_split_sizes": {name: len(split) for name, split in splits.items()},
        "skipped_rows": len(data.skipped_rows),
        "backbone_init": backbone_init(settings),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "mixed_precision_reason": settings.precision_reason,
        "seed": settings.seed,
        "args": {k: v for k, v in vars(settings).items() if k != "hub_token"},
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__},
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    make_model_card(metrics, config, settings.hub_model_id or settings.output_dir, evaluation["figures"]).save(output_dir / "README.md")
    written = [name for name in RUN_FILES if name != "config.json" and (output_dir / name).is_file()]
    config[MANIFEST_KEY] = make_manifest(output_dir, written, derived=(*IR_FILES, OOD_FILE))
    save_file_atomically(output_dir / "config.json", lambda path: Path(path).write_text(json.dumps(config, indent=2)))
    logger.info("saved the model, metrics.json, %s and the model card to %s", SPLIT_FILE, output_dir)


def push_run(settings, output_dir: Path) -> None:
    """Upload the output folder; the local files stay whatever happens."""
    api = HfApi(token=settings.hub_token)
    try:
        api.create_repo(settings.hub_model_id, private=settings.hub_private, exist_ok=True)
        commit = api.upload_folder(repo_id=settings.hub_model_id, folder_path=output_dir, ignore_patterns=list(NOT_PUSHED),
                                   commit_message="Upload catdog model from train_accelerate.py")
    except (HTTPError, OSError, ValueError) as error:  # HTTPError: huggingface_hub's, a dropped connection included
        raise TrainingError(
            f"Could not push to {settings.hub_model_id}: {str(error).splitlines()[0]}. The files are kept in {output_dir}; "
            f"upload them later with `hf upload {settings.hub_model_id} {output_dir} "
            + " ".join(f"--exclude '{pattern}'" for pattern in NOT_PUSHED) + "`."
        ) from None
    logger.info("pushed to %s", commit.commit_url)
