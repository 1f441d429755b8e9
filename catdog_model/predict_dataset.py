"""catdog-predict on a split of a 🤗 dataset: checked before the model loads, read undecoded, its verdicts set beside the
split's own columns (and on the Hub, where the viewer shows each picture with its verdict)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

from .errors import TRAIN_EXTRA, CatdogError
from .images import ImageError
from .serving.files import no_such_folder

__all__ = ["beside_the_split", "check_room", "dataset_rows", "open_split", "push_split"]

logger = logging.getLogger(__name__)


def open_split(name: str, split: str, column: Optional[str]):
    """The split and its image column, checked before the model loads (memory-mapped Arrow: flat memory at any size)."""
    try:
        import datasets
    except ImportError:
        raise CatdogError(f"--dataset {TRAIN_EXTRA}") from None
    if missing := no_such_folder("--dataset", name):
        raise CatdogError(missing)
    try:
        rows = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError, ConnectionError) as error:
        raise CatdogError(f"Could not load split {split!r} of {name!r}: {str(error).splitlines()[0]}") from None
    images = [key for key, feature in rows.features.items() if isinstance(feature, datasets.Image)]
    column = column or (images[0] if len(images) == 1 else None)
    if column is None or column not in images:
        found = ", ".join(f"{key} ({type(feature).__name__})" for key, feature in rows.features.items()) or "no columns"
        raise CatdogError(f"{name!r} has no image column {column or ''} (pass --image-column; it has: {found})".replace(" ()", ""))
    return rows, column


def dataset_rows(rows, column: str) -> Iterator[tuple[str, object]]:
    """(row index, the picture's bytes), undecoded; a file that cannot be read gives its reason instead, for an error
    row."""
    import datasets

    for index, row in enumerate(rows.select_columns([column]).cast_column(column, datasets.Image(decode=False))):
        image = row[column] or {}
        try:
            picture = image.get("bytes") or (Path(image["path"]).read_bytes() if image.get("path") else b"")
        except OSError as error:
            picture = ImageError(f"{image['path']}: {error.strerror or error}")
        yield str(index), picture


def check_room(rows, prediction_columns: list[str]) -> None:
    """The verdicts' columns must be new to the split: a dataset that has one already is refused before any work."""
    if taken := [name for name in prediction_columns if name in rows.column_names]:
        raise CatdogError(f"the dataset already has a column named {', '.join(taken)}, where the verdicts would go")


def beside_the_split(predictions: list[dict], rows):
    """The split with each row's verdict, probabilities, "neither" score and note as new columns, row for row."""
    from datasets import Dataset, concatenate_datasets

    return concatenate_datasets([rows, Dataset.from_list(predictions).remove_columns("picture")], axis=1)


def push_split(labelled, repo_id: str, split: str, description: str) -> None:
    """The labelled split to a Hub dataset (its pictures embedded, as the viewer shows them), with a card."""
    from huggingface_hub import DatasetCard
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    try:
        labelled.push_to_hub(repo_id, split=split, commit_message=f"Verdicts of {len(labelled)} pictures")
        card = DatasetCard.load(repo_id, repo_type="dataset")
        card.text = description
        card.push_to_hub(repo_id, repo_type="dataset", commit_message="Dataset card")
    except (HfHubHTTPError, HTTPError, OSError, ValueError) as error:
        raise CatdogError(f"Could not push to {repo_id}: {str(error).splitlines()[0]}") from None
    logger.info("pushed the %s split, labelled, to the dataset %s", split, repo_id)
