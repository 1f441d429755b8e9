"""The fast CPU serving path: same answers as the exact model, a small file, chosen by CPU features."""

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import constants

from catdog_model import CatDogClassifier, ModelLoadError, load_predictor, openvino_engine
from catdog_model.ood import synthetic_ood_images
from catdog_model.serving import SERVING_FILE, Int8Linear, fold_batch_norms, make_fast, save_serving_file


@pytest.fixture(scope="module")
def mini_images(mini_dataset):
    rows = load_dataset(str(mini_dataset), split="train")
    return [rows[i]["image"] for i in range(len(rows))]


def _p_dog(predictor, images) -> np.ndarray:
    return np.array([result["dog"] for result in predictor.predict(images)])


@pytest.mark.slow
@pytest.mark.parametrize("openvino", ["off", "now"])
def test_fast_path_keeps_the_answers_on_all_3000_mini_photos(trained_model, mini_images, openvino):
    exact = _p_dog(load_predictor(str(trained_model), exact=True), mini_images)
    predictor = load_predictor(str(trained_model), openvino=openvino)
    assert ("OpenVINO" in predictor.serving_path) == (openvino == "now")
    fast = _p_dog(predictor, mini_images)
    difference = np.abs(fast - exact)
    summary = f"max {difference.max():.4f}, mean {difference.mean():.5f}"
    assert len(exact) == 3000
    assert np.mean(difference <= 0.01) >= 0.99, summary
    assert np.mean((fast > 0.5) == (exact > 0.5)) >= 0.995, summary


def test_the_fp32_backbone_variant_for_cpus_without_bf16_keeps_the_answers(trained_model, mini_images):
    model = make_fast(CatDogClassifier.from_pretrained(str(trained_model)), bf16_backbone=False)
    assert model.compute_dtype == torch.float32 and isinstance(model.head[1], Int8Linear)
    exact = load_predictor(str(trained_model), exact=True)
    images = mini_images[::60]
    fast = load_predictor(str(trained_model))
    fast.model = model
    assert np.abs(_p_dog(fast, images) - _p_dog(exact, images)).max() <= 0.01


def test_serving_file_alone_is_enough_and_gives_the_same_answers(trained_model, mini_images, tmp_path):
    assert (trained_model / SERVING_FILE).is_file()  # written by the training run
    only_serving = tmp_path / "space"
    shutil.copytree(trained_model, only_serving, ignore=shutil.ignore_patterns("model.safetensors"))
    images = mini_images[::100]
    from_file = load_predictor(str(only_serving))
    converted = load_predictor(str(trained_model))
    assert from_file.serving_path == converted.serving_path != "exact fp32"
    assert np.array_equal(_p_dog(from_file, images), _p_dog(converted, images))
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        load_predictor(str(only_serving), exact=True)


def test_serving_file_is_under_a_third_of_the_fp32_file_at_224_px(tmp_path):
    torch.manual_seed(0)
    model = CatDogClassifier().eval()
    model.save_pretrained(tmp_path)
    save_serving_file(model, tmp_path / SERVING_FILE)
    fp32, serving = (tmp_path / "model.safetensors").stat().st_size, (tmp_path / SERVING_FILE).stat().st_size
    assert serving <= 0.3 * fp32 and serving <= 150e6, (fp32, serving)


def test_a_hub_model_is_served_from_the_serving_file_without_model_safetensors(trained_model, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--someone--fast" / "snapshots" / ("c" * 40)
    shutil.copytree(trained_model, snapshot, ignore=shutil.ignore_patterns("model.safetensors", "*.png", "*.html"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c" * 40)
    predictor = load_predictor("someone/fast")  # HF_HUB_OFFLINE=1: only files in the cache can be read
    assert predictor.serving_path != "exact fp32" and predictor.detector is not None
    with pytest.raises(ModelLoadError, match="Could not download"):
        load_predictor("someone/fast", exact=True)


def test_a_serving_file_that_does_not_fit_the_config_is_a_clear_error(trained_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, hidden_size=16)))
    with pytest.raises(ModelLoadError, match="do not form a valid model.*head"):
        load_predictor(str(folder))


def _count_batches(predictor) -> list[int]:
    """Record the batch size of every forward pass the predictor's model makes."""
    sizes, forward = [], predictor.model.forward
    predictor.model.forward = lambda pixels: (sizes.append(len(pixels)), forward(pixels))[1]
    return sizes


def test_concurrent_callers_share_batches_and_each_gets_its_own_answer(trained_model, mini_images):
    predictor = load_predictor(str(trained_model))
    images = mini_images[:24]
    expected = predictor.predict(images)
    sizes = _count_batches(predictor)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(predictor.predict_shared, images))
    for answer, reference in zip(answers, expected):
        assert answer.keys() == reference.keys()
        assert abs(answer["dog"] - reference["dog"]) < 2e-3  # bf16 kernels may block a batch differently
    assert sum(sizes) == 24 and max(sizes) > 1 and max(sizes) <= predictor.max_shared_batch


