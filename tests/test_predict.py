"""catdog-predict: a photo library or a dataset classified into CSV, JSON Lines or Parquet, resumably, by one
process or several, with the answers `predictor.explain` gives."""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet
import pytest
from PIL import Image
from datasets import load_dataset

from catdog_model import load_predictor
from conftest import ROOT, assert_clean_error, in_process
from test_data import _jpeg, write_parquet_dataset


def _predict(*args, env=None, launcher=(sys.executable, "-m", "catdog_model.predict")):
    return subprocess.run([*launcher, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _interrupted(*args) -> None:
    """catdog-predict stopped after writing its chunks, before merging them: OUT.parts/ left as a kill leaves it."""
    from catdog_model import predict

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "_merge", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        assert in_process(lambda: predict.main([str(arg) for arg in args]), []).returncode == 130


def _predict_here(*args):
    from catdog_model import predict

    return in_process(lambda: predict.main([str(arg) for arg in args]), [str(arg) for arg in args])


@pytest.fixture(scope="module")
def library(tmp_path_factory, mini_dataset):
    """A folder tree of mini-set photos, with a text file called .jpg, a truncated JPEG and a file that is no picture."""
    root = tmp_path_factory.mktemp("library")
    rows = load_dataset(str(mini_dataset), split="train")
    for index in (0, 7, 1500, 1600, 2999):
        folder = root / ("cats" if index < 1500 else "dogs") / ("old" if index % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        rows[index]["image"].save(folder / f"photo{index}.jpg")
    (root / "cats" / "notes.jpg").write_text("not a picture")
    (root / "dogs" / "cut.jpg").write_bytes((root / "dogs" / "photo1600.jpg").read_bytes()[:900])
    (root / "readme.txt").write_text("not one of Pillow's picture extensions: not listed")
    return root


def _csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_folder_tree_gives_one_row_per_picture_with_the_predictors_own_answers(trained_model, library, tmp_path):
    result = _predict(library, "--output", tmp_path / "rows.csv", "--model", trained_model)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _csv(tmp_path / "rows.csv")
    names = [row["picture"] for row in rows]
    assert sorted(names) == sorted(["cats/photo0.jpg", "cats/old/photo7.jpg", "cats/notes.jpg", "dogs/photo1600.jpg",
                                    "dogs/photo1500.jpg", "dogs/old/photo2999.jpg", "dogs/cut.jpg"])
    predictor = load_predictor(str(trained_model))
    broken = [row for row in rows if row["picture"] in ("cats/notes.jpg", "dogs/cut.jpg")]
    assert [row["verdict"] for row in broken] == ["error"] * 2
    assert all(row["note"].startswith("Cannot read this file") for row in broken)
    # the same predictor on the same pictures in the same forward passes: bit for bit
    read = [row for row in rows if row not in broken]
    explanations = predictor.explain_inputs([predictor.model_input(str(library / row["picture"])) for row in read])
    assert [row["verdict"] for row in read] == [explanation.verdict.answer for explanation in explanations]
    assert [(float(row["p_dog"]), float(row["ood_score"])) for row in read] == [
        (explanation.probabilities["dog"], explanation.ood_score) for explanation in explanations]
    assert "classified 7 pictures" in result.stderr and "2 error" in result.stderr
    assert "picture/s" in result.stderr  # the progress bar, with its rate
    assert not (tmp_path / "rows.csv.parts").exists()


@pytest.mark.slow
def test_json_lines_and_parquet_hold_the_same_rows_and_a_file_list_and_globs_work(trained_model, library, tmp_path):
    assert _predict(library, "--output", tmp_path / "rows.jsonl", "--model", trained_model).returncode == 0
    assert _predict(library, "--output", tmp_path / "rows.parquet", "--model", trained_model).returncode == 0
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert lines == pyarrow.parquet.read_table(tmp_path / "rows.parquet").to_pylist() and len(lines) == 7
    picked = _predict(library / "cats" / "photo0.jpg", f"{library}/dogs/**/*.jpg", "--output", tmp_path / "some.jsonl",
                      "--model", trained_model)
    assert picked.returncode == 0, picked.stderr[-2000:]
    some = [json.loads(line) for line in (tmp_path / "some.jsonl").read_text().splitlines()]
    assert [row["picture"] for row in some][0] == "photo0.jpg" and len(some) == 5  # 1 file, 4 matches


@pytest.mark.slow
def test_a_local_dataset_by_row_with_the_same_answers_as_its_pictures(trained_model, tmp_path):
    rows = [(_jpeg(i), i % 2) for i in range(20)] + [(b"broken", 0)]
    folder = write_parquet_dataset(tmp_path / "data", rows)
    result = _predict("--dataset", folder, "--output", tmp_path / "rows.csv", "--model", trained_model)
    assert result.returncode == 0, result.stderr[-3000:]
    written = _csv(tmp_path / "rows.csv")
    predictor = load_predictor(str(trained_model))
    assert [row["picture"] for row in written] == [str(i) for i in range(21)] and written[20]["verdict"] == "error"
    explanations = predictor.explain_inputs([predictor.model_input(picture) for picture, _ in rows[:20]])
    assert [float(row["p_dog"]) for row in written[:20]] == [answer.probabilities["dog"] for answer in explanations]


@pytest.mark.slow
def test_a_datasets_verdicts_sit_beside_its_own_columns_in_every_format(trained_model, tmp_path):
    """Parquet keeps the pictures too, with the dataset's features: load_dataset reads it back as the split, labelled."""
    import datasets

    folder = write_parquet_dataset(tmp_path / "data", [(_jpeg(i), i % 2) for i in range(6)])
    for extension in (".parquet", ".csv"):
        result = _predict_here("--dataset", folder, "--output", tmp_path / f"rows{extension}", "--model", trained_model)
        assert result.returncode == 0, result.stderr[-2000:]
    labelled = datasets.load_dataset("parquet", data_files=str(tmp_path / "rows.parquet"), split="train")
    assert list(labelled.features) == ["img", "target", "verdict", "p_cat", "p_dog", "ood_score", "note"]
    assert isinstance(labelled.features["img"], datasets.Image) and labelled.features["target"].names == ["cat", "dog"]
    assert [image.tobytes() for image in labelled["img"]] == [Image.open(io.BytesIO(_jpeg(i))).tobytes() for i in range(6)]
    rows = _csv(tmp_path / "rows.csv")
    assert list(rows[0]) == ["picture", "target", "verdict", "p_cat", "p_dog", "ood_score", "note"]
    assert [row["target"] for row in rows] == ["0", "1"] * 3 and [row["verdict"] for row in rows] == list(labelled["verdict"])
    taken = write_parquet_dataset(tmp_path / "taken", [(_jpeg(0), 0)], label="verdict")
    assert_clean_error(_predict_here("--dataset", taken, "--output", tmp_path / "taken.csv", "--model", trained_model),
                       "the dataset already has a column named verdict, where the verdicts would go")
    assert not (tmp_path / "taken.csv.parts").exists()


@pytest.mark.parametrize("args, message", [
    (("{library}", "--output", "{tmp}/rows.txt"), "must end in .csv, .jsonl, .parquet"),
    (("{library}", "--output", "{tmp}/nowhere/rows.csv"), "no folder"),
    (("{tmp}/empty", "--output", "{tmp}/rows.csv"), "no picture in"),
    (("{tmp}/missing", "--output", "{tmp}/rows.csv"), "No such file or folder"),
    (("--dataset", "{data}", "--image-column", "photo", "--output", "{tmp}/rows.csv"), "has no image column photo"),
    (("--dataset", "{data}", "--split", "test", "--output", "{tmp}/rows.csv"), "Could not load split 'test'"),
    # Checked before the model loads (no such model here): a column that holds no pictures, a mistyped split.
    (("--dataset", "{data}", "--image-column", "target", "--output", "{tmp}/rows.csv", "--model", "{tmp}/no-model"),
     "has no image column target (pass --image-column; it has: img (Image), target (ClassLabel))"),
    (("--dataset", "{data}", "--split", "tset", "--output", "{tmp}/rows.csv", "--model", "{tmp}/no-model"),
     "Could not load split 'tset'"),
    (("{library}", "--output", "{tmp}/rows.csv", "--model", ""), "--model is empty"),
    (("--dataset", "{tmp}/nope", "--output", "{tmp}/rows.csv", "--model", "{tmp}/no-model"),
     "--dataset {tmp}/nope: no such folder"),
])
def test_bad_input_is_one_clear_line(trained_model, library, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    data = write_parquet_dataset(tmp_path / "data", [(_jpeg(i), i % 2) for i in range(4)])
    filled = [arg.format(library=library, tmp=tmp_path, data=data) for arg in args]
    result = _predict_here(*filled, *(() if "--model" in filled else ("--model", trained_model)))
    assert_clean_error(result, message.format(tmp=tmp_path))
    assert not list(tmp_path.glob("*.parts"))  # refused before anything was written


def test_a_rerun_after_pictures_were_added_is_refused_never_mixed(trained_model, library, tmp_path):
    photos, output = tmp_path / "photos", tmp_path / "rows.csv"
    shutil.copytree(library, photos)
    _interrupted(photos, "--output", output, "--model", trained_model)
    shutil.copy(photos / "cats" / "photo0.jpg", photos / "aaa.jpg")  # sorts first: every chunk would shift
    result = _predict_here(photos, "--output", output, "--model", trained_model)
    assert_clean_error(result, f"{output}.parts holds the rows of another run (pictures differ)", "delete it")
    assert not output.exists() and (tmp_path / "rows.csv.parts").is_dir()


def test_a_relative_folder_rerun_from_another_folder_is_refused_never_mixed(trained_model, library, tmp_path,
                                                                             monkeypatch):
    output = tmp_path / "rows.jsonl"
    for where, photo in (("here", "cats/photo0.jpg"), ("there", "dogs/photo1600.jpg")):
        (tmp_path / where / "photos").mkdir(parents=True)
        shutil.copy(library / photo, tmp_path / where / "photos" / "pet.jpg")
    monkeypatch.chdir(tmp_path / "here")
    _interrupted("photos", "--output", output, "--model", trained_model)
    monkeypatch.chdir(tmp_path / "there")
    result = _predict_here("photos", "--output", output, "--model", trained_model)
    assert_clean_error(result, "holds the rows of another run (paths, pictures differ)")
    assert not output.exists()


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, mini_dataset):
    """400 mini-set photos as files: enough chunks to kill a run in the middle of."""
    root = tmp_path_factory.mktemp("many")
    rows = load_dataset(str(mini_dataset), split="train")
    for index in range(0, 3000, 7)[:400]:
        rows[index]["image"].save(root / f"{index:04d}.jpg")
    return root


@pytest.mark.slow
def test_a_kill_9_midway_then_a_rerun_gives_the_uninterrupted_rows_each_once(trained_model, many_photos, tmp_path):
    assert _predict(many_photos, "--output", tmp_path / "whole.csv", "--model", trained_model).returncode == 0
    command = [sys.executable, "-m", "catdog_model.predict", str(many_photos), "--output", str(tmp_path / "rows.csv"),
               "--model", str(trained_model)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    parts, deadline = tmp_path / "rows.csv.parts", time.monotonic() + 300
    try:
        while len(list(parts.glob("0*.jsonl"))) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "rows.csv").exists()  # never a half-written output
    other = _predict(many_photos / "0000.jpg", "--output", tmp_path / "rows.csv", "--model", trained_model)
    assert_clean_error(other, "holds the rows of another run (paths, pictures differ)")
    rerun = _predict(many_photos, "--output", tmp_path / "rows.csv", "--model", trained_model)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (tmp_path / "rows.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert_clean_error(_predict(many_photos, "--output", tmp_path / "rows.csv", "--model", trained_model),
                       "is already complete")


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(trained_model, many_photos, tmp_path):
    assert _predict(many_photos, "--output", tmp_path / "one.jsonl", "--model", trained_model).returncode == 0
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "catdog_model.predict")
    result = _predict(many_photos, "--output", tmp_path / "two.jsonl", "--model", trained_model, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert "classified 400 pictures" in result.stderr


def test_a_dataset_row_whose_file_is_gone_is_an_error_row_and_the_run_goes_on(trained_model, tmp_path):
    import pyarrow
    from datasets import ClassLabel, Features, Image as ImageFeature

    # Written with pyarrow: datasets would read the missing file in to embed it. The middle row names a file only.
    features = Features({"img": ImageFeature(), "target": ClassLabel(names=["cat", "dog"])})
    images = pyarrow.array([{"bytes": _jpeg(0), "path": None}, {"bytes": None, "path": str(tmp_path / "gone.jpg")},
                            {"bytes": _jpeg(1), "path": None}], features["img"].pa_type)
    table = pyarrow.table({"img": images, "target": pyarrow.array([0, 1, 0], pyarrow.int64())})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    (tmp_path / "data" / "data").mkdir(parents=True)
    pyarrow.parquet.write_table(table, tmp_path / "data" / "data" / "train-00000-of-00001.parquet")
    result = _predict_here("--dataset", tmp_path / "data", "--output", tmp_path / "rows.jsonl", "--model", trained_model)
    assert result.returncode == 0, result.stderr[-2000:]
    written = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [row["verdict"] == "error" for row in written] == [False, True, False]
    assert "gone.jpg: No such file or directory" in written[1]["note"]


@pytest.mark.parametrize("repo_id, message", [("", "is not a dataset id"), ("not a valid id", "is not a dataset id"),
                                              ("user/rows", "--push-to-hub needs a token")])
def test_a_push_that_cannot_work_is_refused_before_the_model_loads(library, tmp_path, repo_id, message):
    result = _predict_here(library, "--output", tmp_path / "rows.csv", "--model", tmp_path / "no-model",
                           "--push-to-hub", repo_id)
    assert_clean_error(result, message)
    assert not (tmp_path / "rows.csv.parts").exists()


def test_ctrl_c_is_one_line_saying_how_to_carry_on(trained_model, library, tmp_path, monkeypatch):
    from catdog_model import predict

    monkeypatch.setattr(predict, "predict_files", lambda *_, **__: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        result = _predict_here(library, "--output", tmp_path / "rows.csv", "--model", trained_model)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out as a KeyboardInterrupt and its traceback, not one line")
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: interrupted: the rows classified so far are kept in "
                                                       f"{tmp_path / 'rows.csv'}.parts; run the same command again to carry on")


@pytest.mark.slow
def test_a_fifo_or_an_unreadable_folder_is_skipped_with_a_warning_never_a_hang(trained_model, library, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(library, photos)
    os.mkfifo(photos / "b_pipe.jpg")  # opening it would wait for a writer for ever
    (photos / "locked").mkdir()
    shutil.copy(library / "cats" / "photo0.jpg", photos / "locked" / "pet.jpg")
    (photos / "locked").chmod(0)
    try:  # as typed, with a timeout: a hang fails the test instead of stopping the suite
        result = _predict(photos, "--output", tmp_path / "rows.csv", "--model", trained_model)
    finally:
        (photos / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping {photos / 'b_pipe.jpg'}: not a regular file" in result.stderr
    names = [row["picture"] for row in _csv(tmp_path / "rows.csv")]
    assert "b_pipe.jpg" not in names
    if os.geteuid() != 0:  # root reads any folder, whatever its mode
        assert f"skipping {photos / 'locked'} and what it holds: Permission denied" in result.stderr


@pytest.mark.slow
def test_a_folder_that_cannot_be_listed_is_named_in_a_warning(trained_model, library, tmp_path, monkeypatch):
    """As root reads any folder whatever its mode, the refusal is the file system's answer, as os.walk gets it."""
    photos = tmp_path / "photos"
    shutil.copytree(library / "cats", photos)
    (photos / "locked").mkdir()
    shutil.copy(library / "cats" / "photo0.jpg", photos / "locked" / "pet.jpg")
    listed = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, Path)) and str(path) == str(photos / "locked"):  # not a descriptor shutil passes
            raise PermissionError(13, "Permission denied", str(path))
        return listed(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = _predict_here(photos, "--output", tmp_path / "rows.csv", "--model", trained_model)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping {photos / 'locked'} and what it holds: Permission denied" in result.stderr
    names = [row["picture"] for row in _csv(tmp_path / "rows.csv")]
    assert "photo0.jpg" in names and "locked/pet.jpg" not in names


@pytest.mark.slow
@pytest.mark.parametrize("extension", [".csv", ".jsonl", ".parquet"])
def test_names_with_line_breaks_or_bytes_that_are_not_utf8_stay_distinct(trained_model, library, tmp_path, extension):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = (library / "cats" / "photo0.jpg").read_bytes()
    # A line break, a space, a backslash and an n (as the line break is written), Latin-1 as old cameras wrote
    for name in (b"new\nline.jpg", b"new line.jpg", b"new\\nline.jpg", b"caf\xe9.jpg"):
        with open(bytes(photos) + b"/" + name, "wb") as file:
            file.write(photo)
    output = tmp_path / f"rows{extension}"
    result = _predict_here(photos, "--output", output, "--model", trained_model)
    assert result.returncode == 0, result.stderr[-2000:]
    if extension == ".csv":
        rows = _csv(output)
    elif extension == ".jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    else:
        rows = pyarrow.parquet.read_table(output).to_pylist()
    assert sorted(row["picture"] for row in rows) == ["caf\\xe9.jpg", "new line.jpg", "new\\\\nline.jpg", "new\\nline.jpg"]

