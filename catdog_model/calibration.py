"""Probabilities you can trust: temperature scaling fitted on the validation split, and its ECE.

One scalar T divides the logit before the sigmoid (Guo et al., "On Calibration of Modern Neural
Networks", 2017, https://arxiv.org/abs/1706.04599). It never changes which label wins, only how sure
the model says it is. T lives in config.json, so training, serving and the model card all use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_calibration_error

__all__ = ["ECE_BINS", "calibration_summary", "expected_calibration_error", "fit_temperature"]

ECE_BINS = 15


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """ECE over 15 equal-width bins of the top-label confidence (torchmetrics' definition)."""
    probabilities = torch.sigmoid(logits.float() / temperature)
    return float(binary_calibration_error(probabilities, labels.int(), n_bins=ECE_BINS, norm="l1"))


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """ECE and BCE loss before and after dividing by ``temperature``: what the training run records for each
    split and the evaluation report shows, from this one place."""
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
