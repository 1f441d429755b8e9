"""Serving speed: one image per call against batched calls, and explain() (the "neither" score and the
Grad-CAM heatmap) against a plain prediction, through the app's own ``load_predictor``.

    python -m benchmarks.predict_speed                         # random-init spec model (224 px), no network
    python -m benchmarks.predict_speed --model catdog-model    # a trained folder or a Hub id

Both variants run in the same process on the same images, and the ratio is printed with the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import complete_folder, cpu_name
from catdog_model import CatDogClassifier, load_predictor


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    # The median cats_vs_dogs photo is about 447×374: decode cost is part of what serving pays.
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (374, 447, 3), dtype=np.uint8)) for _ in range(count)]


def _throughput(predictor, images, batch_size: int, repeats: int) -> float:
    predictor.batch_size = batch_size
    predictor.predict(images[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(images)  # batch_size 1 is exactly one forward per image, as the app serves
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def _explain_rate(predictor, images, repeats: int) -> float:
    predictor.explain(images[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            predictor.explain(image)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder or Hub id; default: a random-init spec model")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads, as the app sets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            torch.manual_seed(0)
            complete_folder(CatDogClassifier().eval(), Path(folder))
        predictor = load_predictor(args.model or folder)
    images = _images(args.images)

    single = _throughput(predictor, images, 1, args.repeats)
    batched = _throughput(predictor, images, args.batch_size, args.repeats)
    explained = _explain_rate(predictor, images, args.repeats)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    print(f"model:   {args.model or 'random-init spec model'} at {predictor.image_size} px, engine {predictor.engine_name}, "
          f"{args.images} images, best of {args.repeats}")
    print(f"one image per call      : {single:7.1f} images/s")
    print(f"batches of {args.batch_size:<3}          : {batched:7.1f} images/s")
    print(f"ratio batched / single  : {batched / single:7.2f}x")
    print(f"explain(), one per call : {explained:7.1f} images/s (probabilities, 'neither' score, Grad-CAM heatmap)")
    print(f"cost explain / predict  : {single / explained:7.2f}x")


if __name__ == "__main__":
    main()
