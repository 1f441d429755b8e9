"""'Neither a cat nor a dog', Grad-CAM and predictor.explain(), on the session's trained model."""

import json
import shutil

import numpy as np
import pytest
import torch
from datasets import load_dataset
from PIL import Image, ImageDraw

from catdog_model import CatDogClassifier, ModelLoadError, load_predictor
from catdog_model.config import OOD_FILE
from catdog_model.images import model_input
from catdog_model.training.export import ServingGraph
from conftest import ROOT, complete_folder


@pytest.fixture(scope="module")
def predictor(trained_model):
    return load_predictor(str(trained_model))


@pytest.fixture(scope="module")
def mini_rows(mini_dataset):
    return load_dataset(str(mini_dataset), split="train")


def _not_pets() -> dict[str, Image.Image]:
    """Made here, with their own seed: not the synthetic pictures the training run scored itself."""
    rng = np.random.default_rng(123)
    page = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(page)
    for y in range(4, 240, 12):
        draw.text((4, y), "the quick brown fox jumps over the lazy dog 0123456789", fill="black")
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),
        "fine noise, grey": Image.fromarray(rng.integers(0, 256, (500, 500), dtype=np.uint8)),
        "flat red": Image.new("RGB", (320, 240), (200, 30, 30)),
        "flat white": Image.new("RGB", (640, 480), "white"),
        "flat dark blue": Image.new("RGB", (100, 300), (10, 20, 60)),
        "text": page,
    }


@pytest.mark.parametrize("name", list(_not_pets()))
def test_noise_flat_colour_and_text_are_neither(predictor, name):
    explanation = predictor.explain(_not_pets()[name])
    assert explanation.is_cat_or_dog is False
    assert explanation.ood_score > predictor.ood_threshold


@pytest.mark.slow
def test_few_real_photos_of_the_test_split_are_flagged(predictor, trained_model, mini_rows):
    test_rows = json.loads((trained_model / "split.json").read_text())["test"]  # the whole test split: 300 photos
    flagged = [not predictor.explain(mini_rows[row]["image"]).is_cat_or_dog for row in test_rows]
    assert len(flagged) == 300 and np.mean(flagged) <= 0.08  # the threshold is the 95th percentile: about 5%


def test_threshold_is_the_validation_splits_95th_percentile(predictor, trained_model, mini_rows):
    config = json.loads((trained_model / "config.json").read_text())
    evaluation = json.loads((trained_model / "evaluation.json").read_text())
    assert config["ood_threshold"] == evaluation["ood"]["threshold"] == predictor.ood_threshold
    validation = json.loads((trained_model / "split.json").read_text())["used"]["validation"]
    scores = np.array([predictor.explain(mini_rows[row]["image"]).ood_score for row in validation])
    # The predictor's scores are the training run's: 5% of the validation split lie above, to one picture.
    assert abs(np.mean(scores > config["ood_threshold"]) - 0.05) <= 1 / len(scores)


def test_a_missing_or_foreign_detector_file_is_a_clear_load_error(trained_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(trained_model, copy)
    (copy / OOD_FILE).unlink()
    with pytest.raises(ModelLoadError, match="ood.safetensors is missing"):
        load_predictor(str(copy))
    from safetensors.numpy import load_file, save_file

    save_file({name: values * 1.5 for name, values in load_file(str(trained_model / OOD_FILE)).items()}, str(copy / OOD_FILE))
    with pytest.raises(ModelLoadError, match="ood.safetensors is not the file its training run wrote"):
        load_predictor(str(copy))


@pytest.mark.parametrize("size, shape", [((300, 150), (32, 64)), ((150, 300), (64, 32)), ((64, 64), (64, 64))])
def test_heatmap_has_the_pictures_aspect_ratio_and_is_a_normalised_map(predictor, mini_rows, size, shape):
    heatmap = predictor.explain(mini_rows[0]["image"].resize(size)).heatmap
    assert heatmap.shape == shape and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0, abs=1e-5) and heatmap.std() > 0.01


def _centre_x(heatmap: np.ndarray) -> float:
    columns = heatmap.sum(axis=0)
    return float((columns * np.arange(len(columns))).sum() / columns.sum() / len(columns))


