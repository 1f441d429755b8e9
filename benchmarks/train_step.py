"""Training speed, the project's default against the naive fp32 path, side by side in one run.

    python -m benchmarks.train_step --json benchmarks/results/train_step.json                 # CPU or GPU
    python -m benchmarks.train_step --loss-curve --dataset ../shared/data/cats_vs_dogs_mini  # + bf16 vs fp32 training

- step: one SGD step (forward, BCE, backward, update) of the spec model on a uint8 batch, images/s;
  on a CPU "naive" is fp32 NCHW and "default" what train_accelerate.py picks (hardware.py); on a GPU
  also torch.compile with --compile;
- pipeline (GPU only, or --pipeline): the real loader (make_transform, workers) feeding the step, with the
  GPU's utilisation sampled by nvidia-smi, and the projected time of 10 epochs of cats_vs_dogs' 23,410 images;
- loss curve (--loss-curve): train_accelerate.py on --dataset in fp32 with two seeds and in the default
  precision, so that the bf16-vs-fp32 difference can be read against the seed-to-seed noise.
It prints tables and writes --json, with the machine (CPU model and flags, cores, torch threads, GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from catdog_model import CatDogClassifier
from catdog_model.training.data import collate, load_image_dataset, make_transform
from benchmarks.harness import describe
from catdog_model.training.run_state import default_mixed_precision, default_num_workers

ROOT = Path(__file__).resolve().parents[1]
FULL_DATASET_IMAGES = 23_410
TRAIN_FRACTION = 0.9 * 0.8  # train_accelerate.py's defaults: 10% test first, then 20% of the rest for validation


def make_step(model, optimizer, device: torch.device, bf16: bool, channels_last: bool):
    def step(pixels: torch.Tensor, labels: torch.Tensor) -> None:
        pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixels)
        F.binary_cross_entropy_with_logits(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build(args, device: torch.device, compiled: bool = False):
    torch.manual_seed(0)
    model = CatDogClassifier(image_size=args.image_size).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return (torch.compile(model) if compiled else model), optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(args, device: torch.device, bf16: bool, channels_last: bool, compiled: bool = False) -> float:
    """Images per second of the train step alone, on one fixed batch."""
    model, optimizer = build(args, device, compiled)
    step = make_step(model, optimizer, device, bf16, channels_last)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator).float()
    for _ in range(args.warmup):
        step(pixels, labels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(pixels, labels)
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


class GpuUtilisation(threading.Thread):
    """nvidia-smi's utilisation.gpu, sampled every 0.2 s until stopped; the mean, or None without nvidia-smi."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def stop(self) -> float | None:
        self.running = False
        self.join(timeout=6)
        return sum(self.samples) / len(self.samples) if self.samples else None


def pipeline_rate(args, device: torch.device, bf16: bool) -> dict:
    """The real loader feeding the train step: decode + augmentation in workers, the step on ``device``."""
    data = load_image_dataset(args.dataset)
    rows = data.dataset.with_transform(make_transform(data, args.image_size, train=True))
    workers = args.num_workers if args.num_workers is not None else default_num_workers(device)
    loader = DataLoader(rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True,
                        prefetch_factor=4 if workers else None)
    model, optimizer = build(args, device)
    step = make_step(model, optimizer, device, bf16, channels_last=True)
    batches = iter(loader)
    for _ in range(args.warmup):
        batch = next(batches)
        step(batch["pixels"], batch["labels"])
    _sync(device)
    monitor = GpuUtilisation() if device.type == "cuda" else None
    if monitor:
        monitor.start()
    start, images = time.perf_counter(), 0
    for _ in range(min(args.steps * 4, len(loader) - args.warmup)):
        batch = next(batches)
        step(batch["pixels"], batch["labels"])
        images += len(batch["labels"])
    _sync(device)
    rate = images / (time.perf_counter() - start)
    train_images = FULL_DATASET_IMAGES * TRAIN_FRACTION
    return {"images_per_s": rate, "workers": workers, "gpu_utilisation_pct": monitor.stop() if monitor else None,
            "projected_10_epochs_min": 10 * train_images / rate / 60}


