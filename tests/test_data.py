"""Dataset handling: column detection, broken rows, the stratified split and its saved indices."""

import io
import json
import struct

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image as ImageFeature, Value
from PIL import Image

from catdog_model.training import TrainingError
from catdog_model.training.data import (check_classes, load_image_dataset, load_split, make_transform, save_split, undecoded,
                               split_dataset)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_parquet_dataset(folder, rows: list[tuple[bytes, int]], image="img", label="target", names=("cat", "dog")):
    """A local dataset in the Hub's layout (data/*.parquet), with our own column names."""
    features = Features({image: ImageFeature(), label: ClassLabel(names=list(names))})
    dataset = Dataset.from_dict(
        {image: [{"bytes": data, "path": None} for data, _ in rows], label: [y for _, y in rows]}, features=features
    )
    (folder / "data").mkdir(parents=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture
def dataset_with_broken_rows(tmp_path):
    good = [(_jpeg(i), i % 2) for i in range(40)]
    truncated = _jpeg(99)[:200]
    rows = good[:5] + [(b"", 0)] + good[5:20] + [(truncated, 1), (b"not a picture", 0)] + good[20:]
    return write_parquet_dataset(tmp_path / "broken", rows)


def test_columns_found_by_feature_and_broken_rows_skipped_and_counted(dataset_with_broken_rows):
    data = load_image_dataset(str(dataset_with_broken_rows))
    assert (data.image_column, data.label_column, data.labels) == ("img", "target", ("cat", "dog"))
    assert data.skipped_rows == [5, 21, 22]
    assert len(data.dataset) == 40
    assert all(image.size == (24, 24) for image in data.dataset["img"])


def test_rows_without_a_picture_or_with_no_label_are_skipped_and_counted(tmp_path):
    rows = [(_jpeg(i), i % 2) for i in range(12)]
    folder = write_parquet_dataset(tmp_path / "holes", rows[:3] + [(_jpeg(50), -1)] + rows[3:])  # -1: datasets' "no label"
    data = load_image_dataset(str(folder))
    assert data.skipped_rows == [3] and len(data.dataset) == 12
    features = Features({"img": ImageFeature(), "target": ClassLabel(names=["cat", "dog"])})
    with_none = Dataset.from_dict({"img": [None] + [{"bytes": b, "path": None} for b, _ in rows],
                                   "target": [0] + [y for _, y in rows]}, features=features)
    (tmp_path / "none" / "data").mkdir(parents=True)
    with_none.to_parquet(str(tmp_path / "none" / "data" / "train-00000-of-00001.parquet"))
    assert load_image_dataset(str(tmp_path / "none")).skipped_rows == [0]


def test_missing_columns_are_a_clear_error(tmp_path):
    folder = tmp_path / "nolabels" / "data"
    folder.mkdir(parents=True)
    Dataset.from_dict({"img": [{"bytes": _jpeg(0), "path": None}], "target": [1]},
                      features=Features({"img": ImageFeature(), "target": Value("int64")})).to_parquet(str(folder / "x.parquet"))
    with pytest.raises(TrainingError, match="one ClassLabel column.*img \\(Image\\), target \\(Value\\)"):
        load_image_dataset(str(folder.parent))


def test_more_than_two_classes_is_a_clear_error(tmp_path):
    folder = write_parquet_dataset(tmp_path / "three", [(_jpeg(i), i % 3) for i in range(6)], names=("a", "b", "c"))
    with pytest.raises(TrainingError, match="3 classes"):
        load_image_dataset(str(folder))


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="Could not load the dataset"):
        load_image_dataset(str(tmp_path / "does-not-exist"))


def test_class_subfolders_work_too(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "pets" / name / f"{i}.jpg").write_bytes(_jpeg(i))
    (tmp_path / "pets" / "dog" / "broken.jpg").write_bytes(b"")
    # A PNG whose header chunk is cut short: Pillow raised ValueError("Truncated IHDR chunk") through the check.
    (tmp_path / "pets" / "cat" / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 5) + b"IHDR" + b"\x00" * 9)
    data = load_image_dataset(str(tmp_path / "pets"))
    assert data.labels == ("cat", "dog") and len(data.dataset) == 6 and len(data.skipped_rows) == 2


