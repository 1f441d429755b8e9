"""Temperature scaling: fitted on validation logits, stored in config.json, applied by the predictor."""

import json

import pytest
import numpy as np
import torch
from huggingface_hub import ModelCard

from PIL import Image

from catdog_model import load_predictor
from catdog_model.images import model_input
from catdog_model.training.calibration import calibrate, expected_calibration_error, fit_temperature


def _overconfident(seed: int, scale: float, count: int = 4000):
    """Labels drawn from sigmoid(z), and logits that claim `scale` times more certainty than that."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(count, generator=generator) * 2
    labels = (torch.rand(count, generator=generator) < torch.sigmoid(z)).float()
    return z * scale, labels


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    logits, labels = _overconfident(0, scale=4.0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.15)
    before, after = expected_calibration_error(logits, labels), expected_calibration_error(logits, labels, temperature)
    assert before > 0.1 and after < 0.03 and after < before / 4
    held_out, held_out_labels = _overconfident(1, scale=4.0)  # it carries over to data it did not see
    assert expected_calibration_error(held_out, held_out_labels, temperature) < expected_calibration_error(held_out, held_out_labels) / 3


def test_an_underconfident_model_gets_a_temperature_below_one_and_labels_never_change():
    logits, labels = _overconfident(2, scale=0.3)
    temperature = fit_temperature(logits, labels)
    assert 0.2 < temperature < 0.45
    assert torch.equal(torch.sigmoid(logits) > 0.5, torch.sigmoid(logits / temperature) > 0.5)


def test_degenerate_validation_data_leaves_the_temperature_at_one():
    assert fit_temperature(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([1.0, 1.0, 1.0])) == 1.0  # one class
    assert fit_temperature(torch.tensor([-2.0, 3.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])) == 1.0  # all right


def test_a_temperature_is_kept_only_where_it_lowers_the_validation_ece():
    logits, labels = _overconfident(0, scale=4.0)
    kept = calibrate(logits, labels)
    assert kept["temperature"] == kept["fitted_temperature"] == pytest.approx(4.0, rel=0.15)
    assert kept["validation"]["ece_after"] < kept["validation"]["ece_before"]
    # Well calibrated already: a fitted T a hair from 1 that does not lower the ECE is not kept.
    logits, labels = _overconfident(3, scale=1.0, count=400)
    summary = calibrate(logits, labels)
    fitted_ece = expected_calibration_error(logits, labels, summary["fitted_temperature"])
    if fitted_ece >= expected_calibration_error(logits, labels):
        assert summary["temperature"] == 1.0 and "would not lower" in summary["kept_because"]
    else:
        assert summary["temperature"] == summary["fitted_temperature"]


def test_the_training_run_stores_the_temperature_and_the_card_reports_the_ece(trained_model):
    config = json.loads((trained_model / "config.json").read_text())
    calibration = json.loads((trained_model / "metrics.json").read_text())["calibration"]
    evaluation = json.loads((trained_model / "evaluation.json").read_text())
    assert config["temperature"] == calibration["temperature"] == evaluation["temperature"] and calibration["bins"] == 15
    card = ModelCard.load(trained_model / "README.md").text
    assert f"T = {calibration['fitted_temperature']:.3f}**" in card or f"T = {calibration['fitted_temperature']:.3f} " in card
    assert f"| test | {evaluation['ece_uncalibrated']:.4f} | {evaluation['ece']:.4f} |" in card
    assert f"| validation | {calibration['validation']['ece_before']:.4f} | {calibration['validation']['ece_after']:.4f} |" in card


def test_the_predictor_applies_the_temperature(trained_model):
    predictor = load_predictor(str(trained_model))
    predictor.temperature = 2.5  # whatever the run kept, the predictor divides by it
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    logit = torch.from_numpy(predictor.outputs(model_input(image, 64)[None]).logits)
    assert predictor.predict([image])[0]["dog"] == pytest.approx(float(torch.sigmoid(logit / 2.5)), abs=1e-6)
