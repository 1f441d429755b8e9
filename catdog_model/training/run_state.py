"""What a training run keeps and does between its steps: progress and metrics, evaluation and calibration, the atomic
save, the precision and workers it trains with."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import WEIGHTS
from ..hardware import native_bf16, usable_cores
from ..model import CatDogClassifier
from ..serving.files import file_sha256, write_atomically
from . import TrainingError
from .calibration import calibrate, fit_detector
from .data import make_transform

__all__ = ["BEST", "CHECKPOINTS", "Fitted", "Loaders", "Progress", "RunData", "RunningMetrics", "TrainingError", "calibrate_and_test", "check_best_model",
           "check_finite", "configured_mixed_precision", "default_mixed_precision", "default_num_workers", "evaluate", "exit_with_parent",
           "model_outputs", "on_main_process", "save_atomically", "save_model"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/step_<8 digits>, and the best epoch's weights so far:
BEST = "checkpoints/best"  # out of the files a predictor reads until the run publishes its finished model

class RunningMetrics:
    """Summed BCE loss and correct answers over gathered batches, on the device: only ``result`` syncs."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count = 0.0, 0.0, 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add one batch; returns its summed loss (on the device)."""
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
    """Where training stands, with the epoch's running sums: saved in each checkpoint, so that a run resumed mid-epoch
    has complete metrics."""

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
    """Have Linux send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG): a process whose launcher was
    killed with -9 must not run on alone."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os.kill(os.getpid(), sig)


def exit_with_parent_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker dies with its training process (a fork does not inherit the death
    signal)."""
    exit_with_parent(os.getppid())


# ---- Evaluation, calibration, and what may be saved.

def evaluate(model, loader, accelerator: Accelerator, desc: str) -> dict:
    """Mean BCE loss and accuracy over the loader, gathered across processes."""
    metrics = RunningMetrics()
    metrics.update(*model_outputs(model, loader, accelerator, desc, features=False)[:2])
    return metrics.result()


def model_outputs(model, loader, accelerator: Accelerator, desc: str, features: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Every image's logit, label and (``features``) detector features, gathered across processes; without features the
    prepared model runs, in the run's precision."""
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


@dataclass
class RunData:
    """What a run reads: the dataset, its full splits, the rows used (what split.json records), the same rows as the
    loaders read them, and the content's fingerprint."""

    data: Any  # data.LoadedDataset
    splits: dict
    rows: dict
    used: dict
    fingerprint: str


class Loaders(NamedTuple):
    train: DataLoader
    validation: DataLoader
    test: DataLoader
    options: dict  # what every loader of the run shares (batch size, collate, workers)


@dataclass
class Fitted:
    """What is fitted after the epochs: the calibration, the test split's outputs, the "neither" detector."""

    calibration: dict
    test_outputs: tuple
    detector: dict


def calibrate_and_test(config, accelerator: Accelerator, model, progress: Progress, run: RunData,
                       loaders: Loaders) -> Fitted:
    """The kept weights calibrated on validation, run on test, and the "neither" detector fitted on the unaugmented
    training split."""
    unwrapped = accelerator.unwrap_model(model)
    on_main_process(accelerator, check_best_model, Path(config.output_dir), progress)
    safetensors.torch.load_model(unwrapped, str(Path(config.output_dir) / BEST / WEIGHTS))
    plain_train = accelerator.prepare(DataLoader(
        run.used["train"].with_transform(make_transform(run.data, config.image_size, train=False)), **loaders.options))
    validation = model_outputs(model, loaders.validation, accelerator, "validation")
    test_outputs = model_outputs(model, loaders.test, accelerator, "test")
    train_outputs = model_outputs(model, plain_train, accelerator, "fitting the 'neither' detector")
    calibration = calibrate(*validation[:2])  # every process sees the same gathered logits: the same fit
    unwrapped.temperature = calibration["temperature"]
    detector, unwrapped.ood_threshold = fit_detector(train_outputs[2], train_outputs[1], validation[2])
    logger.info("temperature %.3f (%s): validation ECE %.4f -> %.4f", calibration["fitted_temperature"],
                "kept" if calibration["temperature"] != 1.0 else "not kept: it would not lower the validation ECE",
                calibration["validation"]["ece_before"], calibration["validation"]["ece_after"])
    return Fitted(calibration, test_outputs, detector)


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


def save_atomically(folder: Path, write: Callable[[Path], None]) -> list[str]:
    """``write_atomically``, a failure (a full disk, most often) as one ``TrainingError``."""
    try:
        return write_atomically(folder, write)
    except (OSError, SafetensorError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise TrainingError(f"Could not write to {folder}: {reason}. The files already there are kept.") from None


def save_model(model: CatDogClassifier, output_dir: Path) -> str:
    """The best epoch's weights into checkpoints/best, atomically; returns their sha256 for the checkpoints to keep."""
    best = output_dir / BEST
    best.mkdir(parents=True, exist_ok=True)
    save_atomically(best, lambda temp: model.save_pretrained(temp))
    return file_sha256(best / WEIGHTS)


def check_best_model(output_dir: Path, progress: Progress, epoch_ended: bool = False) -> None:
    """The best weights so far must be the very file this run saved. A checkpoint from an epoch's last batch
    (``epoch_ended``) predates the validation the resume repeats: no check then."""
    path = output_dir / BEST / WEIGHTS
    if epoch_ended:
        return
    if progress.best_epoch > 0 and (not path.is_file() or file_sha256(path) != progress.best_model_sha256):
        state = "was replaced" if path.is_file() else "is missing"
        raise TrainingError(f"{path}, the best model so far (epoch {progress.best_epoch}), {state}: resume in the output "
                            "folder of the run that wrote the checkpoint, or start afresh with --overwrite-output-dir.")


def on_main_process(accelerator: Accelerator, check: Callable, *check_args):
    """Run ``check`` on the main process; if it fails, every process fails with its message."""
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


# ---- What a machine trains with.

def configured_mixed_precision(config_file: Optional[Path] = None) -> Optional[str]:
    """The precision ``accelerate launch`` passed on, or None where nobody chose one: launch passes "no" by itself when
    nothing names one, so "no" counts only where the config file names a precision."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if value != "no":
        return value or None
    from accelerate.commands.config import default_config_file

    try:
        named = (yaml.safe_load(Path(config_file or default_config_file).read_text()) or {}).get("mixed_precision")
    except (OSError, yaml.YAMLError, AttributeError):  # no config file, or not one accelerate wrote
        named = None
    return "no" if named else None


def default_mixed_precision(device: "torch.device", configured: str | None = None,
                            flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The precision to train in when no flag names one, and why: accelerate config's, else bf16 where the hardware
    computes it natively (2.3x a CPU train step on an AVX-512 BF16 EPYC), else float32."""
    if configured:
        return configured, "accelerate config"
    if device.type == "cpu":
        if native_bf16(flags):
            return "bf16", "default: the CPU computes bf16 natively (AVX-512 BF16 or AMX)"
        return "no", "default: the CPU has no native bf16 (fp32 is faster there)"
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", "default: the GPU computes bf16 natively"
    return "no", f"default: no native bf16 known for {device.type}"


def default_num_workers(device: "torch.device", processes: int = 1) -> int:
    """DataLoader workers per process: on a GPU the cores, shared, at most 8; on a CPU one, since decoding (~2 ms) is
    cheap next to a step (~100 ms)."""
    if device.type == "cpu":
        return 1
    return max(1, min(8, usable_cores() // max(1, processes)))
