"""Where a model's files come from, and whether they are its own: the one resolver every loader shares.

``parse_source`` reads "folder", "user/repo" or "user/repo@revision"; ``ModelFiles`` hands out each file,
from the folder or through huggingface_hub's cache, checked against the manifest in config.json (manifest.py).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Optional

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, HTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError

from .config import check_config
from .manifest import MANIFEST_KEY, WEIGHTS, ManifestError, check_file

__all__ = ["ModelFiles", "ModelLoadError", "first_line", "parse_source"]

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what is missing and how to fix it."""


def parse_source(source: str) -> tuple[str, Optional[str]]:
    """Split "user/repo@revision" into ("user/repo", "revision"), or check a local folder.

    Raises ``ModelLoadError`` for what can be neither: an empty name, a file, a local-looking path
    that does not exist, a revision on a local folder, or a string that is no Hub repo id.
    """
    source = str(source).strip()
    if not source:
        raise ModelLoadError("No model given: pass a folder written by train_accelerate.py or a Hub id like user/repo.")
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelLoadError(f"{source} is a file; pass the folder that holds config.json and model.safetensors.")
    repo_id, _, revision = source.partition("@")
    if Path(repo_id).expanduser().is_dir():
        raise ModelLoadError(f"{source}: a local folder has no revisions; drop '@{revision}' or pass a Hub id.")
    # Our models always live under a user or organisation, so "name", "./name" or "a/b/c" mean a folder.
    looks_local = repo_id.startswith((".", "/", "~")) or "\\" in repo_id or repo_id.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"No such model folder: {source} (a Hub id has the form user/repo).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"{source!r} is neither a folder nor a valid Hub id (user/repo, optionally @revision).") from None
    if "@" in source and not revision:
        raise ModelLoadError(f"{source!r} ends with '@' but names no revision.")
    return repo_id, revision or None


def first_line(error: Exception) -> str:
    """An exception's first non-empty line (libraries' messages run to many), or its type's name."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


class ModelFiles:
    """The files of one model, from a local folder or the Hub (huggingface_hub caches them), each checked
    against the manifest in config.json before it is used."""

    def __init__(self, source: str, repo_id: str, revision: Optional[str]) -> None:
        self.source, self.repo_id, self.revision = source, repo_id, revision
        self.local = Path(repo_id).is_dir()
        self.where = repo_id if self.local else f"{source!r} on the Hub"
        self.manifest: Optional[dict] = None

    def path(self, name: str, required: bool = True) -> Optional[Path]:
        """The file's local path, checked; None for a missing file that is not ``required``."""
        path = Path(self.repo_id) / name
        if not self.local:
            try:
                path = Path(hf_hub_download(self.repo_id, name, revision=self.revision))
            except (EntryNotFoundError, LocalEntryNotFoundError):  # offline and not cached counts as missing
                path = None
            except HfHubHTTPError as error:
                raise ModelLoadError(f"The Hub refused {self.source!r}: {str(error).splitlines()[0]}") from None
            except HTTPError as error:  # the connection itself failed, mid-download say
                raise ModelLoadError(f"Could not download {name} of {self.source!r}: {first_line(error)}") from None
        if path is None or not path.is_file():
            if not required:
                return None
            if self.local:
                raise ModelLoadError(f"Could not read the model in {self.repo_id}: {name} is missing.")
            raise ModelLoadError(f"Could not download {self.source!r} from the Hugging Face Hub "
                                 f"(offline, no access, or {name} is missing).")
        try:
            check_file(self.manifest, name, path)
        except ManifestError as error:
            raise ModelLoadError(f"{self.where}: {error}.") from None
        return path

    def config(self) -> dict:
        """config.json, checked (config.py), its manifest kept to check every other file against."""
        if self.local and not (Path(self.repo_id) / "config.json").is_file():
            raise ModelLoadError(f"{self.repo_id} has no config.json: it is not a folder written by train_accelerate.py.")
        try:
            config = json.loads(self.path("config.json").read_text())
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"The config.json of {self.where} is not valid JSON ({error}).") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"The config.json of {self.where} is a JSON {type(config).__name__}, not an object.")
        try:
            checked = check_config(config)
        except (ValueError, TypeError) as error:
            self.invalid(error)
        self.manifest = config.get(MANIFEST_KEY) if isinstance(config.get(MANIFEST_KEY), dict) else None
        if self.manifest is None:
            logger.warning("%s has no manifest in its config.json (trained before models carried one): its files "
                           "are not verified", self.where)
        return checked

    def invalid(self, error: Exception) -> None:
        raise ModelLoadError(f"The files of {self.where} do not form a valid model: {first_line(error)}") from None

    @functools.cached_property
    def torch_model(self):
        """The fp32 ``CatDogClassifier`` from model.safetensors, strict and finite (this imports torch and timm);
        read once, whether it is exported or served."""
        import torch

        from .model import CatDogClassifier

        # From the folder this resolver found (a Hub download's snapshot holds config.json beside the weights),
        # so that nothing is looked up twice.
        folder = self.path(WEIGHTS).parent
        try:
            model = CatDogClassifier.from_pretrained(str(folder)).eval()
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, SafetensorError, OSError) as error:
            self.invalid(error)
        broken = next((name for name, tensor in model.state_dict().items()
                       if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
        if broken:
            raise ModelLoadError(f"{self.where}: {WEIGHTS} holds non-finite weights ({broken}); retrain the model.")
        return model
