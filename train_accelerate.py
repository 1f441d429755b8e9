"""Fine-tune the catdog classifier (timm ResNet50 + the fixed head) on cats_vs_dogs with 🤗 Accelerate.

Runs unchanged wherever `accelerate config` points: CPU, one GPU, several GPUs, several machines, in bf16
autocast where the hardware computes it natively unless told otherwise. For example:

    python train_accelerate.py --dataset ../shared/data/cats_vs_dogs_mini --epochs 1 --no-pretrained
    accelerate launch train_accelerate.py --mixed-precision bf16 --push-to-hub --hub-model-id you/catdog
    accelerate launch --multi_gpu --num_processes 2 train_accelerate.py --cpu ...   # two CPU processes

The output folder gets the whole model at the end, in one step (training/run_folder.py); until then a previous
model there stays servable. Checkpoints record the run's identity, so a resume continues only that run, bit for bit.
"""

import dataclasses
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

from catdog_model.errors import CatdogError
from catdog_model.cli import exit_with_error
from catdog_model.training import TrainingError
from catdog_model.training.settings import TrainingSettings, settings

if __name__ == "__main__":
    SETTINGS = settings()

try:
    import timm
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator, DataLoaderConfiguration, PartialState
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from huggingface_hub.errors import HTTPError, LocalEntryNotFoundError
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from catdog_model.model import CatDogClassifier
    from catdog_model.training.checkpoints import find_resume_checkpoint, load_checkpoint, save_checkpoint
    from catdog_model.training.data import (check_classes, collate, dataset_fingerprint, load_image_dataset,
                                            make_transform, split_dataset, undecoded)
    from catdog_model.training.run_state import (CHECKPOINTS, Loaders, Progress, RunData, RunningMetrics,
                                                 calibrate_and_test, check_finite, configured_mixed_precision,
                                                 default_mixed_precision, default_num_workers, evaluate, exit_with_parent,
                                                 exit_with_parent_worker, on_main_process, save_model)
    from catdog_model.training.run_folder import (TRACKER_PROJECT, claim_output_dir, publish_run, push_run,
                                                  remove_unused_folder, start_run)
except ImportError as missing:  # the serving install has no torch
    sys.exit(f'error: training needs torch, timm, accelerate and datasets ({missing}): pip install "catdog-classifier[train]"')

logger = get_logger(__name__)


def check_model_flags(config: TrainingSettings) -> None:
    """The backbone and the image size, on PyTorch's meta device: no memory, no download."""
    # The real model is built after the data is loaded (its labels come from the dataset).
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # loading real tensors into meta ones is a no-op, by design here
        try:
            CatDogClassifier(config.backbone, config.image_size, pretrained=False)
        except (ValueError, TypeError) as error:
            raise TrainingError(f"--backbone {config.backbone} --image-size {config.image_size}: {error}") from None
        except (OSError, HTTPError) as error:  # an hf-hub: backbone whose config cannot be fetched
            raise TrainingError(f"--backbone {config.backbone}: could not read its config from the Hub "
                                f"({type(error).__name__}); use a timm model name, e.g. resnet50.") from None


def run_identity(config, accelerator: Accelerator) -> dict:
    """What makes a run's result what it is, keyed by flag: not the flags that only change speed, nor --epochs."""
    local = Path(config.dataset).exists()
    return {
        "--dataset": None if local else config.dataset,  # a local folder is known by its content, wherever it lies
        "dataset content": dataset_fingerprint(config.dataset, config.dataset_revision),
        "--dataset-revision": config.dataset_revision,
        "--seed": config.seed, "--test-split": config.test_split, "--val-split": config.val_split,
        "--max-train-samples": config.max_train_samples, "--max-eval-samples": config.max_eval_samples,
        "--backbone": config.backbone, "--image-size": config.image_size, "--no-pretrained": config.no_pretrained,
        "--freeze-backbone": config.freeze_backbone, "--no-augmentation": config.no_augmentation,
        "--batch-size": config.batch_size, "number of processes": accelerator.num_processes,
        "--gradient-accumulation-steps": config.gradient_accumulation_steps,
        "--learning-rate": config.learning_rate, "--mixed-precision": accelerator.mixed_precision,
    }


# ---- Data, model and the steps of training.

