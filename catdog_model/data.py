"""Dataset loading for training and evaluation: columns, broken rows, the split, the transforms.

Works on ``microsoft/cats_vs_dogs`` from the Hub and on any local folder that
``datasets.load_dataset`` understands (parquet with a dataset card, or class subfolders).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import datasets
import torch
from datasets import ClassLabel, Dataset
from torchvision.transforms import v2

from .images import ImageError, open_image, preprocess

__all__ = ["DatasetError", "LoadedDataset", "load_image_dataset", "split_dataset", "make_transform", "collate"]

logger = logging.getLogger(__name__)

ROW_COLUMN = "__row__"  # the row's index in the original split, kept through filtering and splitting


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message says why."""


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
        raise DatasetError(
            "The dataset needs exactly one Image column and one ClassLabel column; "
            f"found {len(images)} and {len(labels)} among: {found or 'no columns'}."
        )
    return images[0], labels[0]


def _is_decodable(image: dict) -> bool:
    try:
        open_image(image["bytes"] if image.get("bytes") is not None else image["path"])
    except ImageError:
        return False
    return True


def load_image_dataset(
    name: str, revision: Optional[str] = None, split: str = "train", num_proc: Optional[int] = None
) -> LoadedDataset:
    """Load one split of a two-class image dataset and drop the rows whose image cannot be decoded."""
    try:
        dataset = datasets.load_dataset(name, revision=revision, split=split)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DatasetError(f"Could not load the dataset {name!r}: {str(error).splitlines()[0]}") from None
    except ValueError as error:  # for example an unknown split name
        raise DatasetError(f"Could not load split {split!r} of {name!r}: {str(error).splitlines()[0]}") from None
    except ConnectionError as error:
        raise DatasetError(f"Could not reach the Hub to load {name!r} ({error}). Pass a local folder.") from None
    image_column, label_column = _find_columns(dataset.features)
    labels = tuple(dataset.features[label_column].names)
    if len(labels) != 2:
        raise DatasetError(f"The label column {label_column!r} has {len(labels)} classes {labels}; two are needed.")

    dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    # Decoding is checked on the raw bytes once, so that training never meets a broken image.
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    raw = raw.filter(_is_decodable, input_columns=image_column, num_proc=num_proc, desc="Checking images")
    kept = set(raw[ROW_COLUMN])
    skipped = [row for row in range(len(dataset)) if row not in kept]
    if skipped:
        logger.warning("skipped %d of %d rows whose image cannot be decoded", len(skipped), len(dataset))
        dataset = dataset.select(sorted(kept))
    if len(dataset) == 0:
        raise DatasetError(f"No row of {name!r} has an image that can be decoded.")
    return LoadedDataset(dataset, image_column, label_column, labels, skipped)


def split_dataset(
    data: LoadedDataset, test_split: float, val_split: float, seed: int
) -> dict[str, Dataset]:
    """A seeded, stratified held-out test split, then ``val_split`` of the rest for validation."""
    try:
        first = data.dataset.train_test_split(test_size=test_split, stratify_by_column=data.label_column, seed=seed)
        second = first["train"].train_test_split(test_size=val_split, stratify_by_column=data.label_column, seed=seed)
    except ValueError as error:
        raise DatasetError(f"Cannot split {len(data.dataset)} rows that way: {error}") from None
    return {"train": second["train"], "validation": second["test"], "test": first["test"]}


def save_split(path: Path, splits: dict[str, Dataset], data: LoadedDataset, **info) -> None:
    """Write the row indices of each split, so the test set can be evaluated again later."""
    content = dict(info, skipped_rows=data.skipped_rows)
    content.update({name: list(split[ROW_COLUMN]) for name, split in splits.items()})
    path.write_text(json.dumps(content))


def load_split(path: Path, data: LoadedDataset, name: str) -> Dataset:
    """The rows of one saved split, looked up by their original index."""
    position = {row: i for i, row in enumerate(data.dataset[ROW_COLUMN])}
    try:
        return data.dataset.select([position[row] for row in json.loads(Path(path).read_text())[name]])
    except KeyError as error:
        raise DatasetError(f"{path} names row {error} that this dataset does not have: another dataset or revision?") from None


def make_transform(data: LoadedDataset, image_size: int, train: bool) -> Callable[[dict], dict]:
    """A ``Dataset.set_transform`` function yielding ``pixels`` and ``label``; augments only for training."""
    # Keras-style augmentation from the spec: rotation ±20°, horizontal flip, zoom 0.8–1.2.
    augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=20, scale=(0.8, 1.2))]) if train else None

    def transform(batch: dict) -> dict:
        pixels = [preprocess(image, image_size) for image in batch[data.image_column]]
        if augment is not None:
            pixels = [augment(p) for p in pixels]
        return {"pixels": pixels, "label": batch[data.label_column]}

    return transform


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixels": torch.stack([row["pixels"] for row in rows]),
        "labels": torch.tensor([row["label"] for row in rows], dtype=torch.float32),
    }