def loss_curves(args) -> dict:
    """train_accelerate.py three times: fp32 (seeds 42 and 43) and the default precision (seed 42)."""
    runs = {"fp32 seed 42": ("no", 42), "fp32 seed 43": ("no", 43), "default seed 42": (None, 42)}
    curves = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (precision, seed) in runs.items():
            out = Path(folder) / name.replace(" ", "-")
            command = [sys.executable, str(ROOT / "train_accelerate.py"), "--dataset", args.dataset, "--no-pretrained",
                       "--cpu", "--epochs", str(args.curve_epochs), "--image-size", str(args.curve_image_size),
                       "--seed", str(seed), "--output-dir", str(out), *(["--mixed-precision", precision] if precision else [])]
            subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
            metrics = json.loads((out / "metrics.json").read_text())
            curves[name] = {"mixed_precision": metrics["mixed_precision"], "history": metrics["history"],
                            "test_accuracy": json.loads((out / "evaluation.json").read_text())["accuracy"]}
    return curves


def _largest_gap(a: dict, b: dict, key: str) -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a["history"], b["history"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=20, help="the spec's batch size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (GPU: worth it; CPU: minutes)")
    parser.add_argument("--pipeline", action="store_true", help="also time the real loader + step (always on a GPU)")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared/data/cats_vs_dogs_mini"))
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--loss-curve", action="store_true", help="also train on --dataset in fp32 (2 seeds) and the default")
    parser.add_argument("--curve-epochs", type=int, default=3)
    parser.add_argument("--curve-image-size", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, reason = default_mixed_precision(device)
    bf16 = precision == "bf16"
    results = {"machine": describe(args.threads), "device": str(device), "default_precision": [precision, reason],
               "batch_size": args.batch_size, "image_size": args.image_size, "step_images_per_s": {}}
    rates = results["step_images_per_s"]
    rates["naive: fp32 NCHW"] = step_rate(args, device, bf16=False, channels_last=False)
    rates[f"default: {'bf16 autocast' if bf16 else 'fp32'} channels-last"] = step_rate(args, device, bf16, channels_last=True)
    if args.compile:
        rates["default + torch.compile"] = step_rate(args, device, bf16, channels_last=True, compiled=True)
    if args.pipeline or device.type == "cuda":
        results["pipeline"] = pipeline_rate(args, device, bf16)
    if args.loss_curve:
        results["loss_curves"] = loss_curves(args)

    machine = results["machine"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
          f"GPU {machine['gpu'] or 'none'}, torch {machine['torch']}; default precision {precision} ({reason})")
    print(f"train step, batch {args.batch_size} at {args.image_size} px on {device}:")
    naive = rates["naive: fp32 NCHW"]
    for name, rate in rates.items():
        print(f"  {name:42} {rate:8.1f} img/s   {rate / naive:5.2f}x")
    if "pipeline" in results:
        p = results["pipeline"]
        gpu = f", GPU busy {p['gpu_utilisation_pct']:.0f}%" if p["gpu_utilisation_pct"] is not None else ""
        print(f"loader + step ({p['workers']} workers): {p['images_per_s']:.1f} img/s{gpu}; "
              f"10 epochs of {FULL_DATASET_IMAGES:,} images: {p['projected_10_epochs_min']:.1f} min")
    if "loss_curves" in results:
        curves = results["loss_curves"]
        print(f"loss curves on {args.dataset} ({args.curve_image_size} px, {args.curve_epochs} epochs):")
        for name, curve in curves.items():
            losses = " ".join(f"{row['train_loss']:.3f}/{row['val_loss']:.3f}" for row in curve["history"])
            print(f"  {name:16} ({curve['mixed_precision']}) train/val loss per epoch: {losses}; test acc {curve['test_accuracy']:.3f}")
        for key in ("train_loss", "val_loss"):
            precision_gap = _largest_gap(curves["default seed 42"], curves["fp32 seed 42"], key)
            seed_gap = _largest_gap(curves["fp32 seed 43"], curves["fp32 seed 42"], key)
            print(f"  largest {key} gap: default vs fp32 {precision_gap:.4f}; fp32 seed 43 vs 42 (noise) {seed_gap:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
