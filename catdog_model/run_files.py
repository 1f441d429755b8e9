"""What a training run leaves behind: its files in the output folder, and their copy on the Hub.

Used by train_accelerate.py once the kept weights are calibrated and tested.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import accelerate
import datasets
import timm
import torch
from accelerate import Accelerator
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from .card import make_model_card
from .data import load_split
from .evaluate import EVALUATION_FILE, FIGURES, REPORT_FILE, report_training_run
from .engine import IR_FILES
from .export import save_openvino
from .manifest import MANIFEST_KEY, WEIGHTS, make_manifest
from .model import CatDogClassifier
from .ood import OOD_FILE, save_detector
from .training import CHECKPOINTS, LOCK_FILE, Progress, TrainingError, save_file_atomically

__all__ = ["NOT_PUSHED", "RUN_FILES", "SPLIT_FILE", "TRACKER_PROJECT", "backbone_init", "push_run",
           "write_evaluation", "write_metrics_and_card"]

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
TRACKER_PROJECT = "catdog"  # trackers log under output_dir/catdog
# What a run writes into its output folder (with checkpoints/): --overwrite-output-dir removes these, nothing else.
RUN_FILES = ("config.json", WEIGHTS, *IR_FILES, OOD_FILE, "metrics.json", SPLIT_FILE, "README.md", EVALUATION_FILE,
             REPORT_FILE, *(f"{name}.png" for name in FIGURES), TRACKER_PROJECT)
NOT_PUSHED = (f"{CHECKPOINTS}/*", f"{TRACKER_PROJECT}/*", LOCK_FILE, ".tmp-*")


def backbone_init(args: argparse.Namespace) -> str:
    """How the backbone started, in words, for the run's identity and the model card."""
    if args.pretrained_weights:
        return "ImageNet weights from " + args.pretrained_weights
    return "random (--no-pretrained)" if args.no_pretrained else "timm ImageNet weights"


def write_evaluation(args: argparse.Namespace, model: CatDogClassifier, output_dir: Path, progress: Progress,
                     test_outputs, detector: dict, data) -> dict:
    """ood.safetensors and the serving engine (made from model.safetensors as saved, on the CPU), then the
    evaluation report on the test split."""
    save_file_atomically(output_dir / OOD_FILE, lambda path: save_detector(detector, path))
    save_engine(output_dir)
    test_rows = load_split(output_dir / SPLIT_FILE, data, "test", used=True)
    return report_training_run(model, detector, test_outputs, lambda i: test_rows[i][data.image_column], output_dir,
                               progress.history, title=f"catdog evaluation: {args.hub_model_id or args.output_dir}, test split")


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


def write_metrics_and_card(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path, progress: Progress,
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
        "dataset": args.dataset,
        "dataset_revision": args.dataset_revision,
        "dataset_fingerprint": fingerprint,
        "split_sizes": {name: len(split) for name, split in used.items()},
        "full_split_sizes": {name: len(split) for name, split in splits.items()},
        "skipped_rows": len(data.skipped_rows),
        "backbone_init": backbone_init(args),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "mixed_precision_reason": args.precision_reason,
        "seed": args.seed,
        "args": {k: v for k, v in vars(args).items() if k != "hub_token"},
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__},
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    make_model_card(metrics, config, args.hub_model_id or args.output_dir, evaluation["figures"]).save(output_dir / "README.md")
    written = [name for name in RUN_FILES if name != "config.json" and (output_dir / name).is_file()]
    config[MANIFEST_KEY] = make_manifest(output_dir, written, derived=(*IR_FILES, OOD_FILE))
    save_file_atomically(output_dir / "config.json", lambda path: Path(path).write_text(json.dumps(config, indent=2)))
    logger.info("saved the model, metrics.json, %s and the model card to %s", SPLIT_FILE, output_dir)


def push_run(args: argparse.Namespace, output_dir: Path) -> None:
    """Upload the output folder; the local files stay whatever happens."""
    api = HfApi(token=args.hub_token)
    try:
        api.create_repo(args.hub_model_id, private=args.hub_private, exist_ok=True)
        commit = api.upload_folder(repo_id=args.hub_model_id, folder_path=output_dir, ignore_patterns=list(NOT_PUSHED),
                                   commit_message="Upload catdog model from train_accelerate.py")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise TrainingError(
            f"Could not push to {args.hub_model_id}: {str(error).splitlines()[0]}. The files are kept in {output_dir}; "
            f"upload them later with `hf upload {args.hub_model_id} {output_dir} "
            + " ".join(f"--exclude '{pattern}'" for pattern in NOT_PUSHED) + "`."
        ) from None
    logger.info("pushed to %s", commit.commit_url)
