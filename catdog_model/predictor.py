"""The one serving path: load a trained model from a folder or the Hub, then predict in batches.

    predictor = load_predictor("user/catdog")            # or "user/catdog@v1", or a local folder
    predictor.predict([Image.open("cat.jpg")])           # [{"cat": 0.97, "dog": 0.03}]

The Gradio app and the benchmarks use exactly this object.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from PIL import Image
from safetensors import SafetensorError

from .images import preprocess
from .model import CatDogClassifier

__all__ = ["ModelLoadError", "Predictor", "load_predictor", "parse_source"]

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what is missing and how to fix it."""


def parse_source(source: str) -> tuple[str, Optional[str]]:
    """Split "user/repo@revision" into ("user/repo", "revision"); folders are returned as they are."""
    if Path(source).exists() or "@" not in source:
        return source, None
    repo_id, revision = source.rsplit("@", 1)
    return repo_id, revision or None


@dataclass
class Predictor:
    model: CatDogClassifier
    source: str
    revision: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    batch_size: int = 16

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """One ``{label: probability}`` per image, in order, batched."""
        results = []
        negative, positive = self.labels
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([preprocess(image, self.image_size) for image in images[start : start + self.batch_size]])
            for p in torch.sigmoid(self.model(batch).float()).tolist():
                results.append({negative: 1.0 - p, positive: p})
        return results


def _read_metrics(repo_id: str, revision: Optional[str]) -> dict:
    """metrics.json next to the weights, if the training script wrote one; {} otherwise."""
    try:
        path = Path(repo_id) / "metrics.json" if Path(repo_id).is_dir() else hf_hub_download(repo_id, "metrics.json", revision=revision)
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError):
        return {}


def load_predictor(source: str, batch_size: int = 16) -> Predictor:
    """Load a model from a local folder, "user/repo" or "user/repo@revision", in eval mode.

    Raises ``ModelLoadError`` with a one-line explanation when it cannot.
    """
    repo_id, revision = parse_source(str(source))
    if Path(repo_id).is_dir() and not (Path(repo_id) / "config.json").is_file():
        raise ModelLoadError(f"{repo_id} has no config.json: it is not a folder written by train_accelerate.py.")
    try:
        model = CatDogClassifier.from_pretrained(repo_id, revision=revision)
    except (LocalEntryNotFoundError, OSError) as error:
        if Path(repo_id).is_dir():
            raise ModelLoadError(f"Could not read the model in {repo_id}: {error}") from None
        raise ModelLoadError(
            f"Could not download {source!r} from the Hugging Face Hub (offline, or no access to the repo)."
        ) from None
    except HfHubHTTPError as error:
        raise ModelLoadError(f"The Hub refused {source!r}: {str(error).splitlines()[0]}") from None
    except (RuntimeError, ValueError, TypeError, SafetensorError) as error:
        # Weights that do not fit the config (strict loading), or a config this code cannot build.
        raise ModelLoadError(f"The files of {source!r} do not form a valid model: {str(error).splitlines()[0]}") from None
    model.eval()
    return Predictor(model, source=repo_id, revision=revision, metrics=_read_metrics(repo_id, revision), batch_size=batch_size)