def load_splits(config: TrainingSettings, accelerator: Accelerator, fingerprint: str) -> tuple[RunData, Callable]:
    """Check every image once (cached by datasets), split and cap; the run's data, and the train transform."""
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
    rows = dict(used)  # the rows as selected, before the transforms are set on them: what split.json records
    for name, split in used.items():
        used[name] = undecoded(split, data)  # the transforms decode: JPEGs straight from their bytes
        used[name].set_transform(transforms[name])
    logger.info(
        "dataset %s: %s; %d rows skipped (undecodable)",
        config.dataset, ", ".join(f"{n} {len(s)}" for n, s in used.items()), len(data.skipped_rows),
    )
    return RunData(data, splits, rows, used, fingerprint), transforms["train"]


def build_model(config, labels: tuple[str, ...]) -> CatDogClassifier:
    try:  # timm's own download, into (or, offline, from) the Hugging Face cache
        model = CatDogClassifier(config.backbone, config.image_size, labels=labels, pretrained=not config.no_pretrained)
    except (OSError, LocalEntryNotFoundError, HTTPError, RuntimeError) as error:  # HTTPError: a dropped connection too
        if config.no_pretrained:
            raise
        weights = getattr(timm.models.get_pretrained_cfg(config.backbone), "hf_hub_id", None) or config.backbone
        raise TrainingError(
            f"Could not download the ImageNet weights of {config.backbone} ({type(error).__name__}). Train from scratch "
            f"with --no-pretrained, or fetch them on a machine that reaches the Hub (`hf download {weights}`) and copy "
            "its Hugging Face cache here."
        ) from None
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def train_one_epoch(config, accelerator: Accelerator, model, optimizer, loader, progress: Progress) -> Iterator[list]:
    """The batches of one epoch, or what is left of it after a resume; yields the losses not yet checked at each
    optimizer step that --checkpoint-every asks to save."""
    model.train()
    if progress.batches_in_epoch:  # a resume mid-epoch: the same seeded order, without the batches already done
        loader = accelerator.skip_first_batches(loader, progress.batches_in_epoch)
        loader.set_epoch(progress.epoch)
    unchecked_losses = []  # (batch, step, summed loss) since the last finiteness check: checked without a per-step sync
    # A resumed epoch's bar starts where it stands: the batches done before the resume count.
    bar = tqdm(loader, desc=f"epoch {progress.epoch + 1}/{config.epochs}", initial=progress.batches_in_epoch,
               total=progress.batches_in_epoch + len(loader), disable=not accelerator.is_local_main_process)
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
                yield unchecked_losses
    check_finite(unchecked_losses, model, progress)


def finish_epoch(config, accelerator: Accelerator, model, val_loader, progress: Progress, output_dir: Path) -> None:
    """Validate, add the epoch to the history, keep the model if it is the best so far."""
    epoch = progress.epoch + 1
    val, train = evaluate(model, val_loader, accelerator, "validation"), progress.train_metrics.result()
    row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
           "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    progress.history.append(row)
    logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
    if config.trackers:
        accelerator.log(row, step=epoch)
    if val["accuracy"] > progress.best_val_accuracy:
        progress.best_val_accuracy, progress.best_epoch = val["accuracy"], epoch
        if accelerator.is_main_process:
            progress.best_model_sha256 = save_model(accelerator.unwrap_model(model), output_dir)
    accelerator.wait_for_everyone()
    progress.epoch, progress.batches_in_epoch, progress.train_metrics = epoch, 0, RunningMetrics()


def make_loaders(config, used: dict) -> Loaders:
    """The train, validation and test loaders, and the settings they share (for later loaders of the run)."""
    loader_kwargs = dict(batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers,
                         worker_init_fn=exit_with_parent_worker)
    # Its own generator: creating a loader iterator must not draw from the global RNG (dropout),
    # or a resumed run would not continue the same random stream.
    train_loader = DataLoader(used["train"], shuffle=True, generator=torch.Generator().manual_seed(config.seed), **loader_kwargs)
    return Loaders(train_loader, DataLoader(used["validation"], **loader_kwargs), DataLoader(used["test"], **loader_kwargs),
                   loader_kwargs)


def choose_precision(config: TrainingSettings) -> tuple[str, str]:
    """--mixed-precision, else accelerate config's choice, else bf16 where the device computes it natively; and why."""
    if config.mixed_precision:
        return config.mixed_precision, "--mixed-precision"
    device = PartialState(cpu=config.cpu).device  # the state Accelerator will share: same device, known before it
    return default_mixed_precision(device, configured_mixed_precision())