def test_split_is_stratified_disjoint_seeded_and_saved(mini_dataset, tmp_path):
    data = load_image_dataset(str(mini_dataset))
    splits = split_dataset(data, test_split=0.1, val_split=0.2, seed=7)
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 2160, "validation": 540, "test": 300}
    for split in splits.values():  # stratified: half cats, half dogs (the mini set is balanced)
        assert abs(np.mean(split["labels"]) - 0.5) < 0.01
    rows = {name: set(split["__row__"]) for name, split in splits.items()}
    assert not rows["train"] & rows["test"] and not rows["validation"] & rows["test"] and not rows["train"] & rows["validation"]
    assert len(rows["train"] | rows["validation"] | rows["test"]) == 3000

    again = split_dataset(data, test_split=0.1, val_split=0.2, seed=7)
    assert list(again["test"]["__row__"]) == list(splits["test"]["__row__"])
    assert set(split_dataset(data, 0.1, 0.2, seed=8)["test"]["__row__"]) != rows["test"]

    used = dict(splits, test=splits["test"].select(range(10)))  # as --max-eval-samples 10 leaves it
    save_split(tmp_path / "split.json", splits, used, data, seed=7)
    assert json.loads((tmp_path / "split.json").read_text())["seed"] == 7
    reloaded = load_split(tmp_path / "split.json", data, "test")
    assert list(reloaded["__row__"]) == list(splits["test"]["__row__"])
    assert list(reloaded["labels"]) == list(splits["test"]["labels"])
    assert list(load_split(tmp_path / "split.json", data, "test", used=True)["__row__"]) == list(splits["test"]["__row__"][:10])


def test_a_class_named_but_absent_is_refused(tmp_path):
    folder = write_parquet_dataset(tmp_path / "cats-only", [(_jpeg(i), 0) for i in range(20)])
    with pytest.raises(TrainingError, match="holds 20 'cat' and 0 'dog' images: a classifier needs both"):
        load_image_dataset(str(folder))


def test_a_split_without_one_class_is_refused(tmp_path):
    data = load_image_dataset(str(write_parquet_dataset(tmp_path / "few", [(_jpeg(i), int(i < 3)) for i in range(30)])))
    with pytest.raises(TrainingError, match="The test split \\(3 images\\) holds no 'dog' image, too few to train or evaluate"):
        split_dataset(data, test_split=0.1, val_split=0.2, seed=0)  # 10% of 3 dogs rounds to none
    splits = split_dataset(load_image_dataset(str(write_parquet_dataset(
        tmp_path / "ok", [(_jpeg(i), i % 2) for i in range(30)]))), test_split=0.2, val_split=0.25, seed=0)
    with pytest.raises(TrainingError, match="The test split \\(1 images\\) holds no"):
        check_classes(data, {"test": splits["test"].select([0])})


def test_augmentation_is_a_function_of_seed_epoch_and_row_only(dataset_with_broken_rows):
    data = load_image_dataset(str(dataset_with_broken_rows))
    rows = data.dataset.select(range(6))[:]
    transform = make_transform(data, 24, train=True, seed=3)
    first = transform(rows)["pixels"]
    torch.manual_seed(123)  # the global random state plays no part
    again = transform(rows)["pixels"]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    reordered = transform({k: v[::-1] for k, v in rows.items()})["pixels"][::-1]  # order plays no part either
    assert all(torch.equal(a, b) for a, b in zip(first, reordered))
    transform.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, transform(rows)["pixels"]))
    assert not all(torch.equal(a, b) for a, b in zip(first, make_transform(data, 24, train=True, seed=4)(rows)["pixels"]))
    plain = make_transform(data, 24, train=False)(rows)["pixels"]
    assert not all(torch.equal(a, b) for a, b in zip(first, plain))


def test_undecoded_rows_give_what_decoded_ones_do(tmp_path, mini_dataset):
    # JPEGs from the mini set (decoded by libjpeg-turbo from their bytes), plus a PNG and an EXIF-rotated JPEG.
    photos = load_image_dataset(str(mini_dataset)).dataset.select([0, 1500])["image"]
    rotated, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # orientation: stored sideways, shown upright
    photos[0].save(rotated, "JPEG", exif=exif)
    png = io.BytesIO()
    photos[1].save(png, "PNG")
    rows = [(rotated.getvalue(), 0), (png.getvalue(), 1)] + [(_jpeg(i), i % 2) for i in range(4)]
    data = load_image_dataset(str(write_parquet_dataset(tmp_path / "mixed", rows)))
    decoded, raw = data.dataset[:], undecoded(data.dataset, data)[:]
    assert isinstance(raw["img"][0], dict) and isinstance(decoded["img"][0], Image.Image)
    for train in (True, False):
        transform = make_transform(data, 64, train=train, seed=1)
        for a, b in zip(transform(decoded)["pixels"], transform(raw)["pixels"]):
            assert a.shape == b.shape == (3, 64, 64) and a.dtype == b.dtype == torch.uint8
            assert (a.int() - b.int()).abs().float().mean() < 2  # the two JPEG decoders may round apart
            if not train:
                assert torch.equal(a, b)  # evaluation decodes with Pillow either way, as the predictor does
