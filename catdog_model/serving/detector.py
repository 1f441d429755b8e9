"""The "neither a cat nor a dog" detector, scored with numpy: Mahalanobis distances on three of the classifier's
own layers (Lee et al., 2018, https://arxiv.org/abs/1807.03888), each in units of its validation median; the
largest is the score. catdog_model/README.md says how it works; training/calibration.py fits it."""

from __future__ import annotations

import numpy as np

__all__ = ["distance", "ood_score"]


def distance(features, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Each picture's Mahalanobis distance to the nearest class mean."""
    differences = np.asarray(features, dtype=np.float32)[:, None, :] - means[None]  # (N, classes, d)
    # einsum's own loops, not BLAS: OpenBLAS's threads spin on after a call and took the cores from the engine's
    # next pass. Two contractions, not one of three operands: numpy loops over all four indices at once for that,
    # 5.5× slower (3 ms a picture at 224 px).
    squared = np.einsum("nke,nke->nk", np.einsum("nkd,de->nke", differences, precision), differences)
    return np.sqrt(np.clip(squared, 0, None).min(axis=1))


def ood_score(features: dict, detector: dict[str, np.ndarray]) -> np.ndarray:
    """Each picture's score: its largest layer distance, in units of that layer's validation median."""
    layers = sorted({name.rsplit(".", 1)[0] for name in detector})
    scores = [distance(features[layer], detector[f"{layer}.means"], detector[f"{layer}.precision"])
              / detector[f"{layer}.scale"] for layer in layers]
    return np.stack(scores).max(axis=0)
