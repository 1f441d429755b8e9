"""catdog: a cat-vs-dog classifier, trained with Accelerate and shared on the Hugging Face Hub."""

from .config import DEFAULT_LABELS
from .images import ImageError, open_image, preprocess, to_rgb
from .predictor import Explanation, ModelLoadError, PredictionError, Predictor, load_predictor
from .verdict import Verdict, decide

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
    "Verdict",
    "decide",
]


def __getattr__(name: str):
    # The model class needs torch and timm (seconds to import); serving the OpenVINO engine needs neither.
    if name == "CatDogClassifier":
        from .model import CatDogClassifier

        return CatDogClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
