"""A training run's state: progress and running metrics, evaluation and calibration, and checkpoints that
survive kills and refuse the wrong run. Used by train_accelerate.py.

Layout: ``output_dir/checkpoints/step_<8 digits>/``, each holding what ``Accelerator.save_state`` writes
plus ``checkpoint.json``: the run's identity and the size of every file. Every process writes into
``.tmp-step_<N>`` first; only when all of them are done is the manifest written and the folder renamed,
so a kill at any moment leaves the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from .calibration import ECE_BINS, expected_calibration_error, fit_temperature
from .manifest import file_sha256
from .model import CatDogClassifier

__all__ = [
    "CHECKPOINTS", "CheckpointError", "MANIFEST", "Progress", "RunningMetrics", "TrainingError",
    "exit_with_parent", "file_sha256", "find_latest", "find_resume_checkpoint", "identity_changes",
    "on_main_process", "read_manifest", "save_checkpoint", "evaluate", "model_outputs", "calibrate", "save_file_atomically", "check_finite", "save_model",
    "check_best_model",
]

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/step_<8 digits>
_NAME = re.compile(r"step_(\d{8})")
_TEMP_PREFIX = ".tmp-"


class TrainingError(RuntimeError):
    """A problem the user can fix; the training script prints it as one line, without a traceback."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be used; the message says which and why."""


