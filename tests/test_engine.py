"""The serving engine: the OpenVINO IR shipped with the model, its parity with eager fp32, what a Space
downloads, the fallbacks, and a model folder that vouches for its files."""

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from catdog_model import CatDogClassifier, ModelLoadError, PredictionError, load_predictor
from catdog_model import engine as engines
from catdog_model.engine import IR_FILES
from catdog_model.export import save_openvino
from catdog_model.ood import HIDDEN, OOD_FILE, STAGE_FEATURES, save_detector
from conftest import hub_snapshot

SPACE_FILES = ("config.json", *IR_FILES, OOD_FILE)


@pytest.fixture(scope="module")
def mini_images(mini_dataset):
    rows = load_dataset(str(mini_dataset), split="train")
    return [rows[i]["image"] for i in range(len(rows))]


def _p_dog(predictor, images) -> np.ndarray:
    return np.array([result["dog"] for result in predictor.predict(images)])


def _drop_manifest(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["manifest"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_the_default_engine_keeps_the_answers_on_all_3000_mini_photos(trained_model, mini_images):
    default, exact = load_predictor(str(trained_model)), load_predictor(str(trained_model), exact=True)
    assert default.engine.startswith("openvino-") and exact.engine == "torch-fp32"
    p_default, p_exact = _p_dog(default, mini_images), _p_dog(exact, mini_images)
    difference = np.abs(p_default - p_exact)
    summary = f"max {difference.max():.4f}, mean {difference.mean():.5f}"
    assert len(p_exact) == 3000
    assert np.mean(difference <= 0.01) >= 0.99, summary
    assert np.mean((p_default > 0.5) == (p_exact > 0.5)) >= 0.995, summary


def test_the_engine_is_named_by_what_the_cpu_computes(trained_model, monkeypatch):
    expected = "openvino-bf16" if engines.native_bf16() else "openvino-f32"
    assert load_predictor(str(trained_model)).engine == expected
    monkeypatch.setattr(engines, "native_bf16", lambda: False)  # an AVX2-only CPU
    assert load_predictor(str(trained_model)).engine == "openvino-f32"
    assert load_predictor(str(trained_model), exact=True).engine == "torch-fp32"


def test_explain_through_openvino_matches_torch_on_photos_and_on_pictures_of_neither(trained_model, mini_images):
    from catdog_model.evaluate import synthetic_ood_images

    default, exact = load_predictor(str(trained_model)), load_predictor(str(trained_model), exact=True)
    for image in [*mini_images[::300], *synthetic_ood_images(count=6, size=128)]:
        expected, got = exact.explain(image), default.explain(image)
        assert abs(got.probabilities["dog"] - expected.probabilities["dog"]) < 0.01
        assert got.ood_score == pytest.approx(expected.ood_score, rel=0.02)
        assert got.heatmap.shape == expected.heatmap.shape and np.abs(got.heatmap - expected.heatmap).max() < 0.15


def test_the_space_needs_only_config_the_ir_and_the_detector(trained_model, mini_images, tmp_path, monkeypatch):
    space = tmp_path / "space"
    space.mkdir()
    for name in SPACE_FILES:
        shutil.copy(trained_model / name, space / name)
    images = mini_images[::100]
    assert np.array_equal(_p_dog(load_predictor(str(space)), images), _p_dog(load_predictor(str(trained_model)), images))
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        load_predictor(str(space), exact=True)
    # The same from the Hub: HF_HUB_OFFLINE=1, so only the files in the cache can be read.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_snapshot(tmp_path / "hub", "someone/space", space)
    from_hub = load_predictor("someone/space")
    assert from_hub.engine.startswith("openvino-") and from_hub.detector is not None
    with pytest.raises(ModelLoadError, match="Could not download"):
        load_predictor("someone/space", exact=True)


@pytest.mark.slow
def test_what_a_space_downloads_is_under_0_3_of_the_fp32_weights_at_224_px(tmp_path):
    torch.manual_seed(0)
    model = CatDogClassifier().eval()
    model.save_pretrained(tmp_path)
    save_openvino(model, tmp_path)
    sizes = {name: 2 * model.backbone.feature_info[i]["num_chs"] for i, name in STAGE_FEATURES.items()} | {HIDDEN: 1024}
    save_detector({f"{layer}.{part}": np.zeros(shape, np.float32) for layer, size in sizes.items()
                   for part, shape in (("means", (2, size)), ("precision", (size, size)), ("scale", (1,)))},
                  tmp_path / OOD_FILE)
    space = sum((tmp_path / name).stat().st_size for name in SPACE_FILES)
    fp32 = (tmp_path / "model.safetensors").stat().st_size
    assert space <= 0.3 * fp32, (space / 1e6, fp32 / 1e6)


def test_a_model_without_the_ir_exports_it_at_load_with_the_same_answers(trained_model, mini_images, tmp_path, caplog):
    older = tmp_path / "older"
    shutil.copytree(trained_model, older, ignore=shutil.ignore_patterns("openvino_model.*"))
    _drop_manifest(older)
    with caplog.at_level(logging.INFO, logger="catdog_model"):
        predictor = load_predictor(str(older))
    assert "has no OpenVINO IR" in caplog.text and "has no manifest" in caplog.text
    images = mini_images[::150]
    assert predictor.engine == load_predictor(str(trained_model)).engine
    assert np.abs(_p_dog(predictor, images) - _p_dog(load_predictor(str(trained_model)), images)).max() < 1e-5


def test_torch_serves_where_openvino_is_missing_or_cannot_read_the_ir(trained_model, mini_images, tmp_path, monkeypatch,
                                                                      caplog):
    expected = _p_dog(load_predictor(str(trained_model), exact=True), mini_images[:4])
    monkeypatch.setattr(engines, "openvino", None)
    with caplog.at_level(logging.WARNING, logger="catdog_model.predictor"):
        missing = load_predictor(str(trained_model))
    assert missing.engine == "torch-fp32" and "OpenVINO is not installed" in caplog.text
    assert np.array_equal(_p_dog(missing, mini_images[:4]), expected)
    monkeypatch.undo()
    broken = tmp_path / "broken"
    shutil.copytree(trained_model, broken)
    _drop_manifest(broken)  # a hand-made folder: nothing vouches for the IR
    (broken / IR_FILES[0]).write_text("<net>not an IR\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catdog_model.predictor"):
        fallback = load_predictor(str(broken))
    assert fallback.engine == "torch-fp32" and "OpenVINO cannot serve" in caplog.text
    assert len([r for r in caplog.records if "OpenVINO" in r.message]) == 1
    assert np.array_equal(_p_dog(fallback, mini_images[:4]), expected)


# ---- A model folder that vouches for itself.

@pytest.fixture(scope="module")
def other_run(trained_model, tmp_path_factory):
    """Another run of the same shape: the same files with different weights."""
    folder = tmp_path_factory.mktemp("other")
    torch.manual_seed(1)
    model = CatDogClassifier(**{k: v for k, v in json.loads((trained_model / "config.json").read_text()).items()
                                if k in ("backbone", "image_size", "hidden_size", "labels")}).eval()
    model.save_pretrained(folder)
    save_openvino(model, folder)
    detector = load_file(trained_model / OOD_FILE)
    save_detector({name: tensor.numpy() * 1.5 for name, tensor in detector.items()}, folder / OOD_FILE)
    return folder


@pytest.mark.parametrize("name, exact", [(IR_FILES[1], False), (IR_FILES[0], False), (OOD_FILE, False),
                                         ("model.safetensors", True), ("metrics.json", False)])
def test_a_file_from_another_run_is_refused_naming_it(trained_model, other_run, tmp_path, name, exact):
    mixed = tmp_path / "mixed"
    shutil.copytree(trained_model, mixed)
    if name == "metrics.json":
        (mixed / name).write_text(json.dumps({"test": {"accuracy": 0.99, "samples": 10}}))
    else:
        shutil.copy(other_run / name, mixed / name)
    with pytest.raises(ModelLoadError) as error:
        load_predictor(str(mixed), exact=exact)
    message = str(error.value)
    assert f"{name} is not the file its training run wrote" in message and str(mixed) in message
    assert "\n" not in message


def test_a_mixed_hub_download_is_refused_too(trained_model, other_run, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_snapshot(tmp_path / "hub", "someone/mixed", trained_model)
    (snapshot / OOD_FILE).unlink()
    shutil.copy(other_run / OOD_FILE, snapshot / OOD_FILE)
    with pytest.raises(ModelLoadError, match="'someone/mixed' on the Hub: ood.safetensors is not the file"):
        load_predictor("someone/mixed")


def test_a_derived_file_must_come_from_the_listed_weights(trained_model, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(trained_model, edited)
    config = json.loads((edited / "config.json").read_text())
    config["manifest"]["files"][IR_FILES[1]]["made_from"] = "0" * 64
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="openvino_model.bin was made from other weights"):
        load_predictor(str(edited))


def _with_nan(folder, tensor_name):
    weights = load_file(folder / "model.safetensors")
    weights[tensor_name][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("exact", [True, False])
def test_non_finite_weights_are_refused_at_load(trained_model, tmp_path, exact):
    folder = tmp_path / "nan"
    shutil.copytree(trained_model, folder, ignore=shutil.ignore_patterns("openvino_model.*"))
    _drop_manifest(folder)
    _with_nan(folder, "head.4.weight")
    with pytest.raises(ModelLoadError, match=r"non-finite weights \(head.4.weight\)"):
        load_predictor(str(folder), exact=exact)


def test_a_non_finite_ir_detector_temperature_or_threshold_is_refused(trained_model, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(trained_model, folder)
    _drop_manifest(folder)
    model = CatDogClassifier.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        model.head[4].bias.fill_(float("nan"))
    save_openvino(model, folder)
    with pytest.raises(ModelLoadError, match="non-finite"):
        load_predictor(str(folder))
    shutil.copy(trained_model / IR_FILES[0], folder / IR_FILES[0])
    shutil.copy(trained_model / IR_FILES[1], folder / IR_FILES[1])
    detector = load_file(trained_model / OOD_FILE)
    detector["hidden.precision"][0, 0] = float("nan")
    save_file(detector, folder / OOD_FILE)
    with pytest.raises(ModelLoadError, match="ood.safetensors holds non-finite values in hidden.precision"):
        load_predictor(str(folder))
    shutil.copy(trained_model / OOD_FILE, folder / OOD_FILE)
    config = json.loads((folder / "config.json").read_text())
    for key in ("temperature", "ood_threshold"):
        (folder / "config.json").write_text(json.dumps({**config, key: float("nan")}))
        with pytest.raises(ModelLoadError, match=key):
            load_predictor(str(folder))


def test_a_non_finite_output_is_an_error_never_an_answer(trained_model, mini_images):
    predictor = load_predictor(str(trained_model))
    real = predictor.backend

    class Broken:
        name = real.name

        def __call__(self, pixels):
            outputs = real(pixels)
            outputs.logits[:] = np.nan
            return outputs

    predictor.backend = Broken()
    for ask in (lambda: predictor.predict(mini_images[:2]), lambda: predictor.explain_shared(mini_images[0]),
                lambda: predictor.explain(mini_images[0])):
        with pytest.raises(PredictionError, match="non-finite output"):
            ask()


# ---- One model thread, shared batches.

def _count_batches(predictor) -> list[int]:
    """Record the batch size of every forward pass the predictor's engine makes."""
    sizes, real = [], predictor.backend

    class Counting:
        name = real.name

        def __call__(self, pixels):
            sizes.append(len(pixels))
            return real(pixels)

    predictor.backend = Counting()
    return sizes


def test_concurrent_callers_share_batches_and_each_gets_its_own_answer(trained_model, mini_images):
    predictor = load_predictor(str(trained_model))
    images = mini_images[:24]
    expected = predictor.explain_many(images)
    sizes = _count_batches(predictor)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(predictor.explain_shared, images))
    for answer, reference in zip(answers, expected):
        assert answer.probabilities.keys() == reference.probabilities.keys()
        # bf16 kernels may block a batch differently
        assert abs(answer.probabilities["dog"] - reference.probabilities["dog"]) < 2e-3
        assert answer.ood_score == pytest.approx(reference.ood_score, rel=2e-2)
        assert answer.heatmap.shape == reference.heatmap.shape
    assert sum(sizes) == 24 and max(sizes) > 1 and max(sizes) <= predictor.max_shared_batch


def test_a_lone_caller_waits_for_no_batch_and_errors_reach_every_caller(trained_model, mini_images):
    predictor = load_predictor(str(trained_model))
    sizes = _count_batches(predictor)
    predictor.explain_shared(mini_images[0])
    assert sizes == [1]
    working = predictor.backend

    class OutOfMemory:
        name = working.name

        def __call__(self, pixels):
            raise RuntimeError("out of memory")

    predictor.backend = OutOfMemory()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(predictor.explain_shared, image) for image in mini_images[:4]]
    assert all(isinstance(future.exception(), RuntimeError) for future in futures)
    predictor.backend = working  # the model thread lives on for the next caller
    assert predictor.explain_shared(mini_images[0]).probabilities.keys() == {"cat", "dog"}
    assert predictor.explain(mini_images[0]).heatmap.size > 0