def test_a_lone_caller_waits_for_no_batch_and_errors_reach_every_caller(trained_model, mini_images):
    predictor = load_predictor(str(trained_model))
    sizes = _count_batches(predictor)
    predictor.predict_shared(mini_images[0])
    assert sizes == [1]
    forward = predictor.model.forward
    predictor.model.forward = lambda pixels: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(predictor.predict_shared, image) for image in mini_images[:4]]
    assert all(isinstance(future.exception(), RuntimeError) for future in futures)
    predictor.model.forward = forward  # the model thread lives on for the next caller
    assert predictor.predict_shared(mini_images[0]).keys() == {"cat", "dog"}
    assert predictor.explain(mini_images[0]).heatmap.size > 0


def test_batch_norms_fold_into_their_convolutions_and_the_answers_stay():
    torch.manual_seed(0)
    model = CatDogClassifier(image_size=64).eval()
    for module in model.backbone.modules():  # non-trivial statistics, as a trained model has
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2), module.weight.data.uniform_(0.5, 1.5)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before, (_, stages_before) = model(pixels), model.inspect(pixels)
        assert fold_batch_norms(model.backbone) == 53  # every one of resnet50's
        after, (_, stages_after) = model(pixels), model.inspect(pixels)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert torch.allclose(before, after, atol=1e-4) and all(
        torch.allclose(stages_before[k], stages_after[k], atol=1e-4) for k in stages_before)
    assert fold_batch_norms(model.backbone) == 0  # nothing left to fold


def test_openvino_explains_like_torch_on_photos_and_on_pictures_of_neither(trained_model, mini_images):
    torch_path = load_predictor(str(trained_model), openvino="off")
    openvino_path = load_predictor(str(trained_model), openvino="now")
    assert openvino_path.serving_path == torch_path.serving_path + ", OpenVINO"
    for image in [*mini_images[::300], *synthetic_ood_images(count=6, size=128)]:
        expected, got = torch_path.explain(image), openvino_path.explain(image)
        assert abs(got.probabilities["dog"] - expected.probabilities["dog"]) < 0.01
        assert got.ood_score == pytest.approx(expected.ood_score, rel=0.02)
        assert got.heatmap.shape == expected.heatmap.shape and np.abs(got.heatmap - expected.heatmap).max() < 0.15


def test_openvino_compiles_in_the_background_while_torch_serves(trained_model, mini_images, monkeypatch):
    compiling, started = threading.Event(), []
    real_init = openvino_engine.OpenVINOForward.__init__

    def slow_init(self, *args):
        started.append(True)
        compiling.wait(30)  # held until torch has answered again, so the test sees both engines in turn
        real_init(self, *args)

    monkeypatch.setattr(openvino_engine.OpenVINOForward, "__init__", slow_init)
    monkeypatch.setenv("CATDOG_OPENVINO", "background")  # what app.py and a plain load_predictor do
    predictor = load_predictor(str(trained_model))
    time.sleep(0.5)
    assert not started and "OpenVINO" not in predictor.serving_path  # nothing competes with the first answer
    by_torch = _p_dog(predictor, mini_images[:4])
    assert _p_dog(predictor, mini_images[:1])[0] == by_torch[0] and "OpenVINO" not in predictor.serving_path
    compiling.set()
    assert predictor.wait_for_openvino(timeout=120) and predictor.serving_path.endswith(", OpenVINO")
    assert np.abs(_p_dog(predictor, mini_images[:4]) - by_torch).max() < 0.01


def test_torch_serves_where_openvino_is_missing_or_fails(trained_model, mini_images, monkeypatch, caplog):
    expected = _p_dog(load_predictor(str(trained_model), openvino="off"), mini_images[:4])
    monkeypatch.setattr(openvino_engine, "openvino", None)
    with caplog.at_level(logging.INFO, logger="catdog_model.openvino_engine"):
        missing = load_predictor(str(trained_model), openvino="now")
    assert not missing.wait_for_openvino() and "not installed" in caplog.text
    assert np.array_equal(_p_dog(missing, mini_images[:4]), expected)
    monkeypatch.undo()

    def broken(*args):
        raise RuntimeError("Exception from src/frontends/pytorch: unsupported op\nand a long trace")

    monkeypatch.setattr(openvino_engine.OpenVINOForward, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="catdog_model.openvino_engine"):
        failed = load_predictor(str(trained_model), openvino="now")
    assert "OpenVINO" not in failed.serving_path and "unsupported op" in caplog.text and "long trace" not in caplog.text
    assert np.array_equal(_p_dog(failed, mini_images[:4]), expected)


def test_an_unknown_openvino_mode_is_a_clear_error(trained_model, monkeypatch):
    monkeypatch.setenv("CATDOG_OPENVINO", "yes")
    with pytest.raises(ModelLoadError, match=r"CATDOG_OPENVINO\) must be one of background, now, off"):
        load_predictor(str(trained_model))
    assert load_predictor(str(trained_model), exact=True, openvino="off").openvino is None