@pytest.mark.slow
def test_heatmap_moves_when_the_animal_moves(mini_rows, tmp_path):
    """A photo pasted on the left, then on the right of a plain canvas: the heatmap's centre follows it.

    The model's head scores the total activation anywhere in the picture, so its evidence sits where
    there is something to see. (A random-init backbone fine-tuned on a few dozen photos, like the
    session's model, gives maps too flat for this: its head has not learnt where to look.)
    """
    torch.manual_seed(0)
    model = CatDogClassifier(image_size=128, hidden_size=8)
    channels, cells = model.head[1].in_features // 16, 16
    with torch.no_grad():
        model.head[1].weight.zero_()
        model.head[1].weight[0] = 1.0 / (channels * cells)  # hidden unit 0: the mean of the whole feature map
        model.head[1].bias.zero_()
        model.head[4].weight.zero_()
        model.head[4].weight[0, 0] = 1.0
    complete_folder(model, tmp_path)
    predictor = load_predictor(str(tmp_path))
    for row in (0, 1200, 1800, 2900):  # cats and dogs
        photo = mini_rows[row]["image"].convert("RGB").resize((200, 200))
        centres = []
        for left in (0, 400):
            canvas = Image.new("RGB", (600, 200), (124, 116, 104))  # ImageNet's mean colour: plain to the model
            canvas.paste(photo, (left, 0))
            centres.append(_centre_x(predictor.explain(canvas).heatmap))
        assert centres[0] < 0.4 and centres[1] > 0.6


def test_grad_cam_equals_captums_layer_grad_cam(trained_model, mini_rows):
    from captum.attr import LayerGradCam

    model = CatDogClassifier.from_pretrained(str(trained_model)).eval()  # captum needs autograd: the fp32 model
    pixels = torch.stack([torch.from_numpy(model_input(mini_rows[row]["image"], model.image_size)) for row in
                          (0, 1600, 2999, 700)]).float() / 255
    with torch.no_grad():
        logits, ours = ServingGraph(model)(pixels)[:2]  # the logits and the heatmaps
    sign = torch.where(logits >= 0, 1.0, -1.0)
    reference = LayerGradCam(lambda x: model(x) * sign, model.backbone).attribute(pixels, relu_attributions=True)
    reference = reference[:, 0] / reference.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference.detach(), atol=1e-4, rtol=1e-3)


def test_explain_agrees_with_predict_and_refuses_what_is_not_a_picture(predictor, mini_rows):
    image = mini_rows[42]["image"]
    explained, predicted = predictor.explain(image).probabilities, predictor.predict([image])[0]
    assert explained.keys() == predicted.keys()
    assert all(explained[label] == pytest.approx(predicted[label], abs=1e-5) for label in predicted)
    with pytest.raises(TypeError, match="expected a PIL image, a file path or a file.s bytes"):
        predictor.explain(42)


@pytest.mark.slow
def test_one_file_one_answer_whichever_way_python_hands_it_over(predictor, mini_dataset, tmp_path):
    """A path, the file's bytes, or a PIL image opened lazily as a script does: the same decode (JPEG draft mode
    included), so the same probabilities, bit for bit at one batch size. One picture alone agrees to rounding:
    OpenVINO picks its CPU kernels by batch size, and on some CPUs they round differently."""

    rows = load_dataset(str(mini_dataset), split="train")
    paths = sorted((ROOT / "examples").glob("*.jpg"))
    for index in range(0, 3000, 30):
        rows[index]["image"].save(tmp_path / f"{index}.jpg", quality=90)
        paths.append(tmp_path / f"{index}.jpg")
    by_path = predictor.predict([str(path) for path in paths])
    by_bytes = predictor.predict([path.read_bytes() for path in paths])
    lazily = predictor.predict([Image.open(path) for path in paths])
    one_by_one = [predictor.explain(str(path), heatmap=False).probabilities for path in paths[:20]]
    assert by_path == by_bytes == lazily
    assert all(alone == pytest.approx(batched, abs=1e-3) for alone, batched in zip(one_by_one, by_path[:20]))
