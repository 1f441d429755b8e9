"""catdog: a cat-vs-dog classifier, trained with Accelerate and shared on the Hugging Face Hub.

Serving (``load_predictor``) needs numpy, Pillow and OpenVINO only; ``CatDogClassifier`` and training need
torch: ``pip install "catdog-classifier[train]"``.
"""

from .config import DEFAULT_LABELS
from .errors import CatdogError
from .images import ImageError, open_image, to_rgb
from .serving.files import ModelLoadError
from .serving.predictor import Explanation, Predictor, load_predictor
from .serving.verdict import Verdict, decide

__all__ = ["CatDogClassifier", "CatdogError", "DEFAULT_LABELS", "Explanation", "ImageError", "ModelLoadError",
           "Predictor", "Verdict", "decide", "load_predictor", "open_image", "to_rgb"]


def __getattr__(name: str):
    # The model class needs torch and timm (seconds to import); serving needs neither.
    if name == "CatDogClassifier":
        try:
            from .model import CatDogClassifier
        except ImportError as error:
            raise ImportError(f'CatDogClassifier needs torch and timm ({error}): pip install "catdog-classifier[train]"') from None
        return CatDogClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
