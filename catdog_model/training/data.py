"""Dataset loading for training and evaluation: columns, broken rows, the split, the transforms, for
``microsoft/cats_vs_dogs`` and any local folder ``datasets.load_dataset`` reads."""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset
from PIL import Image
from torchvision.transforms import v2

from ..hardware import usable_cores
from ..images import ImageError, model_input, open_image
from . import TrainingError

__all__ = [
    "LoadedDataset", "load_image_dataset", "dataset_fingerprint", "split_dataset", "check_classes",
    "make_transform", "undecoded", "collate", "read_split_file", "load_split", "save_split", "SPLIT_FILE",
]

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"  # a finished run's rows of each split, in its manifest like every file
ROW_COLUMN = "__row__"  # the row's index in the original split, kept through filtering and splitting
_CHECK_THREADS = min(8, usable_cores())

@dataclass
class LoadedDataset:
    dataset: Dataset  # decodable rows only, with ROW_COLUMN added
    image_column: str
    label_column: str
    labels: tuple[str, ...]
    skipped_rows: list[int] = field(default_factory=list)

def _find_columns(features: datasets.Features) -> tuple[str, str]:
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    labels = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
    if len(images) != 1 or len(labels) != 1:
        found = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
        raise TrainingError(
            "The dataset needs exactly one Image column and one ClassLabel column; "
            f"found {len(images)} and {len(labels)} among: {found or 'no columns'}."
        )
    return images[0], labels[0]

def _stored(image: dict) -> bytes | str:
    """An undecoded row's picture: its bytes, or its file for datasets stored by path."""
    return image["bytes"] if image.get("bytes") is not None else image["path"]


def _is_usable(row: tuple[Optional[dict], Optional[int]]) -> bool:
    """A row with a picture that decodes and a label of the ClassLabel's two."""
    image, label = row
    if image is None or label not in (0, 1):
        return False
    try:
        open_image(_stored(image))
    except ImageError:
        return False
    return True

def _usable_batch(images: list, labels: list) -> list[bool]:
    # Threads, not processes: Pillow decodes with the GIL released, so this uses every core, and a
    # kill -9 of the training process cannot leave a pool of forked workers behind.
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        return list(pool.map(_is_usable, zip(images, labels)))

def load_image_dataset(name: str, revision: Optional[str] = None, split: str = "train") -> LoadedDataset:
    """One split of a two-class image dataset, without the rows (counted) whose image cannot be decoded or whose label
    is not one of the two."""
    try:
        dataset = datasets.load_dataset(name, revision=revision, split=split)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise TrainingError(f"Could not load the dataset {name!r}: {str(error).splitlines()[0]}") from None
    except ValueError as error:  # for example an unknown split name
        raise TrainingError(f"Could not load split {split!r} of {name!r}: {str(error).splitlines()[0]}") from None
    except ConnectionError as error:
        raise TrainingError(f"Could not reach the Hub to load {name!r} ({error}). Pass a local folder.") from None
    image_column, label_column = _find_columns(dataset.features)
    labels = tuple(dataset.features[label_column].names)
    if len(labels) != 2:
        raise TrainingError(f"The label column {label_column!r} has {len(labels)} classes {labels}; two are needed.")
    dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    # Checked on the raw bytes once, so that training and the evaluation never meet a broken row.
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    raw = raw.filter(_usable_batch, input_columns=[image_column, label_column], batched=True, batch_size=256,
                     desc="Checking images")
    kept = set(column(raw, ROW_COLUMN))
    skipped = [row for row in range(len(dataset)) if row not in kept]
    if skipped:
        logger.warning("skipped %d of %d rows whose image is missing or cannot be decoded, or whose label is not one "
                       "of %s", len(skipped), len(dataset), list(labels))
        dataset = dataset.select(sorted(kept))
    if len(dataset) == 0:
        raise TrainingError(f"No row of {name!r} has an image that can be decoded and one of the labels {list(labels)}.")
    counts = np.bincount(column(dataset, label_column), minlength=2)
    if not counts.all():
        raise TrainingError(
            f"{name!r} holds {counts[0]} {labels[0]!r} and {counts[1]} {labels[1]!r} images: a classifier needs both."
        )
    return LoadedDataset(dataset, image_column, label_column, labels, skipped)

def split_dataset(
    data: LoadedDataset, test_split: float, val_split: float, seed: int
) -> dict[str, Dataset]:
    """A seeded, stratified held-out test split, then ``val_split`` of the rest for validation."""
    try:
        first = data.dataset.train_test_split(test_size=test_split, stratify_by_column=data.label_column, seed=seed)
        second = first["train"].train_test_split(test_size=val_split, stratify_by_column=data.label_column, seed=seed)
    except ValueError as error:
        raise TrainingError(f"Cannot split {len(data.dataset)} rows that way: {error}") from None
    splits = {"train": second["train"], "validation": second["test"], "test": first["test"]}
    check_classes(data, splits)
    return splits

def check_classes(data: LoadedDataset, splits: dict[str, Dataset], hint: str = "") -> None:
    """Every split must hold both classes: accuracy on one class alone says nothing."""
    for name, split in splits.items():
        counts = np.bincount(column(split, data.label_column), minlength=2)
        for label, count in zip(data.labels, counts):
            if count == 0:
                raise TrainingError(
                    f"The {name} split ({len(split)} images) holds no {label!r} image, too few to train or evaluate{hint}."
                )

