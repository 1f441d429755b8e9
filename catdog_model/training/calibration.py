"""What a run fits after its epochs: the temperature (Guo et al., 2017, https://arxiv.org/abs/1706.04599), kept
only where it lowers the validation ECE, and the "neither" detector's statistics (ood.safetensors)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torchmetrics.functional.classification import binary_calibration_error

from ..serving.detector import distance, ood_score

__all__ = ["ECE_BINS", "OOD_PERCENTILE", "calibrate", "calibration_summary", "expected_calibration_error", "fit_detector",
           "fit_temperature", "save_detector"]

ECE_BINS = 15
OOD_PERCENTILE = 95
# Shrinks each covariance towards its mean variance: many ReLU units are almost never active on training
# images, and an unshrunk inverse would let their slightest activation dominate every distance.
SHRINKAGE = 0.1


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """ECE over 15 equal-width bins of the top-label confidence (torchmetrics' definition)."""
    probabilities = torch.sigmoid(logits.float() / temperature)
    return float(binary_calibration_error(probabilities, labels.int(), n_bins=ECE_BINS, norm="l1"))


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """ECE and BCE loss before and after dividing by ``temperature``, for metrics.json and the report alike."""
    logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
    loss = lambda t: float(F.binary_cross_entropy_with_logits(logits / t, labels))  # noqa: E731
    return {"ece_before": expected_calibration_error(logits, labels), "loss_before": loss(1.0),
            "ece_after": expected_calibration_error(logits, labels, temperature), "loss_after": loss(temperature)}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the BCE of sigmoid(logits / T) on these (validation) labels."""
    logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
    if labels.min() == labels.max() or bool(((logits > 0).float() == labels).all()):
        return 1.0  # one class, or every answer right: the loss falls as T -> 0, so there is nothing to fit
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T, so that T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(logits / log_t.exp(), labels)
        value.backward()
        return value

    optimizer.step(loss)
    temperature = float(log_t.detach().exp())
    return temperature if 1e-3 < temperature < 1e3 else 1.0


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The temperature for these validation (logits, labels), kept only where it lowers their ECE (else 1.0), with the
    ECE and loss before and after."""
    fitted = fit_temperature(logits, labels)
    summary = calibration_summary(logits, labels, fitted)
    kept = fitted if summary["ece_after"] < summary["ece_before"] else 1.0
    return {"temperature": kept, "fitted_temperature": fitted, "bins": ECE_BINS,
            "kept_because": "it lowers the validation ECE" if kept != 1.0 else "it would not lower the validation ECE",
            "validation": calibration_summary(logits, labels, kept)}


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


def fit_detector(train: dict, train_labels, validation: dict, num_classes: int = 2) -> tuple[dict[str, np.ndarray], float]:
    """The detector's arrays (for ood.safetensors) and its threshold, the validation split's 95th percentile."""
    labels = _array(train_labels).astype(np.int64)
    present = np.unique(labels).tolist()
    if present != list(range(num_classes)):
        raise ValueError(f"the detector needs training features of every class, got classes {present}")
    validation = {layer: _array(values) for layer, values in validation.items()}
    detector = {}
    for layer, features in train.items():
        statistics = _layer_statistics(_array(features), labels, num_classes)
        median = np.median(distance(validation[layer], statistics["means"], statistics["precision"]))
        detector.update({f"{layer}.means": statistics["means"], f"{layer}.precision": statistics["precision"],
                         f"{layer}.scale": np.array([max(median, 1e-12)], dtype=np.float32)})
    threshold = float(np.quantile(ood_score(validation, detector).astype(np.float64), OOD_PERCENTILE / 100))
    return detector, threshold if math.isfinite(threshold) else float("inf")


def save_detector(detector: dict[str, np.ndarray], path: str | Path) -> None:
    save_file({name: np.ascontiguousarray(_array(values), dtype=np.float32) for name, values in detector.items()}, str(path))
