"""A training run's settings: one frozen dataclass, the command line built from its fields, every value checked before
torch is imported."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..config import DEFAULTS
from ..cli import exit_with_error, setup_logging
from ..serving.files import unreachable_hub_message, no_such_folder
from . import TrainingError

__all__ = ["TrainingSettings", "parse_args", "settings"]

DESCRIPTION = ("Fine-tune the catdog classifier (timm ResNet50 + the fixed head) on cats_vs_dogs with 🤗 Accelerate. "
               "Every flag also takes accelerate's and transformers' spelling, with underscores (--output_dir).")
# The trackers accelerate's log_with takes by name (accelerate.utils.LoggerType, "all" aside).
TRACKERS = ("tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")


def _installed(tracker: str) -> bool:
    """Whether accelerate can log to ``tracker`` here (TensorBoard's writer also comes as tensorboardX)."""
    return any(importlib.util.find_spec(package) for package in
               (("tensorboard", "tensorboardX") if tracker == "tensorboard" else (tracker,)))


def _flag(default, help: str = "", group: str = "training", **argparse_options):
    return field(default=default, metadata=dict(help=help, group=group, **argparse_options))


@dataclass(frozen=True)
class TrainingSettings:
    """Every setting of a run; the command line is built from these fields, and a value that cannot work is refused
    here."""

    dataset: str = _flag("microsoft/cats_vs_dogs", "Hub dataset id or local folder", "data", aliases=("--dataset_name",))
    dataset_revision: Optional[str] = _flag(None, "pin the Hub dataset to a branch, tag or commit", "data")
    test_split: float = _flag(0.1, "held-out test fraction, taken first", "data")
    val_split: float = _flag(0.2, "validation fraction of the rest", "data", aliases=("--train_val_split",))
    max_train_samples: Optional[int] = _flag(None, "cap the training split", "data")
    max_eval_samples: Optional[int] = _flag(None, "caps validation and test alike", "data")
    num_workers: Optional[int] = _flag(None, "DataLoader workers per process (default: 1 on a CPU, else the cores per "
                                             "process, at most 8)", "data")
    backbone: str = _flag(DEFAULTS["backbone"], "any timm model name", "model")
    image_size: int = _flag(DEFAULTS["image_size"], "pictures are resized to this square", "model")
    no_pretrained: bool = _flag(False, "random backbone, no download", "model")
    freeze_backbone: bool = _flag(False, "train the head only", "model")
    epochs: int = _flag(10, "passes over the training split", aliases=("--num_train_epochs",))
    batch_size: int = _flag(20, "per process", aliases=("--per_device_train_batch_size",))
    learning_rate: float = _flag(0.01, "SGD's step size")
    seed: int = _flag(42, "0 to 2**32 - 1")
    no_augmentation: bool = _flag(False, "no rotation/flip/zoom (for overfitting checks)")
    gradient_accumulation_steps: int = _flag(1, "batches per optimizer step")
    mixed_precision: Optional[str] = _flag(None, "default: accelerate config's choice if not 'no', else bf16 where the "
                                                 "CPU (AVX-512 BF16, AMX) or GPU computes it natively, else no",
                                           choices=["no", "fp16", "bf16"])
    cpu: bool = _flag(False, "train on the CPU even if a GPU is there")
    checkpointing_steps: Optional[str] = _flag(None, 'save the state every N optimizer steps, or "epoch"')
    checkpoints_total_limit: Optional[int] = _flag(None, "keep only the newest N checkpoints (505 MB each at 224 px)",
                                                   metavar="N")
    resume_from_checkpoint: Optional[str] = _flag(
        None, 'a checkpoint folder, or "latest": the newest complete one in OUTPUT_DIR/checkpoints. Refused if the '
              "run's identity differs (data, seed, splits, model, batch size x processes x accumulation, learning rate, "
              "augmentation, precision, max samples); --num-workers may differ, and --epochs may grow to extend a run",
        metavar="PATH|latest")
    with_tracking: bool = _flag(False, "log the epochs' metrics to the trackers of --report-to")
    report_to: Optional[str] = _flag(None, f"with --with-tracking (which it implies): {', '.join(TRACKERS)}, several "
                                           "comma-separated, or all (the default: every one installed)")
    output_dir: str = _flag("catdog-model", "where the model is written", "output")
    overwrite_output_dir: bool = _flag(False, "replace a previous run's files (only those)", "output")
    push_to_hub: bool = _flag(False, "upload the finished folder", "output")
    hub_model_id: Optional[str] = _flag(None, "user/repo", "output")
    hub_private: bool = _flag(False, "create the repo private", "output", aliases=("--hub_private_repo",))
    hub_token: Optional[str] = _flag(None, "default: the logged-in token", "output")
    debug: bool = _flag(False, "log the full traceback behind a one-line error", "output")
    # What the machine decided, set once the Accelerator exists (not flags).
    precision_reason: str = field(default="", metadata=dict(flag=False))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "max_train_samples", "max_eval_samples",
                     "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise TrainingError(f"--num-workers must be 0 or more, got {self.num_workers}.")
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's seeding take
            raise TrainingError(f"--seed must be from 0 to 2**32 - 1, got {self.seed}.")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate < 3.4e38):  # a float32 must hold it
            raise TrainingError(f"--learning-rate must be a finite number above 0, got {self.learning_rate}.")
        if not (0 < self.test_split < 1 and 0 < self.val_split < 1):
            raise TrainingError("--test-split and --val-split must be between 0 and 1.")
        for name in ("dataset", "output_dir"):
            if not getattr(self, name).strip():
                raise TrainingError(f"--{name.replace('_', '-')} is empty.")
        for tracker in self.trackers or ():
            if tracker not in ("all", *TRACKERS):
                raise TrainingError(f"--report-to takes {', '.join(TRACKERS)} or all (comma-separated), got {tracker!r}.")
            if tracker != "all" and not _installed(tracker):
                raise TrainingError(f"--report-to {tracker}: {tracker} is not installed (pip install {tracker}).")
        if self.trackers == ["all"] and not any(_installed(tracker) for tracker in TRACKERS):
            raise TrainingError("--with-tracking: no tracker is installed, so nothing would be logged: pip install "
                                "tensorboard (or wandb, trackio, ...), or leave tracking off.")
        steps = self.checkpointing_steps
        if steps not in (None, "epoch") and not (steps.isdecimal() and int(steps) > 0):
            raise TrainingError('--checkpointing-steps takes a number of steps (1 or more) or "epoch".')
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise TrainingError("--resume-from-checkpoint continues a run and --overwrite-output-dir deletes it: pick one.")
        if self.push_to_hub and not (self.hub_model_id and (self.hub_token or get_token())):
            raise TrainingError("--push-to-hub needs --hub-model-id and a token: run `hf auth login` or pass --hub-token.")
        if self.push_to_hub:
            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as error:
                raise TrainingError(f"--hub-model-id {self.hub_model_id!r} is not a valid Hub repo id: "
                                    f"{str(error).splitlines()[0]}") from None

    @property
    def trackers(self) -> Optional[list[str]]:
        """What accelerate's log_with gets: None without tracking."""
        if not (self.with_tracking or self.report_to):
            return None
        return [tracker.strip() for tracker in (self.report_to or "all").split(",")]

    @property
    def checkpoint_every(self) -> Optional[int]:
        return int(self.checkpointing_steps) if (self.checkpointing_steps or "").isdecimal() else None

    @property
    def checkpoint_each_epoch(self) -> bool:
        return self.checkpointing_steps == "epoch"

    def public(self) -> dict:
        """The settings worth recording: all but the token."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "hub_token"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the whole usage
        self.exit(2, f"error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action) -> str:  # a default worth reading: not "None" or "False"
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv=None) -> TrainingSettings:
    """The command line, built from TrainingSettings's fields; their defaults show in --help."""
    # No abbreviations: each flag has two spellings, and a prefix that names a flag today may name two tomorrow.
    parser = _Parser(description=DESCRIPTION, formatter_class=_Help, allow_abbrev=False)
    groups, types = {}, typing.get_type_hints(TrainingSettings)
    for option in dataclasses.fields(TrainingSettings):
        metadata = dict(option.metadata)
        if not metadata.pop("flag", True):
            continue
        group = groups.get(metadata["group"]) or groups.setdefault(metadata["group"], parser.add_argument_group(metadata["group"]))
        # As transformers' HfArgumentParser: --output-dir and --output_dir alike, and the names its scripts use.
        flags = dict.fromkeys(["--" + option.name.replace("_", "-"), "--" + option.name, *metadata.pop("aliases", ())])
        kind = types[option.name]
        kind = next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_origin(kind) else kind
        metadata.pop("group")
        if kind is bool:
            group.add_argument(*flags, action="store_true", **metadata)
        else:
            group.add_argument(*flags, type=kind, default=option.default, **metadata)
    return TrainingSettings(**vars(parser.parse_args(argv)))


def check_hub(config: "TrainingSettings") -> None:
    """Where the run needs the Hub (a dataset id, ImageNet weights), that it answers: one line in seconds, not minutes
    of retries."""
    if missing := no_such_folder("--dataset", config.dataset):
        raise TrainingError(missing + ".")
    unreachable = unreachable_hub_message(None if Path(config.dataset).exists() else "--dataset " + config.dataset,
                                  None if config.no_pretrained else "ImageNet weights (or --no-pretrained)")
    if unreachable:
        raise TrainingError(unreachable)


def settings(argv=None) -> TrainingSettings:
    """The run's settings, checked, or one line and exit 2: a second or so, before the training libraries load."""
    setup_logging()
    try:
        config = parse_args(argv)
        if config.debug:
            os.environ["CATDOG_DEBUG"] = "1"
        check_hub(config)
    except TrainingError as error:
        exit_with_error(error)
    return config
