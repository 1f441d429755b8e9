"""Fine-tune the catdog classifier (timm ResNet50 + the fixed head) on cats_vs_dogs with 🤗 Accelerate.

Runs unchanged wherever `accelerate config` points: CPU, one GPU, several GPUs, several machines. Unless
--mixed-precision or accelerate config says otherwise, it trains in bf16 autocast wherever the hardware
computes bf16 natively (AVX-512 BF16 or AMX CPUs, recent GPUs), with float32 weights. For example:

    python train_accelerate.py --dataset ../shared/data/cats_vs_dogs_mini --epochs 1 --no-pretrained
    accelerate launch train_accelerate.py --mixed-precision bf16 --push-to-hub --hub-model-id you/catdog
    accelerate launch --multi_gpu --num_processes 2 train_accelerate.py --cpu ...   # two CPU processes

The output folder receives config.json + model.safetensors (best validation epoch), the serving engine
exported from them (openvino_model.xml/.bin), ood.safetensors (the "neither" detector), metrics.json,
split.json (row indices of train/validation/test), the evaluation report and README.md (the model card);
config.json, written last, lists every file's size and sha256. One run owns the
folder at a time (a lock), and its checkpoints record the run's identity, so that a resume can only
continue the run that wrote them, bit for bit.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import get_token
from huggingface_hub.errors import HTTPError, LocalEntryNotFoundError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from catdog_model import CatDogClassifier
from catdog_model.data import (DatasetError, check_classes, collate, dataset_fingerprint, load_image_dataset,
                               make_transform, save_split, split_dataset, undecoded)
from catdog_model.hardware import default_mixed_precision, default_num_workers, setup_logging
from catdog_model.run_files import (SPLIT_FILE, TRACKER_PROJECT, backbone_init, claim_output_dir, push_run, start_run,
                                    write_evaluation, write_metrics_and_card)
from catdog_model.checkpoints import CHECKPOINTS, find_resume_checkpoint, load_checkpoint, save_checkpoint
from catdog_model.training import (Progress, RunningMetrics, TrainingError, calibrate_and_test, check_finite, evaluate,
                                   exit_with_parent, exit_with_parent_worker, on_main_process, save_model)

logger = get_logger(__name__)


# ---- Fail fast: every flag is checked within seconds, before the dataset is touched.

def check_args(args) -> None:
    """Plain flag values; raises TrainingError naming the first that cannot work."""
    for flag in ("epochs", "batch_size", "gradient_accumulation_steps", "max_train_samples", "max_eval_samples",
                 "checkpoints_total_limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise TrainingError(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    if args.num_workers is not None and args.num_workers < 0:
        raise TrainingError(f"--num-workers must be 0 or more, got {args.num_workers}.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise TrainingError(f"--learning-rate must be a finite number above 0, got {args.learning_rate}.")
    if not (0 < args.test_split < 1 and 0 < args.val_split < 1):
        raise TrainingError("--test-split and --val-split must be between 0 and 1.")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise TrainingError("--resume-from-checkpoint continues a run and --overwrite-output-dir deletes it: pick one.")
    if args.push_to_hub and not (args.hub_model_id and (args.hub_token or get_token())):
        raise TrainingError("--push-to-hub needs --hub-model-id and a token: run `hf auth login` or pass --hub-token.")
    # The real model is built after the data is loaded (its labels come from the dataset); a model on
    # the meta device costs no memory and checks the backbone name, the image size and the weights file now.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # loading real tensors into meta ones is a no-op, by design here
        try:
            model = CatDogClassifier(args.backbone, args.image_size, pretrained=False)
        except (ValueError, TypeError) as error:
            raise TrainingError(f"--backbone {args.backbone} --image-size {args.image_size}: {error}") from None
        except (OSError, HTTPError) as error:  # an hf-hub: backbone whose config cannot be fetched
            raise TrainingError(f"--backbone {args.backbone}: could not read its config from the Hub "
                                f"({type(error).__name__}); use a timm model name, e.g. resnet50.") from None
        try:
            if args.pretrained_weights:
                model.load_backbone_weights(args.pretrained_weights)
        except (ValueError, OSError) as error:
            raise TrainingError(f"--pretrained-weights: {str(error).splitlines()[0]}") from None


def run_identity(config, accelerator: Accelerator) -> dict:
    """Everything that makes a run's result what it is, keyed by the flag that sets it.

    Flags that only change speed (--num-workers, --with-tracking, --checkpointing-steps) are not here,
    nor --epochs: a run may be extended."""
    local = Path(config.dataset).exists()
    return {
        "--dataset": None if local else config.dataset,  # a local folder is known by its content, wherever it lies
        "dataset content": dataset_fingerprint(config.dataset, config.dataset_revision),
        "--dataset-revision": config.dataset_revision,
        "--seed": config.seed, "--test-split": config.test_split, "--val-split": config.val_split,
        "--max-train-samples": config.max_train_samples, "--max-eval-samples": config.max_eval_samples,
        "--backbone": config.backbone, "--image-size": config.image_size, "backbone initialisation": backbone_init(config),
        "--freeze-backbone": config.freeze_backbone, "--no-augmentation": config.no_augmentation,
        "--batch-size": config.batch_size, "number of processes": accelerator.num_processes,
        "--gradient-accumulation-steps": config.gradient_accumulation_steps,
        "--learning-rate": config.learning_rate, "--mixed-precision": accelerator.mixed_precision,
    }


# ---- Data, model and the steps of training.

def load_splits(config, accelerator: Accelerator, output_dir: Path):
    """Check every image once (cached by datasets), split and cap; returns, with them, the function that
    records the rows in split.json (called once the run may write)."""
    with accelerator.main_process_first():
        data = load_image_dataset(config.dataset, config.dataset_revision)
    splits = split_dataset(data, config.test_split, config.val_split, config.seed)
    used = dict(splits)
    for name, limit in (("train", config.max_train_samples), ("validation", config.max_eval_samples), ("test", config.max_eval_samples)):
        if limit is not None:
            used[name] = splits[name].select(range(min(limit, len(splits[name]))))
    check_classes(data, used, hint=" (raise --max-train-samples / --max-eval-samples)")
    transforms = {name: make_transform(data, config.image_size, train=name == "train" and not config.no_augmentation, seed=config.seed)
                  for name in used}
    # The rows as selected, before the transforms are set on them: what split.json records.
    write_split = functools.partial(save_split, output_dir / SPLIT_FILE, splits, dict(used), data, dataset=config.dataset,
                                    revision=config.dataset_revision, seed=config.seed)
    for name, split in used.items():
        used[name] = undecoded(split, data)  # the transforms decode: JPEGs straight from their bytes
        used[name].set_transform(transforms[name])
    logger.info(
        "dataset %s: %s; %d rows skipped (undecodable)",
        config.dataset, ", ".join(f"{n} {len(s)}" for n, s in used.items()), len(data.skipped_rows),
    )
    return data, splits, used, transforms["train"], write_split


def build_model(config, labels: tuple[str, ...]) -> CatDogClassifier:
    use_hub_weights = not config.no_pretrained and config.pretrained_weights is None
    try:
        model = CatDogClassifier(config.backbone, config.image_size, labels=labels, pretrained=use_hub_weights)
    except (OSError, LocalEntryNotFoundError, HTTPError, RuntimeError) as error:  # HTTPError: a dropped connection too
        if not use_hub_weights:
            raise
        raise TrainingError(
            f"Could not download the ImageNet weights of {config.backbone} ({type(error).__name__}). "
            "Train from scratch with --no-pretrained, or pass a local timm checkpoint with --pretrained-weights PATH."
        ) from None
    if config.pretrained_weights:
        model.load_backbone_weights(config.pretrained_weights)  # checked on the meta device at start-up
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def train_one_epoch(config, accelerator: Accelerator, model, optimizer, loader, progress: Progress, checkpoint: Callable) -> None:
    """The batches of one epoch, or what is left of it after a resume."""
    unchecked_losses = []  # (batch, step, summed loss) since the last finiteness check: checked without a per-step sync
    bar = tqdm(loader, desc=f"epoch {progress.epoch + 1}/{config.epochs}", disable=not accelerator.is_local_main_process)
    for batch in bar:
        with accelerator.accumulate(model):
            # Channels-last input lets the convolutions skip a layout conversion: 2.3x per step with bf16 on CPU.
            logits = model(batch["pixels"].contiguous(memory_format=torch.channels_last))
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        progress.batches_in_epoch += 1
        batch_loss = progress.train_metrics.update(*accelerator.gather_for_metrics((logits.detach(), batch["labels"])))
        unchecked_losses.append((progress.batches_in_epoch, progress.optimizer_steps + 1, batch_loss))
        if progress.batches_in_epoch % 10 == 0:  # reading the sums back syncs the GPU: not every step
            check_finite(unchecked_losses, model, progress)
            running = progress.train_metrics.result()
            bar.set_postfix(loss=f"{running['loss']:.4f}", acc=f"{running['accuracy']:.3f}")
        if accelerator.sync_gradients:
            progress.optimizer_steps += 1
            if config.checkpoint_every and progress.optimizer_steps % config.checkpoint_every == 0:
                checkpoint(unchecked_losses)
    check_finite(unchecked_losses, model, progress)


def finish_epoch(config, accelerator: Accelerator, model, val_loader, progress: Progress, output_dir: Path) -> None:
    """Validate, add the epoch to the history, keep the model if it is the best so far."""
    epoch = progress.epoch + 1
    val, train = evaluate(model, val_loader, accelerator, "validation"), progress.train_metrics.result()
    row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
           "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    progress.history.append(row)
    logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
    if config.with_tracking:
        accelerator.log(row, step=epoch)
    if val["accuracy"] > progress.best_val_accuracy:
        progress.best_val_accuracy, progress.best_epoch = val["accuracy"], epoch
        if accelerator.is_main_process:
            progress.best_model_sha256 = save_model(accelerator.unwrap_model(model), output_dir)
    accelerator.wait_for_everyone()
    progress.epoch, progress.batches_in_epoch, progress.train_metrics = epoch, 0, RunningMetrics()


def frozen_config(args: argparse.Namespace, accelerator: Accelerator, precision_reason: str):
    """Every setting of the run, checked, with what the machine decided (workers, precision, checkpoint
    interval), fixed from here on and logged, as nanoGPT logs its config; metrics.json records it too."""
    values = {**vars(args), "mixed_precision": accelerator.mixed_precision, "precision_reason": precision_reason,
              "num_workers": default_num_workers(accelerator.device, accelerator.num_processes)
              if args.num_workers is None else args.num_workers,
              "checkpoint_every": int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdecimal() else None,
              "checkpoint_each_epoch": args.checkpointing_steps == "epoch"}
    config = dataclasses.make_dataclass("RunConfig", list(values), frozen=True)(**values)
    logger.info("world size %d (%s, device %s, mixed precision %s: %s, %d data workers per process)",
                accelerator.num_processes, accelerator.distributed_type, accelerator.device, config.mixed_precision,
                config.precision_reason, config.num_workers)
    logger.info("config: %s", json.dumps(public_settings(config), default=str))
    return config


def public_settings(config) -> dict:
    """The settings worth recording: all but the token."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key != "hub_token"}