def start_accelerator(config: TrainingSettings) -> tuple[Accelerator, TrainingSettings]:
    """The Accelerator for these settings, and the settings with what the machine decided (precision, workers)."""
    precision, precision_reason = choose_precision(config)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.trackers,
        # Where trackers log, and how many checkpoints to keep (checkpoints.py says why its naming is its own).
        project_config=ProjectConfiguration(project_dir=config.output_dir, total_limit=config.checkpoints_total_limit),
        # Seeded sampling makes each epoch's order reproducible, so a resumed run skips the right batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    # What the machine decided joins the settings, fixed from here on and logged, as nanoGPT logs its config.
    config = dataclasses.replace(
        config, mixed_precision=accelerator.mixed_precision, precision_reason=precision_reason,
        num_workers=default_num_workers(accelerator.device, accelerator.num_processes)
        if config.num_workers is None else config.num_workers)
    logger.info("world size %d (%s, device %s, mixed precision %s: %s, %d data workers per process)",
                accelerator.num_processes, accelerator.distributed_type, accelerator.device, config.mixed_precision,
                config.precision_reason, config.num_workers)
    logger.info("config: %s", json.dumps(config.public(), default=str))
    return accelerator, config


def training_function(config: TrainingSettings) -> None:
    check_model_flags(config)
    accelerator, config = start_accelerator(config)
    output_dir = Path(config.output_dir)
    identity = run_identity(config, accelerator)
    resume_from = find_resume_checkpoint(config.resume_from_checkpoint, output_dir, identity, config.epochs)
    created = not output_dir.exists()
    lock = on_main_process(accelerator, claim_output_dir, output_dir, config.overwrite_output_dir, bool(resume_from))
    set_seed(config.seed)
    try:
        run, train_transform = load_splits(config, accelerator, identity["dataset content"])
        loaders = make_loaders(config, run.used)
        model = build_model(config, run.data.labels)
    except BaseException:  # refused before it wrote anything: a folder this run made goes again
        if created and accelerator.is_main_process:
            remove_unused_folder(output_dir, lock)
        raise
    # Every check has passed, the data's included: only now may a previous run be cleared and the folder written.
    on_main_process(accelerator, start_run, output_dir, config.overwrite_output_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)

    # One prepare for everything: device placement, DDP wrapping, sharded loaders, mixed precision.
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders[:3])
    loaders = loaders._replace(train=prepared[0], validation=prepared[1], test=prepared[2])
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_from:
        load_checkpoint(accelerator, resume_from, output_dir, progress, batches_per_epoch=len(loaders.train))
    if config.trackers:
        accelerator.init_trackers(TRACKER_PROJECT, config=config.public())

    def checkpoint(losses: list) -> None:
        check_finite(losses, model, progress)
        info = {"identity": identity, "epoch": progress.epoch, "batches_in_epoch": progress.batches_in_epoch,
                "optimizer_steps": progress.optimizer_steps}
        save_checkpoint(accelerator, output_dir / CHECKPOINTS, progress.optimizer_steps, info,
                        accelerator.project_configuration.total_limit)

    for epoch in range(progress.epoch, config.epochs):
        train_transform.set_epoch(epoch)
        loaders.train.set_epoch(epoch)
        for unchecked_losses in train_one_epoch(config, accelerator, model, optimizer, loaders.train, progress):
            checkpoint(unchecked_losses)
        finish_epoch(config, accelerator, model, loaders.validation, progress, output_dir)
        if config.checkpoint_each_epoch:
            checkpoint([])

    fitted = calibrate_and_test(config, accelerator, model, progress, run, loaders)
    if config.trackers:
        accelerator.end_training()

    if accelerator.is_main_process:
        publish_run(config, accelerator, accelerator.unwrap_model(model), progress, fitted, run)
        if config.push_to_hub:
            push_run(config, output_dir)
        lock.release()


def main(config: TrainingSettings) -> None:
    if "LOCAL_RANK" in os.environ:  # started by torchrun (accelerate launch): never outlive the launcher
        exit_with_parent(os.getppid(), signal.SIGTERM)
        handlers = {}
    else:  # Ctrl-C, or the SIGTERM with which a one-process `accelerate launch` stops its script right after one:
        # heard once, as a KeyboardInterrupt, so that the run says how to resume before it goes.
        heard = []

        def interrupted(signum, frame) -> None:
            if not heard:
                heard.append(signum)
                raise KeyboardInterrupt

        handlers = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        training_function(config)
    except CatdogError as error:
        exit_with_error(error)
    except KeyboardInterrupt:
        print(f"interrupted; the checkpoints (if any) are in {config.output_dir}/{CHECKPOINTS}: continue with the same "
              "command and --resume-from-checkpoint latest", file=sys.stderr)
        sys.exit(130)
    finally:
        for sig, handler in handlers.items():  # as they were (a test may run main in its own process)
            signal.signal(sig, handler)


if __name__ == "__main__":
    main(SETTINGS)