class RunningMetrics:
    """Summed BCE loss and correct answers over gathered batches (every process sees the same sums).

    The sums stay on the device; only ``result`` reads them back, so updating costs no GPU sync.
    """

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count = 0.0, 0.0, 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add one batch; returns its summed loss (still on the device)."""
        batch_loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum")
        self.loss_sum = self.loss_sum + batch_loss
        self.correct = self.correct + ((logits > 0).float() == labels).sum()
        self.count += len(labels)
        return batch_loss

    def result(self) -> dict:
        count = max(self.count, 1)
        return {"loss": float(self.loss_sum) / count, "accuracy": float(self.correct) / count, "samples": self.count}

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "correct": float(self.correct), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        # float32 sums survive the trip through a Python float exactly, so a resumed epoch adds up bit for bit.
        self.loss_sum, self.correct, self.count = state["loss_sum"], state["correct"], state["count"]


class Progress:
    """Where training stands, with the running sums of the current epoch; saved inside each checkpoint,
    so that a run resumed mid-epoch (or at an epoch's last step) continues with complete metrics."""

    def __init__(self) -> None:
        self.epoch, self.batches_in_epoch, self.optimizer_steps = 0, 0, 0
        self.best_val_accuracy, self.best_epoch, self.best_model_sha256, self.history = -1.0, -1, None, []
        self.train_metrics = RunningMetrics()

    def state_dict(self) -> dict:
        return {**vars(self), "train_metrics": self.train_metrics.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        metrics = state.pop("train_metrics")
        vars(self).update(state)
        self.train_metrics = RunningMetrics()
        self.train_metrics.load_state_dict(metrics)


def exit_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG; a no-op
    elsewhere): a training process started by a launcher that is killed with -9 must not run on alone."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os.kill(os.getpid(), sig)


def exit_with_parent_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker dies with its training process. A fork does not inherit
    the death signal, and torch's own check of the parent only runs while the worker waits for work."""
    exit_with_parent(os.getppid())


# ---- Evaluation, calibration, and what may be saved.

def evaluate(model, loader, accelerator: Accelerator, desc: str) -> dict:
    """Mean BCE loss and accuracy over the whole loader, gathered across processes."""
    metrics = RunningMetrics()
    metrics.update(*logits_and_labels(model, loader, accelerator, desc))
    return metrics.result()


def logits_and_labels(model, loader, accelerator: Accelerator, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's logit and label, gathered across processes (padding of uneven shards dropped)."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
            batch_logits, batch_labels = accelerator.gather_for_metrics((model(batch["pixels"]), batch["labels"]))
            logits.append(batch_logits.float())
            labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def model_outputs(model, loader, accelerator: Accelerator, desc: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Every image's logit, label and "neither"-detector features, gathered across processes."""
    model.eval()
    inner = accelerator.unwrap_model(model)
    logits, labels, features = [], [], {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        with torch.no_grad():
            _, batch_logits, batch_features = inner.forward_with_features(batch["pixels"])
        batch_logits, batch_labels, batch_features = accelerator.gather_for_metrics(
            (batch_logits, batch["labels"], batch_features))
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.cpu())
        for layer, value in batch_features.items():
            features.setdefault(layer, []).append(value.float().cpu())
    return torch.cat(logits), torch.cat(labels), {layer: torch.cat(values) for layer, values in features.items()}


def calibrate(validation: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, dict]:
    """Fit the temperature on the validation (logits, labels); the test metrics and the calibration block.

    Every process sees the same gathered logits, so every one fits the same temperature."""
    (val_logits, val_labels), (test_logits, test_labels) = validation, test
    temperature = fit_temperature(val_logits, val_labels)
    metrics = RunningMetrics()
    metrics.update(test_logits, test_labels)

    def block(logits, labels) -> dict:
        loss = lambda t: float(F.binary_cross_entropy_with_logits(logits / t, labels.float()))  # noqa: E731
        return {"ece_before": expected_calibration_error(logits, labels), "loss_before": loss(1.0),
                "ece_after": expected_calibration_error(logits, labels, temperature), "loss_after": loss(temperature)}

    return metrics.result(), {"temperature": temperature, "bins": ECE_BINS, "validation": block(val_logits, val_labels),
                              "test": block(test_logits, test_labels)}


def check_finite(losses: list, model: torch.nn.Module, progress: Progress) -> None:
    """Stop before anything non-finite is saved: the losses since the last check, then the weights."""
    if losses:
        values = torch.stack([loss for _, _, loss in losses])
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            batch, step, loss = losses[int(bad[0])]
            raise TrainingError(
                f"The training loss became {float(loss)} at optimizer step {step} (epoch {progress.epoch + 1}, batch {batch}). Nothing from that "
                "point on was saved; the last complete checkpoint is kept. Lower --learning-rate and start again."
            )
        losses.clear()
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise TrainingError(f"The weights became non-finite in epoch {progress.epoch + 1}; nothing was saved from that point on. "
                            "Lower --learning-rate and start again.")


def save_model(model: CatDogClassifier, output_dir: Path) -> str:
    """save_pretrained into a temporary folder, then rename: a kill never leaves a half-written model.

    Returns the weights' sha256, which the checkpoints keep so that a resume can check the file."""
    try:
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-model-") as temp:
            model.save_pretrained(temp)
            digest = file_sha256(Path(temp) / "model.safetensors")
            for name in ("config.json", "model.safetensors"):
                os.chmod(Path(temp) / name, 0o644)
                os.replace(Path(temp) / name, output_dir / name)
    except OSError as error:
        raise TrainingError(f"Could not save the model in {output_dir}: {error.strerror or error}.") from None
    return digest


def save_file_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, then mode 0644 and a rename onto ``path``: never a half-written file."""
    temporary = path.with_name(f".tmp-{path.name}")
    try:
        write(str(temporary))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise TrainingError(f"Could not write {path}: {error.strerror or error}.") from None


def check_best_model(output_dir: Path, progress: Progress, epoch_ended: bool = False) -> None:
    """A run tests the best epoch's weights at the end: they must be the very file it saved.

    Checked when a run resumes, and again before the test. A checkpoint taken at an epoch's last batch
    comes before that epoch's validation, which may have saved a better model since (``epoch_ended``):
    the resumed run validates the epoch again and saves the same file, so only the final check applies.
    """
    path = output_dir / "model.safetensors"
    if epoch_ended:
        return
    if progress.best_epoch > 0 and (not path.is_file() or file_sha256(path) != progress.best_model_sha256):
        state = "was replaced" if path.is_file() else "is missing"
        raise TrainingError(f"{path}, the best model so far (epoch {progress.best_epoch}), {state}: resume in the output "
                            "folder of the run that wrote the checkpoint, or start afresh with --overwrite-output-dir.")


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete checkpoint, or ``CheckpointError`` saying what is missing or truncated."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, _ = manifest["files"].items(), manifest["identity"].items()
        int(manifest["epoch"]), int(manifest["batches_in_epoch"])
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (interrupted while written, or made by an older version)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({type(error).__name__})") from None
    for name, size in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {name} is truncated or changed ({path.stat().st_size} of {size} bytes)")
    return manifest


def _steps(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``step_*`` folders, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def find_latest(checkpoints_dir: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint and its manifest; incomplete ones are skipped with a warning."""
    for _, folder in reversed(_steps(checkpoints_dir)):
        try:
            return folder, read_manifest(folder)
        except CheckpointError as error:
            logger.warning("skipping incomplete checkpoint %s", error)
    raise CheckpointError(f"no complete checkpoint in {checkpoints_dir}")


def _publish(temp: Path, final: Path, info: dict) -> None:
    """Write the manifest last, then rename: the folder appears under its real name only when whole."""
    files = {p.name: p.stat().st_size for p in sorted(temp.iterdir()) if p.is_file()}
    (temp / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2))
    if final.exists():  # the same step written again (a rerun from an earlier checkpoint): replace it
        stale = final.with_name(_TEMP_PREFIX + "old-" + final.name)
        final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    temp.rename(final)


def _prune(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete everything older than the oldest one kept."""
    complete = [folder for _, folder in reversed(_steps(checkpoints_dir)) if (folder / MANIFEST).is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = int(_NAME.fullmatch(complete[keep - 1].name).group(1))
    for step, folder in _steps(checkpoints_dir):
        if step < oldest_kept:
            logger.info("removing %s (--checkpoints-total-limit %d)", folder, keep)
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, info: dict, keep: Optional[int]) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename to ``step_<step>``.

    Call it on every process: each one saves its own random state. The main process publishes the
    folder; on machines that do not share the disk, each machine's local main publishes its own copy.
    """
    final = checkpoints_dir / f"step_{step:08d}"
    temp = checkpoints_dir / f"{_TEMP_PREFIX}{final.name}"
    if accelerator.is_local_main_process:
        for stale in checkpoints_dir.glob(_TEMP_PREFIX + "*"):  # left by a killed run
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
    except OSError as error:  # a full disk, most often: the half-written folder never becomes a checkpoint
        raise CheckpointError(f"Could not write {final}: {error.strerror or error}. The earlier checkpoints are kept.") from None
    return final


def identity_changes(saved: dict, current: dict) -> list[str]:
    """``"KEY was X, now Y"`` for every entry of the run identity that differs (keys name the flags)."""
    return [
        f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


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
                raise CheckpointError(f"no such checkpoint folder: {path}")
            manifest = read_manifest(path)
    except CheckpointError as error:
        raise TrainingError(f"--resume-from-checkpoint {resume_from}: {error}") from None
    changes = identity_changes(manifest["identity"], identity)
    if changes:
        raise TrainingError(
            f"{path} belongs to another run ({'; '.join(changes)}). Resume with the same flags, "
            "or start afresh with --overwrite-output-dir."
        )
    reached = manifest["epoch"] + (1 if manifest["batches_in_epoch"] else 0)  # epochs finished or begun
    if reached > epochs:
        raise TrainingError(f"{path} has already reached epoch {reached}; --epochs {epochs} would end the run before it.")
    return path


def on_main_process(accelerator: Accelerator, check: Callable, *check_args):
    """Run ``check`` on the main process only; if it fails, every process fails with its message."""
    result, message = None, None
    if accelerator.is_main_process:
        try:
            result = check(*check_args)
        except TrainingError as error:
            message = str(error)
    message = broadcast_object_list([message])[0] if accelerator.num_processes > 1 else message
    if message:
        raise TrainingError(message)
    return result
