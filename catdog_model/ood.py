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

The detector is numpy: the predictor scores pictures without importing torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

__all__ = ["FEATURE_NAMES", "HIDDEN", "OOD_FILE", "OOD_PERCENTILE", "STAGE_FEATURES", "STAT_STAGES", "feature_sizes",
           "fit_detector", "load_detector", "ood_score", "save_detector"]

OOD_FILE = "ood.safetensors"
OOD_PERCENTILE = 95
# Shrinks each covariance towards its mean variance: many ReLU units are almost never active on training
# images, and an unshrunk inverse would let their slightest activation dominate every distance.
SHRINKAGE = 0.1
# The backbone stages (timm's forward_intermediates indices) whose statistics the detector reads.
STAT_STAGES = (1, 2)
# The detector's layers, by name: the head's hidden layer and those stages' statistics. Every module names them from here.
HIDDEN = "hidden"
STAGE_FEATURES = {index: f"stage{index}" for index in STAT_STAGES}
FEATURE_NAMES = (HIDDEN, *STAGE_FEATURES.values())


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
    return {HIDDEN: hidden_size, **{name: 2 * stage_channels[index] for index, name in STAGE_FEATURES.items()}}


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
