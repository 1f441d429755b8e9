"""The training transform's speed: the project's path against the naive one, side by side, on one core.

    python -m benchmarks.data_pipeline --dataset ../shared/data/cats_vs_dogs_mini

Both produce the same kind of sample from the same rows (decode, resize to --image-size, horizontal flip,
rotation ±20°, zoom 0.8–1.2): the naive path has Pillow decode (as datasets does), converts to float first and
warps with torchvision; the project's (catdog_model.data.make_transform, on rows left undecoded as training
feeds them) decodes JPEG bytes with libjpeg-turbo, resizes in uint8 with torchvision's antialiased kernel,
flips, rotates and zooms the small picture in one Pillow affine, and hands uint8 to the model, which converts
on its device. One thread, so the figure is per core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from catdog_model import preprocess
from catdog_model.hardware import cpu_name, describe
from catdog_model.training.data import ROW_COLUMN, load_image_dataset, make_transform, undecoded


def naive_transform(data, image_size: int):
    """Float from the start, and a float affine warp: the pipeline before this benchmark existed."""
    transform = make_transform(data, image_size, train=True)

    def apply(batch: dict) -> dict:
        pixels = []
        for image, row in zip(batch[data.image_column], batch[ROW_COLUMN]):
            tensor = preprocess(image, image_size)
            generator = torch.Generator().manual_seed(row)
            flip, angle, zoom = torch.rand(3, generator=generator).tolist()
            tensor = TF.horizontal_flip(tensor) if flip < 0.5 else tensor
            pixels.append(TF.affine(tensor, angle=-20 + 40 * angle, translate=[0, 0], scale=0.8 + 0.4 * zoom,
                                    shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST))
        return {"pixels": pixels, "label": batch[transform.label_column]}

    return apply


def _rate(dataset, transform, count: int) -> float:
    dataset = dataset.with_transform(transform)
    dataset[0:8]  # warm-up
    start = time.perf_counter()
    for first in range(0, count, 32):
        dataset[first:first + 32]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="microsoft/cats_vs_dogs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--json", default="benchmarks/results/data_pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_image_dataset(args.dataset)
    rows = data.dataset.select(range(min(args.images, len(data.dataset))))
    decode_only = _rate(rows, lambda batch: {"pixels": [image.size for image in batch[data.image_column]]}, len(rows))
    naive = _rate(rows, naive_transform(data, args.image_size), len(rows))
    ours = _rate(undecoded(rows, data), make_transform(data, args.image_size, train=True), len(rows))
    results = {"machine": describe(1), "dataset": args.dataset,
               "image_size": args.image_size, "images": len(rows),
               "images_per_second_per_core": {"decode only": decode_only, "naive": naive, "catdog": ours}}
    print(f"machine: {cpu_name()}, one core (1 torch thread), {len(rows)} images of {args.dataset} at {args.image_size} px")
    print("| Pillow decode only | naive (float, torchvision affine) | catdog (libjpeg-turbo, uint8 resize + warp) | ratio |")
    print("|---|---|---|---|")
    print(f"| {decode_only:.0f} img/s | {naive:.0f} img/s | {ours:.0f} img/s | {ours / naive:.2f}× |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
