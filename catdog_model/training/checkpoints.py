"""Checkpoints that survive kills and refuse the wrong run: ``checkpoints/step_<8 digits>/``,
``Accelerator.save_state``'s files and ``checkpoint.json`` (the run's identity, where it stands), renamed into place
when whole. Not accelerate's automatic naming: with ``total_limit`` it deletes the oldest checkpoint before the new one
is written."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from safetensors import SafetensorError

from ..serving.files import TEMPORARY_PREFIX
from .run_state import CHECKPOINTS, TrainingError, check_best_model

__all__ = ["CHECKPOINTS", "MANIFEST", "find_latest", "find_resume_checkpoint",
           "load_checkpoint", "read_manifest", "save_checkpoint"]

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
_NAME = re.compile(r"step_(\d{8})")


def read_manifest(folder: Path) -> dict:
    """A checkpoint's manifest, or ``TrainingError``. A ``step_*`` folder appears by rename once whole, so its files
    need no check."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["identity"].items(), int(manifest["epoch"]), int(manifest["batches_in_epoch"])
    except FileNotFoundError:
        raise TrainingError(f"{folder}: no {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise TrainingError(f"{folder}: unreadable {MANIFEST} ({type(error).__name__})") from None
    return manifest


def _steps(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``step_*`` folders, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def find_latest(checkpoints_dir: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint and its manifest; incomplete ones skipped with a warning."""
    for _, folder in reversed(_steps(checkpoints_dir)):
        try:
            return folder, read_manifest(folder)
        except TrainingError as error:
            logger.warning("skipping incomplete checkpoint %s", error)
    raise TrainingError(f"no complete checkpoint in {checkpoints_dir}")


def _publish(temp: Path, final: Path, info: dict) -> None:
    """The manifest last, then the rename: the folder appears under its name only when whole."""
    (temp / MANIFEST).write_text(json.dumps(info, indent=2))
    if final.exists():  # the same step written again (a rerun from an earlier checkpoint): replace it
        stale = final.with_name(TEMPORARY_PREFIX + "old-" + final.name)
        final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    temp.rename(final)


def _prune(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete everything older."""
    complete = [folder for _, folder in reversed(_steps(checkpoints_dir)) if (folder / MANIFEST).is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = int(_NAME.fullmatch(complete[keep - 1].name).group(1))
    for step, folder in _steps(checkpoints_dir):
        if step < oldest_kept:
            logger.info("removing %s (--checkpoints-total-limit %d)", folder, keep)
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, info: dict, keep: Optional[int]) -> Path:
    """``save_state`` into a temporary folder, then renamed to ``step_<step>``; on every process (each machine's local
    main publishes where disks are not shared)."""
    final = checkpoints_dir / f"step_{step:08d}"
    temp = checkpoints_dir / f"{TEMPORARY_PREFIX}{final.name}"
    if accelerator.is_local_main_process:
        for stale in checkpoints_dir.glob(TEMPORARY_PREFIX + "*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        temp.mkdir(parents=True, exist_ok=True)  # exist_ok: machines sharing a disk all get here
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _publish(temp, final, info)
            if keep:
                _prune(checkpoints_dir, keep)
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process and not accelerator.is_main_process and temp.is_dir():
            _publish(temp, final, info)
            if keep:
                _prune(checkpoints_dir, keep)
    except (OSError, SafetensorError) as error:  # a full disk, most often: the half-written folder never becomes one
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise TrainingError(f"Could not write {final}: {reason}. The earlier checkpoints are kept.") from None
    return final


def find_resume_checkpoint(resume_from: Optional[str], output_dir: Path, identity: dict, epochs: int) -> Optional[Path]:
    """The checkpoint to resume from ("latest" or a folder), complete and written by this very run."""
    if not resume_from:
        return None
    try:
        if resume_from == "latest":
            path, manifest = find_latest(output_dir / CHECKPOINTS)
        else:
            path = Path(resume_from)
            if not path.is_dir():
                raise TrainingError(f"no such checkpoint folder: {path}")
            manifest = read_manifest(path)
    except TrainingError as error:
        raise TrainingError(f"--resume-from-checkpoint {resume_from}: {error}") from None
    saved = manifest["identity"]  # keys name the flags
    changes = [f"{key} was {saved.get(key)!r}, now {identity.get(key)!r}"
               for key in sorted(set(saved) | set(identity)) if saved.get(key) != identity.get(key)]
    if changes:
        raise TrainingError(
            f"{path} belongs to another run ({'; '.join(changes)}). Resume with the same flags, "
            "or start afresh with --overwrite-output-dir."
        )
    reached = manifest["epoch"] + (1 if manifest["batches_in_epoch"] else 0)  # epochs finished or begun
    if reached > epochs:
        raise TrainingError(f"{path} has already reached epoch {reached}; --epochs {epochs} would end the run before it.")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, output_dir: Path, progress, batches_per_epoch: int) -> None:
    """``load_state`` from the chosen checkpoint, then the check that the best model saved so far is untouched."""
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise TrainingError(f"Could not load {path}: {str(error).splitlines()[0]}") from None
    if accelerator.is_main_process:
        check_best_model(output_dir, progress, epoch_ended=progress.batches_in_epoch == batches_per_epoch)
    logger.info("resumed from %s at epoch %d, batch %d", path, progress.epoch + 1, progress.batches_in_epoch)