def make_loaders(config, used: dict) -> tuple[tuple[DataLoader, DataLoader, DataLoader], dict]:
    """The train, validation and test loaders, and the settings they share (for later loaders of the run)."""
    loader_kwargs = dict(batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers,
                         worker_init_fn=exit_with_parent_worker)
    # Its own generator: creating a loader iterator must not draw from the global RNG (dropout),
    # or a resumed run would not continue the same random stream.
    train_loader = DataLoader(used["train"], shuffle=True, generator=torch.Generator().manual_seed(config.seed), **loader_kwargs)
    return (train_loader, DataLoader(used["validation"], **loader_kwargs), DataLoader(used["test"], **loader_kwargs)), loader_kwargs


def choose_precision(args) -> tuple[str, str]:
    """--mixed-precision, else accelerate config's choice, else bf16 where the device computes it natively; and why."""
    if args.mixed_precision:
        return args.mixed_precision, "--mixed-precision"
    device = PartialState(cpu=args.cpu).device  # the state Accelerator will share: same device, known before it
    return default_mixed_precision(device, os.environ.get("ACCELERATE_MIXED_PRECISION"))


def training_function(args: argparse.Namespace) -> None:
    check_args(args)
    precision, precision_reason = choose_precision(args)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="all" if args.with_tracking else None,
        # Where trackers log, and how many checkpoints to keep (checkpoints.py says why its naming is its own).
        project_config=ProjectConfiguration(project_dir=args.output_dir, total_limit=args.checkpoints_total_limit),
        # Seeded sampling makes each epoch's order reproducible, so a resumed run skips the right batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    config = frozen_config(args, accelerator, precision_reason)
    output_dir = Path(config.output_dir)
    identity = run_identity(config, accelerator)
    resume_from = find_resume_checkpoint(config.resume_from_checkpoint, output_dir, identity, config.epochs)
    lock = on_main_process(accelerator, claim_output_dir, output_dir, config.overwrite_output_dir, bool(resume_from))
    set_seed(config.seed)

    data, splits, used, train_transform, write_split = load_splits(config, accelerator, output_dir)
    (train_loader, val_loader, test_loader), loader_kwargs = make_loaders(config, used)

    model = build_model(config, data.labels)
    # Every check has passed, the data's included: only now may a previous run be cleared and the folder written.
    on_main_process(accelerator, start_run, output_dir, config.overwrite_output_dir)
    if accelerator.is_main_process:
        write_split()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)

    # One prepare for everything: device placement, DDP wrapping, sharded loaders, mixed precision.
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader
    )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_from:
        load_checkpoint(accelerator, resume_from, output_dir, progress, batches_per_epoch=len(train_loader))
    if config.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT, config=public_settings(config))

    def checkpoint(losses: list) -> None:
        check_finite(losses, model, progress)
        info = {"identity": identity, "epoch": progress.epoch, "batches_in_epoch": progress.batches_in_epoch,
                "optimizer_steps": progress.optimizer_steps}
        save_checkpoint(accelerator, output_dir / CHECKPOINTS, progress.optimizer_steps, info,
                        accelerator.project_configuration.total_limit)

    for epoch in range(progress.epoch, config.epochs):
        model.train()
        train_transform.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if progress.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, progress.batches_in_epoch)
            loader.set_epoch(epoch)
        train_one_epoch(config, accelerator, model, optimizer, loader, progress, checkpoint)
        finish_epoch(config, accelerator, model, val_loader, progress, output_dir)
        if config.checkpoint_each_epoch:
            checkpoint([])

    test, calibration, test_outputs, detector = calibrate_and_test(
        config, accelerator, model, progress, data, used["train"], val_loader, test_loader, loader_kwargs)
    logger.info("test (epoch %d weights): loss %.4f, accuracy %.4f on %d images", progress.best_epoch, test["loss"], test["accuracy"], test["samples"])
    if config.with_tracking:
        accelerator.log({"test_loss": test["loss"], "test_accuracy": test["accuracy"]})
        accelerator.end_training()

    if accelerator.is_main_process:
        evaluation = write_evaluation(config, accelerator.unwrap_model(model), output_dir, progress, test_outputs, detector, data)
        write_metrics_and_card(config, accelerator, output_dir, progress, test, calibration, evaluation, data, splits, used,
                      identity["dataset content"])
        if config.push_to_hub:
            push_run(config, output_dir)
        lock.release()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="microsoft/cats_vs_dogs", help="Hub dataset id or local folder")
    data.add_argument("--dataset-revision", default=None, help="pin the Hub dataset to a branch, tag or commit")
    data.add_argument("--test-split", type=float, default=0.1, help="held-out test fraction, taken first")
    data.add_argument("--val-split", type=float, default=0.2, help="validation fraction of the rest")
    data.add_argument("--max-train-samples", type=int, default=None)
    data.add_argument("--max-eval-samples", type=int, default=None, help="caps validation and test alike")
    data.add_argument("--num-workers", type=int, default=None,
                      help="DataLoader workers per process (default: 1 on a CPU, else the cores per process, at most 8)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet50", help="any timm model name")
    model.add_argument("--image-size", type=int, default=224)
    model.add_argument("--no-pretrained", action="store_true", help="random backbone, no download")
    model.add_argument("--pretrained-weights", default=None, metavar="PATH", help="local timm checkpoint for the backbone")
    model.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=20, help="per process")
    train.add_argument("--learning-rate", type=float, default=0.01)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--no-augmentation", action="store_true", help="no rotation/flip/zoom (for overfitting checks)")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                       help="default: accelerate config's choice if not 'no', else bf16 where the CPU (AVX-512 BF16, AMX) "
                            "or GPU computes it natively, else no; the choice and its reason go into metrics.json")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    train.add_argument("--checkpointing-steps", default=None, help='save the state every N optimizer steps, or "epoch"')
    train.add_argument("--checkpoints-total-limit", type=int, default=None, metavar="N",
                       help="keep only the newest N checkpoints (each is about 1.5 GB at 224 px)")
    train.add_argument(
        "--resume-from-checkpoint", default=None, metavar="PATH|latest",
        help='a checkpoint folder, or "latest": the newest complete one in OUTPUT_DIR/checkpoints. Refused if the '
             "run's identity differs (data, seed, splits, model, batch size x processes x accumulation, learning rate, "
             "augmentation, precision, max samples); --num-workers may differ, and --epochs may grow to extend a run",
    )
    train.add_argument("--with-tracking", action="store_true", help="log to every tracker installed")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="catdog-model")
    out.add_argument("--overwrite-output-dir", action="store_true")
    out.add_argument("--push-to-hub", action="store_true")
    out.add_argument("--hub-model-id", default=None, help="user/repo")
    out.add_argument("--hub-private", action="store_true")
    out.add_argument("--hub-token", default=None, help="default: the logged-in token")
    args = parser.parse_args(argv)
    if args.checkpointing_steps not in (None, "epoch") and not (args.checkpointing_steps.isdecimal() and int(args.checkpointing_steps) > 0):
        parser.error('--checkpointing-steps takes a number of steps (1 or more) or "epoch"')
    return args


def main(argv=None) -> None:
    setup_logging()
    if "LOCAL_RANK" in os.environ:  # started by torchrun (accelerate launch): never outlive the launcher
        exit_with_parent(os.getppid(), signal.SIGTERM)
    args = parse_args(argv)
    try:
        training_function(args)
    except (TrainingError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted; checkpoints (if any) are in {args.output_dir}/checkpoints", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
