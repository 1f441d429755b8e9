"""A training run's state: progress and running metrics, evaluation and calibration, safe saves of the
model, and the process control that keeps workers from outliving the run. Used by train_accelerate.py;
its checkpoints are checkpoints.py's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .calibration import ECE_BINS, calibration_summary, fit_temperature
from .data import make_transform
from .manifest import file_sha256
from .model import CatDogClassifier
from .ood import fit_detector

__all__ = ["Progress", "RunningMetrics", "TrainingError", "calibrate", "calibrate_and_test", "check_best_model", "check_finite",
           "evaluate",
           "exit_with_parent", "model_outputs", "on_main_process", "save_file_atomically", "save_model"]

logger = logging.getLogger(__name__)

class TrainingError(RuntimeError):
    """A problem the user can fix; the training script prints it as one line, without a traceback."""


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
    metrics.update(*model_outputs(model, loader, accelerator, desc, features=False)[:2])
    return metrics.result()


def model_outputs(model, loader, accelerator: Accelerator, desc: str, features: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Every image's logit, label and (with ``features``) "neither"-detector features, gathered across processes
    (padding of uneven shards dropped). Without features the prepared model runs, in the run's mixed precision."""
    model.eval()
    inner = accelerator.unwrap_model(model)
    logits, labels, layers = [], [], {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        with torch.no_grad():
            batch_logits, batch_features = (inner.forward_with_features(batch["pixels"])[1:] if features
                                            else (model(batch["pixels"]), {}))
        batch_logits, batch_labels, batch_features = accelerator.gather_for_metrics(
            (batch_logits, batch["labels"], batch_features))
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.cpu())
        for layer, value in batch_features.items():
            layers.setdefault(layer, []).append(value.float().cpu())
    return torch.cat(logits), torch.cat(labels), {layer: torch.cat(values) for layer, values in layers.items()}


def calibrate(validation: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, dict]:
    """Fit the temperature on the validation (logits, labels); the test metrics and the calibration block.

    Every process sees the same gathered logits, so every one fits the same temperature."""
    (val_logits, val_labels), (test_logits, test_labels) = validation, test
    temperature = fit_temperature(val_logits, val_labels)
    metrics = RunningMetrics()
    metrics.update(test_logits, test_labels)
    return metrics.result(), {"temperature": temperature, "bins": ECE_BINS,
                              "validation": calibration_summary(val_logits, val_labels, temperature),
                              "test": calibration_summary(test_logits, test_labels, temperature)}


def calibrate_and_test(config, accelerator: Accelerator, model, progress: Progress, data, train_split, val_loader,
                       test_loader, loader_kwargs: dict) -> tuple[dict, dict, tuple, dict]:
    """The kept (best-validation) weights: calibrated on the validation split, tested on the held-out one,
    and the "neither" detector fitted on the training split's features (seen without augmentation).

    Returns the test metrics, the calibration block, the test split's outputs and the detector's tensors."""
    unwrapped = accelerator.unwrap_model(model)
    on_main_process(accelerator, check_best_model, Path(config.output_dir), progress)
    safetensors.torch.load_model(unwrapped, str(Path(config.output_dir) / "model.safetensors"))
    plain_train = accelerator.prepare(DataLoader(
        train_split.with_transform(make_transform(data, config.image_size, train=False)), **loader_kwargs))
    validation = model_outputs(model, val_loader, accelerator, "validation")
    test_outputs = model_outputs(model, test_loader, accelerator, "test")
    train_outputs = model_outputs(model, plain_train, accelerator, "fitting the 'neither' detector")
    test, calibration = calibrate(validation[:2], test_outputs[:2])
    unwrapped.temperature = calibration["temperature"]
    detector, unwrapped.ood_threshold = fit_detector(train_outputs[2], train_outputs[1], validation[2])
    logger.info("temperature %.3f: validation ECE %.4f -> %.4f, test ECE %.4f -> %.4f", calibration["temperature"],
                calibration["validation"]["ece_before"], calibration["validation"]["ece_after"],
                calibration["test"]["ece_before"], calibration["test"]["ece_after"])
    return test, calibration, test_outputs, detector


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
