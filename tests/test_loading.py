"""Loading never crashes: whatever the source string or the folder holds, only ModelLoadError, naming both."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_model import CatDogClassifier, ImageError, ModelLoadError, load_predictor
from conftest import ROOT, complete_folder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    return complete_folder(CatDogClassifier(backbone="test_resnet", image_size=32, hidden_size=8),
                           tmp_path_factory.mktemp("model"))


def _copy_with_config(saved_model, tmp_path, **changes):
    shutil.copytree(saved_model, tmp_path, dirs_exist_ok=True)
    config = json.loads((saved_model / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    return tmp_path


@pytest.mark.parametrize("config_text, reason", [
    ("[1, 2]", "JSON list, not an object"),
    ("{not json", "not valid JSON"),
    ('{"labels": ["cat", "dog", "bird"]}', "exactly two non-empty label names"),
    ('{"labels": "cd"}', "labels must be a list of two names"),
    ('{"labels": ["dog", "dog"]}', "the two labels must differ"),
    ('{"labels": ["Cat", " cat"]}', "not only in case or spaces"),
    ('{"labels": ["", "dog"]}', "exactly two non-empty label names"),
    ('{"labels": null}', "labels must be a list"),
    ('{"image_size": "big"}', "image_size must be a positive whole number"),
    ('{"image_size": 0}', "image_size must be a positive whole number"),
    ('{"hidden_size": -1}', "hidden_size must be a positive whole number"),
    ('{"dropout": 2}', "dropout must be a probability"),
])
def test_bad_config_is_one_model_load_error_naming_source_and_reason(saved_model, tmp_path, config_text, reason):
    _copy_with_config(saved_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    try:
        config.update(json.loads(config_text))
        (tmp_path / "config.json").write_text(json.dumps(config))
    except (ValueError, TypeError):  # not a JSON object: write it as it is
        (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(ModelLoadError) as error:
        load_predictor(str(tmp_path))
    assert reason in str(error.value) and str(tmp_path) in str(error.value)


@pytest.mark.parametrize("source, message", [
    ("", "No model given"),
    ("   ", "No model given"),
    ("catdog-modl", "No such model folder: catdog-modl"),
    ("./catdog-modl", "No such model folder: ./catdog-modl"),
    ("some/deep/folder", "No such model folder: some/deep/folder"),
    ("a b/c", "neither a folder nor a valid Hub id"),
    ("user/repo@", "names no revision"),
    ("x" * 300, r"neither a folder nor a Hub id \(File name too long\)"),  # a $CATDOG_MODEL pasted wrong
    ("user/" + "x" * 300, "neither a folder nor a valid Hub id"),
])
def test_source_strings_that_cannot_work_say_why(source, message):
    with pytest.raises(ModelLoadError, match=message):
        load_predictor(source)


def test_a_file_and_a_folder_with_a_revision_are_refused(saved_model):
    with pytest.raises(ModelLoadError, match="is a file; pass the folder"):
        load_predictor(str(saved_model / "config.json"))
    with pytest.raises(ModelLoadError, match="a local folder has no revisions; drop '@v1'"):
        load_predictor(f"{saved_model}@v1")


def test_labels_are_checked_with_real_exceptions_even_under_python_O():
    # check_config is the one judge, for the model's __init__ and load_predictor alike: no torch needed to run it.
    code = ("from catdog_model.config import check_config\n"
            "try:\n    check_config(dict(labels=('a', 'b', 'c')))\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "refused: a binary classifier needs exactly two non-empty label names" in result.stdout, result.stderr


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"timm has no model named 'resnet5O' \(did you mean resnet50"):
        CatDogClassifier(backbone="resnet5O")


@pytest.mark.slow
def test_an_image_size_that_explodes_the_head_is_refused_before_allocating_it():
    with pytest.raises(ValueError, match="billion weights"):  # a 128×128×96 map: 1.6 billion weights
        CatDogClassifier(backbone="test_resnet", image_size=4096)


@pytest.fixture(scope="module")
def predictor(saved_model):
    return load_predictor(str(saved_model))


@pytest.mark.parametrize("images", ["cat.jpg", None, np.zeros((32, 32, 3), np.uint8), Image.new("RGB", (8, 8)), 3])
def test_predict_refuses_what_is_not_a_list_of_images(predictor, images):
    with pytest.raises(TypeError, match="predict takes a list of PIL images or file paths"):
        predictor.predict(images)


@pytest.mark.parametrize("item", [None, np.zeros((32, 32, 3), np.uint8)])
def test_predict_refuses_list_items_that_are_not_images(predictor, item):
    with pytest.raises(TypeError, match="expected a PIL image, a file path or a file.s bytes"):
        predictor.predict([Image.new("RGB", (8, 8)), item])


def test_a_path_that_is_no_picture_is_an_image_error(predictor, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ImageError, match="No such file"):
        predictor.predict([str(tmp_path / "cat.jpg")])
    with pytest.raises(ImageError, match="not an image that can be read"):
        predictor.predict([tmp_path / "notes.txt"])


def test_closed_and_empty_images_are_image_errors(predictor):
    closed = Image.new("RGB", (16, 16))
    closed.close()
    with pytest.raises(ImageError, match="closed"):
        predictor.predict([closed])
    with pytest.raises(ImageError, match=r"no pixels \(0×0\)"):
        predictor.predict([Image.new("RGB", (0, 0))])
    assert predictor.predict([Image.new("RGB", (1, 1))])[0].keys() == {"cat", "dog"}


def test_where_the_hub_does_not_answer_loading_fails_in_seconds_and_says_what_to_do(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))  # a closed port: nothing answers
    code = "from catdog_model import load_predictor\nload_predictor('someone/catdog')"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 15  # seconds, where huggingface_hub's retries took 24 s
    assert "the Hugging Face Hub cannot be reached from here (http://127.0.0.1:9)" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "Retrying" not in result.stderr
