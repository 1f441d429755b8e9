"""catdog: a cat-vs-dog classifier, trained with Accelerate and shared on the Hugging Face Hub."""

from .images import ImageError, open_image, preprocess, to_rgb
from .model import DEFAULT_LABELS, CatDogClassifier
from .predictor import Explanation, ModelLoadError, PredictionError, Predictor, load_predictor

__all__ = [
    "CatDogClassifier",
    "DEFAULT_LABELS",
    "Explanation",
    "ImageError",
    "ModelLoadError",
    "PredictionError",
    "Predictor",
    "load_predictor",
    "open_image",
    "preprocess",
    "to_rgb",
]
