"""A model folder that vouches for itself: the manifest the training script writes into config.json.

    "manifest": {"files": {"model.safetensors": {"size": ..., "sha256": "..."},
                           "openvino_model.bin": {"size": ..., "sha256": "...", "made_from": "<model.safetensors' sha256>"},
                           ...}}

Every file the run wrote is listed with its size and sha256; each file made from the fp32 weights (the
OpenVINO IR, ood.safetensors) also names the sha256 of the weights it was made from. ``load_predictor``
checks each file it reads against it, for a local folder and a Hub download alike, so a folder that mixes
two runs' files, or holds a replaced or damaged one, is refused instead of served. config.json itself is
the root: it holds the manifest, and a config.json copied from another run names that run's files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["MANIFEST_KEY", "WEIGHTS", "ManifestError", "check_file", "file_sha256", "make_manifest"]

MANIFEST_KEY = "manifest"
WEIGHTS = "model.safetensors"  # the fp32 weights every other model file is made from


class ManifestError(ValueError):
    """A file that does not match the manifest; the message names it."""


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def make_manifest(folder: Path, names: Iterable[str], derived: Iterable[str]) -> dict:
    """The manifest of ``names`` in ``folder``; each of ``derived`` is recorded as made from model.safetensors."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}
    for name in derived:
        files[name]["made_from"] = files[WEIGHTS]["sha256"]
    return {"files": files}


def check_file(manifest: Optional[dict], name: str, path: str | Path) -> None:
    """Raise ``ManifestError`` unless ``path`` is the file the manifest lists as ``name`` (size, then sha256),
    and, for a derived file, unless it was made from the weights the manifest lists. No manifest: no check."""
    if manifest is None:
        return
    entry = manifest.get("files", {}).get(name)
    if not isinstance(entry, dict):
        raise ManifestError(f"{name} is not one of the files its training run wrote (not in the manifest of config.json)")
    size = Path(path).stat().st_size
    if size != entry.get("size") or file_sha256(path) != entry.get("sha256"):
        raise ManifestError(f"{name} is not the file its training run wrote (its size or sha256 differs from the "
                            "manifest in config.json): it was replaced, mixed in from another run, or damaged")
    weights = manifest["files"].get(WEIGHTS, {}).get("sha256")
    if "made_from" in entry and entry["made_from"] != weights:
        raise ManifestError(f"{name} was made from other weights than the {WEIGHTS} the manifest lists")
