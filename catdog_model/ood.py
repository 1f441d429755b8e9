"""The "neither a cat nor a dog" detector: it reads the classifier itself, no second model.

The detector follows Lee et al. ("A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks", 2018, https://arxiv.org/abs/1807.03888): for each of a few layers it keeps
the training split's class means and a shared covariance, and a picture's distance is its Mahalanobis
distance to the nearest class mean. The layers are the head's 1024-d hidden layer (what the classifier
decides on) and the per-channel mean and spread of two early backbone stages (textures and colours,
which set noise, flat colour or a page of text apart even when the later layers cannot). Each layer's
distance is divided by its median on the validation split, and the score is the largest of them.
Above the threshold, the validation split's 95th percentile, a picture is "neither": so about 5% of
real cats and dogs are flagged. The statistics live in ``ood.safetensors`` next to the weights; the
threshold is ``ood_threshold`` in config.json.

The detector is numpy: the predictor scores pictures without importing torch. Grad-CAM is computed by
the serving engine (engine.py); this module also draws its heatmap.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from safetensors.numpy import load_file, save_file

__all__ = ["FEATURE_NAMES", "OOD_FILE", "OOD_PERCENTILE", "STAT_STAGES", "feature_sizes", "fit_detector", "load_detector",
           "ood_score", "overlay_heatmap", "resize_heatmap", "save_detector", "synthetic_ood_images"]

OOD_FILE = "ood.safetensors"
OOD_PERCENTILE = 95
# Shrinks each covariance towards its mean variance: many ReLU units are almost never active on training
# images, and an unshrunk inverse would let their slightest activation dominate every distance.
SHRINKAGE = 0.1
# The backbone stages (timm's forward_intermediates indices) whose statistics the detector reads.
STAT_STAGES = (1, 2)
# The detector's layers, by name: the head's hidden layer and those stages' statistics.
FEATURE_NAMES = ("hidden", *(f"stage{index}" for index in STAT_STAGES))


def _array(values) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor on any device (training's features)."""
    return values.detach().float().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


def _layer_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    features = features.astype(np.float64)
    means = np.stack([features[labels == k].mean(0) for k in range(num_classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    scale = np.trace(covariance) / covariance.shape[0]
    if not scale > 0:
        scale = 1.0  # constant features: any distance is then "unlike"
    shrunk = (1 - SHRINKAGE) * covariance + SHRINKAGE * scale * np.eye(covariance.shape[0])
    return {"means": means.astype(np.float32), "precision": np.linalg.inv(shrunk).astype(np.float32)}


def _distance(features, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    differences = _array(features).astype(np.float32)[:, None, :] - means[None]  # (N, classes, d)
    # einsum's own loop, not BLAS: OpenBLAS's threads spin on after a call and took the cores from the
    # engine's next pass (explain cost 2× predict; 2 ms a picture this way).
    squared = np.einsum("nkd,de,nke->nk", differences, precision, differences)
    return np.sqrt(np.clip(squared, 0, None).min(axis=1))


def fit_detector(train: dict, train_labels, validation: dict, num_classes: int = 2) -> tuple[dict[str, np.ndarray], float]:
    """The detector's arrays (for ood.safetensors) and its threshold, from training and validation features
    (numpy arrays or torch tensors)."""
    labels = _array(train_labels).astype(np.int64)
    present = np.unique(labels).tolist()
    if present != list(range(num_classes)):
        raise ValueError(f"the detector needs training features of every class, got classes {present}")
    detector = {}
    for layer, features in train.items():
        statistics = _layer_statistics(_array(features), labels, num_classes)
        median = np.median(_distance(validation[layer], statistics["means"], statistics["precision"]))
        detector.update({f"{layer}.means": statistics["means"], f"{layer}.precision": statistics["precision"],
                         f"{layer}.scale": np.array([max(median, 1e-12)], dtype=np.float32)})
    threshold = float(np.quantile(ood_score(validation, detector).astype(np.float64), OOD_PERCENTILE / 100))
    return detector, threshold if math.isfinite(threshold) else float("inf")


def ood_score(features: dict, detector: dict[str, np.ndarray]) -> np.ndarray:
    """Each picture's score: its largest layer distance, in units of that layer's validation median."""
    layers = sorted({name.rsplit(".", 1)[0] for name in detector})
    scores = [_distance(features[layer], detector[f"{layer}.means"], detector[f"{layer}.precision"])
              / detector[f"{layer}.scale"] for layer in layers]
    return np.stack(scores).max(axis=0)


def save_detector(detector: dict[str, np.ndarray], path: str | Path) -> None:
    save_file({name: np.ascontiguousarray(_array(values), dtype=np.float32) for name, values in detector.items()}, str(path))


def feature_sizes(hidden_size: int, stage_channels: dict[int, int]) -> dict[str, int]:
    """Each detector layer's width: the hidden layer's units, and each stage's channels twice (mean and spread)."""
    return {"hidden": hidden_size, **{f"stage{index}": 2 * stage_channels[index] for index in STAT_STAGES}}


def load_detector(path: str | Path, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """The arrays of ``ood.safetensors``, checked against the width of each layer the engine gives."""
    detector = load_file(str(path))
    for layer, size in sizes.items():
        expected = {f"{layer}.means": (2, size), f"{layer}.precision": (size, size), f"{layer}.scale": (1,)}
        for name, shape in expected.items():
            if name not in detector or tuple(detector[name].shape) != shape:
                found = list(detector[name].shape) if name in detector else "nothing"
                raise ValueError(f"{OOD_FILE} does not fit this model: {name} should be {list(shape)}, found {found}")
    broken = sorted(name for name, values in detector.items() if not np.isfinite(values).all())
    if broken:  # NaN statistics would call every picture "neither"
        raise ValueError(f"{OOD_FILE} holds non-finite values in {broken[0]}")
    return {name: values.astype(np.float32) for name, values in detector.items()}


def resize_heatmap(heatmap: np.ndarray, width: int, height: int, longest: int) -> np.ndarray:
    """A (h, w) map stretched back to the picture's aspect ratio, its longest side ``longest`` pixels (bilinear)."""
    scale = longest / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(size, Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.45, longest: int = 384) -> Image.Image:
    """The picture, scaled so that its longest side is ``longest``, with the heatmap in "jet" colours over it."""
    from matplotlib import colormaps  # only the app and the report draw

    scale = longest / max(image.size)
    picture = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(colours).resize(picture.size, Image.BILINEAR)
    return Image.blend(picture.convert("RGB"), heat, opacity)


def synthetic_ood_images(count: int = 60, size: int = 256, seed: int = 0) -> list[Image.Image]:
    """Pictures that are plainly neither cat nor dog: noise, flat colours, gradients, stripes and text."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == 1:
            pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
        elif kind == 2:
            ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 60, 3)
            pixels = np.broadcast_to(ramp, (size, size, 3)).clip(0, 255).astype(np.uint8)
        elif kind == 3:
            period = int(rng.integers(6, 40))
            stripes = ((np.arange(size) // period) % 2).astype(np.uint8)[None, :, None] * 255
            pixels = np.broadcast_to(stripes, (size, size, 3)).copy()
        else:
            page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(page)
            for line in range(0, size, 14):
                words = " ".join("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(6))
                draw.text((6, line), words, fill=(0, 0, 0))
            images.append(page)
            continue
        images.append(Image.fromarray(pixels))
    return images