def dataset_fingerprint(name: str, revision: Optional[str] = None) -> str:
    """What the data is, for a run's identity: a local folder's content hash, or the commit a Hub dataset resolves to
    (no download)."""
    folder = Path(name)
    if folder.exists():
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as file:
                digest.update(hashlib.file_digest(file, "sha256").digest())
        return "sha256:" + digest.hexdigest()
    try:
        builder = datasets.load_dataset_builder(name, revision=revision)
    except Exception as error:  # any failure here is the dataset's, and load_image_dataset reports it best
        raise TrainingError(f"Could not load the dataset {name!r}: {str(error).splitlines()[0]}") from None
    return f"{name}@{builder.hash or revision or 'main'}"

def column(dataset: Dataset, name: str) -> list:
    """One column as a list in one go (datasets reads a column row by row)."""
    return dataset.with_format("arrow")[name].to_pylist()


def save_split(path: Path, splits: dict[str, Dataset], used: dict[str, Dataset], data: LoadedDataset, **info) -> None:
    """The row indices of each split, and of the rows used (``--max-*-samples``), so that the test set can be evaluated
    again."""
    content = dict(info, skipped_rows=data.skipped_rows)
    content.update({name: column(split, ROW_COLUMN) for name, split in splits.items()})
    content["used"] = {name: column(split, ROW_COLUMN) for name, split in used.items()}
    path.write_text(json.dumps(content))

def read_split_file(path: Path) -> dict:
    """A split.json written by ``save_split``; TrainingError naming what is wrong with any other file."""
    try:
        saved = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingError(f"{path} is not a readable split.json ({type(error).__name__})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("used"), dict) or not all(
            isinstance(saved.get(name), list) and isinstance(saved["used"].get(name), list) for name in ("train", "test")):
        raise TrainingError(f"{path} is not a split.json written by train_accelerate.py (no train and test rows)")
    return saved

def load_split(path: Path, data: LoadedDataset, name: str, used: bool = False) -> Dataset:
    """The rows of one saved split (or only those used), looked up by their original index."""
    position = {row: i for i, row in enumerate(column(data.dataset, ROW_COLUMN))}
    saved = read_split_file(path)
    try:
        return data.dataset.select([position[row] for row in (saved["used"] if used else saved)[name]])
    except KeyError as error:
        raise TrainingError(f"{path} names row {error} that this dataset does not have: another dataset or revision?") from None

class _Transform:
    """A ``set_transform`` function: uint8 ``pixels`` (``images.model_input``, as serving) and ``label``; for training,
    flipped, rotated and zoomed, each row seeded by (seed, epoch, row), so that order, workers and a resume cannot
    change it. Call ``set_epoch`` before each epoch's loader iterator."""

    def __init__(self, data: LoadedDataset, image_size: int, train: bool, seed: int) -> None:
        self.image_column, self.label_column = data.image_column, data.label_column
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _pil(image) -> Image.Image:
        if isinstance(image, dict):  # an undecoded row
            return open_image(_stored(image))
        return image

    def _augmented(self, square: np.ndarray, row: int) -> np.ndarray:
        """Keras-style augmentation with v2.RandomHorizontalFlip's and v2.RandomAffine's parameters (rotation ±20°, zoom
        0.8–1.2, nearest), drawn from (seed, epoch, row)."""
        seed = int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1, np.uint64)[0])
        flip, angle, zoom = torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
        picture = Image.fromarray(np.ascontiguousarray(square.transpose(1, 2, 0)))
        picture = v2.functional.affine(picture, angle=-20 + 40 * angle, translate=[0, 0], scale=0.8 + 0.4 * zoom, shear=[0.0])
        return np.asarray(v2.functional.horizontal_flip(picture) if flip < 0.5 else picture).transpose(2, 0, 1)

    def __call__(self, batch: dict) -> dict:
        # uint8 from decode to batch: a quarter of the bytes through the loader's workers; the model
        # converts to float on its device (CatDogClassifier._normalise), with the serving path's arithmetic.
        pixels = [model_input(self._pil(image), self.image_size) for image in batch[self.image_column]]
        if self.train:
            pixels = [self._augmented(square, row) for square, row in zip(pixels, batch[ROW_COLUMN])]
        return {"pixels": [torch.from_numpy(np.ascontiguousarray(square)) for square in pixels],
                "label": batch[self.label_column]}

def undecoded(split: Dataset, data: LoadedDataset) -> Dataset:
    """The split with its images left undecoded, as the transforms decode fastest (no copy of the data)."""
    return split.cast_column(data.image_column, datasets.Image(decode=False))

def make_transform(data: LoadedDataset, image_size: int, train: bool, seed: int = 0) -> _Transform:
    """The one training/evaluation transform for ``Dataset.set_transform``; see ``_Transform``."""
    return _Transform(data, image_size, train, seed)

def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixels": torch.stack([row["pixels"] for row in rows]),
        "labels": torch.tensor([row["label"] for row in rows], dtype=torch.float32),
    }
