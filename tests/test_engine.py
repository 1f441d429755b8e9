"""The serving engine: the OpenVINO IR shipped with the model, its parity with eager fp32, what a Space
downloads, the re-export, and a model folder that vouches for its files."""

import json
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import constants
from safetensors.numpy import load_file as load_file_numpy
from safetensors.torch import load_file

from catdog_model import CatDogClassifier, ModelLoadError, load_predictor
from catdog_model import hardware
from catdog_model.config import HIDDEN, INT8_IR_FILES, IR_FILES, OOD_FILE, STAGE_FEATURES
from catdog_model.images import model_input
from catdog_model.serving.describe import details
from catdog_model.training.calibration import save_detector
from catdog_model.training import export
from catdog_model.training.export import save_openvino
from conftest import ROOT, assert_clean_error, complete_folder, hub_snapshot, in_process, torch_reference

SERVING_NEEDS = ("config.json", *IR_FILES, OOD_FILE)  # and the int8 engine, where the model has one


@pytest.fixture(scope="module")
def mini_images(mini_dataset):
    """Every tenth photo of the mini set: 150 cats, then 150 dogs."""
    rows = load_dataset(str(mini_dataset), split="train")
    return [rows[i]["image"] for i in range(0, len(rows), 10)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished folder of timm's 0.4M-parameter test_resnet, laid out as a run leaves it: for the checks of the
    manifest and the re-export, which hold for any model; the session's trained model costs seconds more to export."""
    torch.manual_seed(0)
    model = CatDogClassifier(backbone="test_resnet", image_size=64, hidden_size=16).eval()
    return complete_folder(model, tmp_path_factory.mktemp("small-run"))


def _p_dog(predictor, images) -> np.ndarray:
    return np.array([result["dog"] for result in predictor.predict(images)])


@pytest.mark.slow
def test_the_default_engine_keeps_the_answers_on_300_mini_photos(trained_model, mini_images):
    # benchmarks/serving_speed.py --dataset measures all 3,000.
    photos = mini_images
    default, exact = load_predictor(str(trained_model)), torch_reference(trained_model)
    assert default.engine_name.startswith("openvino-")
    p_default, p_exact = _p_dog(default, photos), _p_dog(exact, photos)
    difference = np.abs(p_default - p_exact)
    summary = f"max {difference.max():.4f}, mean {difference.mean():.5f}"
    assert len(p_exact) == 300
    assert np.mean(difference <= 0.01) >= 0.99, summary
    assert np.mean((p_default > 0.5) == (p_exact > 0.5)) >= 0.995, summary


@pytest.mark.parametrize("flags, expected", [({"avx512_vnni", "avx512_bf16", "avx2"}, "openvino-int8"),
                                              ({"amx_int8", "amx_bf16"}, "openvino-int8"),
                                              ({"avx512_bf16", "avx2"}, "openvino-bf16"),  # no int8 dot products
                                              ({"avx2"}, "openvino-f32")])
def test_the_engine_is_chosen_and_named_by_what_the_cpu_computes(trained_model, monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert load_predictor(str(trained_model)).engine_name == expected
    assert load_predictor(str(trained_model), int8=False).engine_name != "openvino-int8"


def test_the_int8_engine_passed_its_check_and_agrees_with_fp32_on_the_test_models_photos(trained_model, mini_images):
    check = json.loads((trained_model / "config.json").read_text())["manifest"]["files"][INT8_IR_FILES[0]]["check"]
    assert check["passed"] and check["photos"] == 32 and check["verdicts_agree"] >= export.INT8_CHECK["verdicts_agree"]
    int8, exact = load_predictor(str(trained_model), int8=True), torch_reference(trained_model)
    photos = mini_images[::3]
    got, expected = int8.explain_many(photos), exact.explain_many(photos)
    assert int8.engine_name == "openvino-int8" and len(got) == 100
    assert np.mean([a.verdict.answer == b.verdict.answer for a, b in zip(got, expected)]) >= 0.99
    assert max(abs(a.probabilities["dog"] - b.probabilities["dog"]) for a, b in zip(got, expected)) < 0.02
    assert np.corrcoef([a.ood_score for a in got], [b.ood_score for b in expected])[0, 1] >= 0.99
    assert "8-bit weights and arithmetic" in details(int8)


def test_an_int8_engine_that_fails_its_check_is_not_written(small_run, mini_images, tmp_path, monkeypatch):
    model = CatDogClassifier.from_pretrained(str(small_run)).eval()
    photos = [model_input(image, model.image_size) for image in mini_images[::10]]
    # No int8 engine keeps heatmaps exactly: this check fails as one that int8 moved too far would.
    monkeypatch.setitem(export.INT8_CHECK, "heatmap_r", 1.0)
    check = save_openvino(model, tmp_path, photos[:15], photos[15:], load_file_numpy(str(small_run / OOD_FILE)))
    assert not check["passed"] and check["failed"].startswith("heatmap_r") and check["photos"] == 15
    assert (tmp_path / IR_FILES[0]).is_file() and not any((tmp_path / name).exists() for name in INT8_IR_FILES)


@pytest.mark.slow
def test_a_quantization_that_raises_leaves_the_bf16_engine_written_and_says_why(small_run, mini_images, tmp_path,
                                                                              monkeypatch, caplog):
    model = CatDogClassifier.from_pretrained(str(small_run)).eval()
    photos = [model_input(image, model.image_size) for image in mini_images[:4]]

    def raises(*args, **kwargs):  # as NNCF does for an ignored scope that matches no op, say
        raise RuntimeError("Ignored nodes that matches patterns ['aten::mean/.*'] were not found in the NNCFGraph.")

    monkeypatch.setattr(export.nncf, "quantize", raises)
    check = save_openvino(model, tmp_path, photos[:2], photos[2:], load_file_numpy(str(small_run / OOD_FILE)))
    assert not check["passed"] and "NNCF could not quantize it: Ignored nodes" in check["failed"]
    assert (tmp_path / IR_FILES[0]).is_file() and not (tmp_path / INT8_IR_FILES[0]).exists()
    assert "int8 engine not made" in caplog.text


@pytest.mark.slow
def test_an_int8_engine_that_fails_its_check_is_not_served_and_the_bf16_one_is(trained_model, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    # No int8 engine keeps heatmaps exactly: this check fails as one that int8 moved too far would.
    monkeypatch.setitem(export.INT8_CHECK, "heatmap_r", 1.0)
    argv = [str(folder), "--int8"]
    result = in_process(lambda: export.main(argv), argv)
    assert_clean_error(result, "the int8 engine did not pass its check", "heatmap_r")
    assert not any((folder / name).exists() for name in INT8_IR_FILES)
    assert load_predictor(str(folder)).engine_name in ("openvino-bf16", "openvino-f32")
    with pytest.raises(ModelLoadError, match="has no int8 engine.*--int8"):
        load_predictor(str(folder), int8=True)


# int8's ranges are read on photos: on noise, stripes or text its "neither" score moves more, never its verdict.
@pytest.mark.parametrize("int8, ood_tolerance", [(False, 0.02), (True, 0.1)])
def test_explain_through_openvino_matches_torch_on_photos_and_on_pictures_of_neither(trained_model, mini_images, int8,
                                                                                    ood_tolerance):
    from catdog_model.training.evaluate import synthetic_ood_images

    default, exact = load_predictor(str(trained_model), int8=int8), torch_reference(trained_model)
    for image in [*mini_images[::30], *synthetic_ood_images(count=6, size=128)]:
        expected, got = exact.explain(image), default.explain(image)
        assert abs(got.probabilities["dog"] - expected.probabilities["dog"]) < 0.01
        assert got.ood_score == pytest.approx(expected.ood_score, rel=ood_tolerance)
        assert got.verdict.answer == expected.verdict.answer
        assert got.heatmap.shape == expected.heatmap.shape and np.abs(got.heatmap - expected.heatmap).max() < 0.15


def test_the_space_needs_only_config_the_ir_and_the_detector(trained_model, mini_images, tmp_path, monkeypatch):
    space = tmp_path / "space"
    space.mkdir()
    for name in (*SERVING_NEEDS, *INT8_IR_FILES):
        shutil.copy(trained_model / name, space / name)
    images = mini_images[::10]
    assert np.array_equal(_p_dog(load_predictor(str(space)), images), _p_dog(load_predictor(str(trained_model)), images))
    # The same from the Hub: HF_HUB_OFFLINE=1, so only the files in the cache can be read.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_snapshot(tmp_path / "hub", "someone/space", space)
    from_hub = load_predictor("someone/space")
    assert from_hub.engine_name.startswith("openvino-") and from_hub.detector is not None


@pytest.mark.slow
def test_what_a_space_downloads_is_under_0_3_of_the_fp32_weights_at_224_px(spec_model, tmp_path):
    model = spec_model
    model.save_pretrained(tmp_path)
    save_openvino(model, tmp_path)
    sizes = {name: 2 * model.backbone.feature_info[i]["num_chs"] for i, name in STAGE_FEATURES.items()} | {HIDDEN: 1024}
    save_detector({f"{layer}.{part}": np.zeros(shape, np.float32) for layer, size in sizes.items()
                   for part, shape in (("means", (2, size)), ("precision", (size, size)), ("scale", (1,)))},
                  tmp_path / OOD_FILE)
    space = sum((tmp_path / name).stat().st_size for name in SERVING_NEEDS)
    fp32 = (tmp_path / "model.safetensors").stat().st_size
    assert space <= 0.3 * fp32, (space / 1e6, fp32 / 1e6)


@pytest.mark.slow
def test_a_folder_without_its_ir_is_refused_and_the_command_makes_it_again(small_run, mini_images, tmp_path):
    folder = tmp_path / "no-ir"
    shutil.copytree(small_run, folder, ignore=shutil.ignore_patterns("openvino_model.*"))
    with pytest.raises(ModelLoadError, match="openvino_model.xml is missing.*python -m catdog_model.training.export"):
        load_predictor(str(folder))
    export.main([str(folder)])
    images = mini_images[::15]
    assert np.array_equal(_p_dog(load_predictor(str(folder)), images), _p_dog(load_predictor(str(small_run)), images))


def test_the_reexport_refuses_weights_nothing_vouches_for(small_run, other_run, tmp_path, capsys):
    folder = tmp_path / "replaced"
    shutil.copytree(small_run, folder)
    shutil.copy(other_run / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(SystemExit) as exit:
        export.main([str(folder)])
    assert exit.value.code == 1
    assert "model.safetensors is not the file its training run wrote" in capsys.readouterr().err


def test_the_neither_threshold_is_set_by_the_command_and_vouched_for_never_by_hand(small_run, tmp_path, capsys):
    folder = tmp_path / "tuned"
    shutil.copytree(small_run, folder)
    trained = load_predictor(str(folder)).ood_threshold
    export.main([str(folder), "--ood-threshold", "0"])  # every picture scores above 0: always "neither"
    tuned = load_predictor(str(folder))
    assert tuned.ood_threshold == 0.0 != trained and tuned.explain(str(ROOT / "examples" / "chelsea_cat.jpg")).verdict.answer == "neither"
    assert all((folder / name).read_bytes() == (small_run / name).read_bytes() for name in IR_FILES)  # the engine kept
    for bad in ("-1", "nan", "inf", "high"):
        with pytest.raises(SystemExit) as exit:
            export.main([str(folder), "--ood-threshold", bad])
        assert exit.value.code == 2 and f"--ood-threshold: must be a non-negative number, got '{bad}'" in capsys.readouterr().err
    assert load_predictor(str(folder)).ood_threshold == 0.0


SERVING_WITHOUT_TORCH = """
import sys
class NoTorch:  # as a venv with only requirements.txt: torch cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision", "accelerate", "datasets", "matplotlib"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTorch())
import app
from catdog_model import ModelLoadError, load_predictor
predictor = load_predictor(sys.argv[1])
print(predictor.predict(["examples/chelsea_cat.jpg"]), predictor.explain("examples/coffee_cup.jpg").verdict.answer)
app.build_demo(predictor)
try:
    from catdog_model import CatDogClassifier
except ImportError as error:
    print("model:", error)
"""


@pytest.mark.slow  # the quick suite reads the same rule from the imports (test_packaging.py)
def test_serving_and_the_app_never_import_torch(trained_model):
    result = subprocess.run([sys.executable, "-c", SERVING_WITHOUT_TORCH, str(trained_model)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[{'cat': " in result.stdout
    assert 'model: CatDogClassifier needs torch and timm' in result.stdout


# ---- A model folder that vouches for itself.

@pytest.fixture(scope="module")
def other_run(small_run, tmp_path_factory):
    """Another run of the same shape: the same files with different weights."""
    folder = tmp_path_factory.mktemp("other")
    torch.manual_seed(1)
    model = CatDogClassifier(**{k: v for k, v in json.loads((small_run / "config.json").read_text()).items()
                                if k in ("backbone", "image_size", "hidden_size", "labels")}).eval()
    model.save_pretrained(folder)
    save_openvino(model, folder)
    detector = load_file(small_run / OOD_FILE)
    save_detector({name: tensor.numpy() * 1.5 for name, tensor in detector.items()}, folder / OOD_FILE)
    return folder


@pytest.mark.parametrize("name", [IR_FILES[1], IR_FILES[0], OOD_FILE])
def test_a_file_from_another_run_is_refused_naming_it(small_run, other_run, tmp_path, name):
    mixed = tmp_path / "mixed"
    shutil.copytree(small_run, mixed)
    shutil.copy(other_run / name, mixed / name)
    with pytest.raises(ModelLoadError) as error:
        load_predictor(str(mixed))
    message = str(error.value)
    assert f"{name} is not the file its training run wrote" in message and str(mixed) in message
    assert "\n" not in message


def test_a_description_nothing_vouches_for_is_left_out_and_the_model_serves(trained_model, tmp_path, caplog):
    edited = tmp_path / "edited"
    shutil.copytree(trained_model, edited)
    (edited / "evaluation.json").write_text(json.dumps({"accuracy": 0.99, "samples": 10}))
    with caplog.at_level(logging.WARNING, logger="catdog_model.serving.predictor"):
        predictor = load_predictor(str(edited))
    assert predictor.evaluation == {} and "leaving evaluation.json out" in caplog.text
    assert predictor.metrics == json.loads((trained_model / "metrics.json").read_text())


def test_a_mixed_hub_download_is_refused_too(small_run, other_run, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_snapshot(tmp_path / "hub", "someone/mixed", small_run)
    (snapshot / OOD_FILE).unlink()
    shutil.copy(other_run / OOD_FILE, snapshot / OOD_FILE)
    with pytest.raises(ModelLoadError, match="'someone/mixed' on the Hub: ood.safetensors is not the file"):
        load_predictor("someone/mixed")


@pytest.mark.parametrize("key, value, said", [
    ("labels", ["dog", "cat"], "labels is ('dog', 'cat'), its run wrote ('cat', 'dog')"),  # every answer the other label
    ("temperature", 1e-9, "temperature is 1e-09, its run wrote 1.0"),  # every answer "100% sure"
    ("ood_threshold", 2.5, "ood_threshold is 2.5, its run wrote 1000000000.0"),  # small_run's 1e9 calls nothing "neither"
    ("image_size", 32, "image_size is 32, its run wrote 64"),
    ("backbone", "resnet18", "backbone is 'resnet18', its run wrote 'test_resnet'"),
])
def test_a_value_edited_in_config_json_is_refused_naming_it(small_run, tmp_path, key, value, said):
    edited = tmp_path / "edited"
    shutil.copytree(small_run, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ModelLoadError) as error:
        load_predictor(str(edited))
    message = str(error.value)
    assert "config.json was edited after its training run" in message and said in message and "\n" not in message


def test_a_manifest_without_the_models_values_is_not_a_finished_model(small_run, tmp_path):
    folder = tmp_path / "older"
    shutil.copytree(small_run, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["manifest"]["config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no complete manifest"):
        load_predictor(str(folder))


def test_a_non_finite_temperature_or_threshold_is_refused(small_run, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(small_run, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("temperature", "ood_threshold"):
        (folder / "config.json").write_text(json.dumps({**config, key: float("nan")}))
        with pytest.raises(ModelLoadError, match=key):
            load_predictor(str(folder))


# ---- One predictor, many threads.

def test_threads_sharing_a_predictor_get_their_own_answers_and_never_two_passes_at_once(trained_model, mini_images):
    predictor = load_predictor(str(trained_model))
    images = mini_images[:12]
    expected = [predictor.explain(image, heatmap=False).probabilities for image in images]
    real, running, most = predictor.engine, [0], [0]

    class Watching:
        name = real.name

        def __call__(self, pixels):
            running[0] += 1
            most[0] = max(most[0], running[0])
            time.sleep(0.01)  # long enough for another thread to try
            outputs = real(pixels)
            running[0] -= 1
            return outputs

    predictor.engine = Watching()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda image: predictor.explain(image, heatmap=False).probabilities, images))
    assert answers == expected and most[0] == 1
