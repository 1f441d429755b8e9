"""What a model folder holds and what its config.json may say, checked without torch. ``check_config`` is the one judge
of a valid value, for the model and ``load_predictor`` alike."""

from __future__ import annotations

import math

__all__ = ["DEFAULTS", "DEFAULT_LABELS", "FEATURE_NAMES", "HIDDEN", "HUB_METADATA", "INT8_IR_FILES", "IR_FILES", "OUTPUT_NAMES",
           "MANIFEST_KEY", "OOD_FILE", "REPORT_FIGURES", "SPACE_FILES", "STAGE_FEATURES", "STAT_STAGES", "WEIGHTS", "check_config",
           "check_labels"]

DEFAULT_LABELS = ("cat", "dog")  # the order of microsoft/cats_vs_dogs: cat=0, dog=1
# What the Hub shows about every catdog model: the mixin's class arguments and the model card's metadata.
HUB_METADATA = {"library_name": "catdog", "license": "mit", "pipeline_tag": "image-classification",
                "tags": ["image-classification", "timm", "pytorch", "accelerate", "cats-vs-dogs"]}
DEFAULTS = {"backbone": "resnet50", "image_size": 224, "hidden_size": 1024, "dropout": 0.2, "labels": DEFAULT_LABELS,
            "temperature": 1.0, "ood_threshold": None}

# A model folder: the fp32 weights every other file is made from, the OpenVINO IR that serves, the detector.
WEIGHTS = "model.safetensors"
IR_FILES = ("openvino_model.xml", "openvino_model.bin")  # the names the Hub gives OpenVINO files: int8 weights
INT8_IR_FILES = ("openvino_model_int8.xml", "openvino_model_int8.bin")  # int8 activations too, where it passed its check
OOD_FILE = "ood.safetensors"
MANIFEST_KEY = "manifest"  # config.json's list of every file with its size and sha256
# The evaluation's figures (training/evaluate.py draws them), with the captions the page shows, in its order.
REPORT_FIGURES = {"confusion_matrix.png": "Confusion matrix: the test photos, by true and predicted label",
                  "reliability.png": "Reliability: how often it is right at each stated confidence",
                  "mistakes.png": "Its most confident mistakes on the test photos"}
# What a Space downloads of a model (never model.safetensors): README's preload_from_hub bakes them into its image.
SPACE_FILES = ("config.json", *IR_FILES, *INT8_IR_FILES, OOD_FILE, "metrics.json", "evaluation.json", *REPORT_FIGURES)

# The "neither" detector's layers: the head's hidden layer and the per-channel statistics of two early
# backbone stages (timm's forward_intermediates indices). The model computes them, the export names them.
HIDDEN = "hidden"
STAT_STAGES = (1, 2)
STAGE_FEATURES = {index: f"stage{index}" for index in STAT_STAGES}
FEATURE_NAMES = (HIDDEN, *STAGE_FEATURES.values())
OUTPUT_NAMES = ("logits", "heatmaps", *FEATURE_NAMES)  # the serving graph's outputs, named so in the IR


def check_labels(labels) -> tuple[str, str]:
    """Exactly two distinct, non-empty strings; a bare string ("cd") is not a pair of labels."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be a list of two names, got {labels!r}")
    if len(labels) != 2 or not all(isinstance(name, str) and name.strip() for name in labels):
        raise ValueError(f"a binary classifier needs exactly two non-empty label names, got {list(labels)}")
    if labels[0].strip().casefold() == labels[1].strip().casefold():  # "Cat" and "cat " would read as one answer
        raise ValueError(f"the two labels must differ (not only in case or spaces), got {list(labels)}")
    return tuple(labels)


def _whole(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_config(config: dict) -> dict:
    """The model's arguments from a config dict, defaults filled in, each checked (ValueError or TypeError); unknown
    keys left out."""
    checked = {name: config.get(name, default) for name, default in DEFAULTS.items()}
    if not isinstance(checked["backbone"], str) or not checked["backbone"]:
        raise ValueError(f"backbone must be a timm model name, got {checked['backbone']!r}")
    if not _whole(checked["image_size"]):
        raise ValueError(f"image_size must be a positive whole number of pixels, got {checked['image_size']!r}")
    if not _whole(checked["hidden_size"]):
        raise ValueError(f"hidden_size must be a positive whole number, got {checked['hidden_size']!r}")
    if not _number(checked["dropout"]) or not 0 <= checked["dropout"] < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {checked['dropout']!r}")
    checked["labels"] = check_labels(checked["labels"])
    # Fitted on the validation split after training (temperature scaling).
    if not _number(checked["temperature"]) or checked["temperature"] <= 0:
        raise ValueError(f"temperature must be a positive number, got {checked['temperature']!r}")
    checked["temperature"] = float(checked["temperature"])
    # The "neither" cut-off on ood.safetensors' distance, fitted after training; None until then.
    threshold = checked["ood_threshold"]
    if threshold is not None and (not _number(threshold) or threshold < 0):
        raise ValueError(f"ood_threshold must be a non-negative number or null, got {threshold!r}")
    checked["ood_threshold"] = None if threshold is None else float(threshold)
    return checked
