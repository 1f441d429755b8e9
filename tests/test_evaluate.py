"""The evaluation report: its numbers, its figures, and their agreement with metrics.json and the card."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from catdog_model.config import REPORT_FIGURES
from catdog_model.training.evaluate import compute_metrics
from conftest import ROOT, assert_clean_error, in_process


def test_metrics_on_known_logits():
    logits = torch.tensor([-3.0, -1.0, 2.0, 0.5, -0.2, 4.0])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    ood = {"threshold": 1.0, "in_scores": torch.zeros(6), "out_scores": torch.tensor([])}
    results = compute_metrics(logits, labels, temperature=2.0, class_names=("cat", "dog"), ood=ood)
    assert results["accuracy"] == pytest.approx(4 / 6)
    assert results["confusion_matrix"]["counts"] == [[2, 1], [1, 2]]  # rows true cat/dog, columns predicted
    # Pairs (dog, cat) ranked right: of 3×3, only (dog -0.2, cat 0.5) and (dog -0.2, cat -1.0)... -0.2 > -1.0 is right.
    assert results["roc_auc"] == pytest.approx(8 / 9)
    assert results["loss"] == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())))
    assert results["loss_calibrated"] != results["loss"] and results["temperature"] == 2.0


def test_the_report_counts_what_the_space_would_answer():
    logits, labels = torch.tensor([3.0, -3.0, 0.1, 2.0, -2.0]), torch.tensor([1, 1, 0, 0, 0])
    ood = {"threshold": 1.0, "in_scores": torch.tensor([0.5, 0.5, 0.5, 2.0, 0.2]), "out_scores": torch.tensor([])}
    # dog 95% right, cat 95% wrong, 52% not sure, unlike the training photos, cat 88% right
    assert compute_metrics(logits, labels, 1.0, ("cat", "dog"), ood)["verdicts"] == {
        "right": 2, "wrong": 1, "not sure": 1, "neither": 1}


def test_ood_auroc_is_rank_based_and_counts_what_is_flagged():
    inside, outside = torch.tensor([0.5, 1.0, 1.5, 2.0]), torch.tensor([1.8, 3.0, 40.0])
    results = compute_metrics(torch.zeros(4), torch.tensor([0, 1, 0, 1]), 1.0, ("cat", "dog"),
                              ood={"threshold": 1.9, "in_scores": inside, "out_scores": outside})
    assert results["ood"]["auroc"] == pytest.approx(11 / 12)  # only (2.0 inside, 1.8 outside) is out of order
    assert results["ood"]["flagged_in_distribution"] == 0.25 and results["ood"]["flagged_out_of_distribution"] == pytest.approx(2 / 3)


def test_training_writes_the_report_once_and_the_card_reads_it(trained_model):
    metrics = json.loads((trained_model / "metrics.json").read_text())
    evaluation = json.loads((trained_model / "evaluation.json").read_text())
    card = (trained_model / "README.md").read_text()
    assert "test" not in metrics and "evaluation" not in metrics  # how good it is lives in evaluation.json alone
    assert evaluation["samples"] == 32
    assert sum(map(sum, evaluation["confusion_matrix"]["counts"])) == 32
    for number in (evaluation["accuracy"], evaluation["loss"], evaluation["roc_auc"], evaluation["ece"]):
        assert f"{number:.4f}" in card
    assert f"{evaluation['ood']['auroc']:.3f}" in card and f"{evaluation['ood']['threshold']:.3f}" in card
    assert evaluation["figures"] == list(REPORT_FIGURES)
    for figure in evaluation["figures"]:
        assert f"]({figure})" in card
        with Image.open(trained_model / figure) as image:
            assert image.format == "PNG" and image.width > 300


def _evaluate(*args: str):
    from catdog_model.training import evaluate

    return in_process(lambda: evaluate.main(list(args)), list(args))


@pytest.mark.slow
def test_the_command_reproduces_the_training_runs_numbers_with_the_serving_engine(trained_model, mini_dataset, tmp_path):
    result = _evaluate(str(trained_model), "--dataset", str(mini_dataset), "--output-dir", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with openvino-" in result.stderr
    ours = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    training = json.loads((trained_model / "evaluation.json").read_text())
    assert ours["samples"] == training["samples"]
    # The command evaluates the shipped engine (int8 weights, bf16 where native), training its torch model: they
    # agree to the engine's parity (|ΔP| ≤ 0.01), and this barely trained model's ranking is mostly ties near 0.5.
    assert ours["accuracy"] == pytest.approx(training["accuracy"], abs=1 / 32)
    for key, tolerance in (("loss", 2e-3), ("roc_auc", 0.02), ("ece", 0.01)):
        assert ours[key] == pytest.approx(training[key], abs=tolerance)
    assert ours["ood"]["out_of_distribution_images"] == training["ood"]["out_of_distribution_images"]
    assert ours["ood"]["auroc"] == pytest.approx(training["ood"]["auroc"], abs=0.02)
    assert (tmp_path / "report" / "mistakes.png").is_file()


@pytest.mark.slow
def test_the_command_fails_in_one_line(tmp_path, mini_dataset):
    typed = subprocess.run([sys.executable, "-m", "catdog_model.training.evaluate", str(tmp_path / "no-such-model"),
                            "--output-dir", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_clean_error(typed, "No such model folder")  # as typed, in a process of its own: exit code 1, one line
    assert_clean_error(_evaluate(str(ROOT / "examples"), "--dataset", str(mini_dataset), "--output-dir", str(tmp_path / "r")),
                       "has no config.json")


@pytest.mark.slow
def test_every_input_is_checked_before_the_evaluation(trained_model, mini_dataset, tmp_path):
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    bad_json, a_list, no_used = (tmp_path / name for name in ("bad.json", "list.json", "no-used.json"))
    bad_json.write_text("{not json")
    a_list.write_text("[1, 2]")
    no_used.write_text(json.dumps({"train": [1], "test": [2]}))
    other_seed = tmp_path / "other-seed.json"
    other_seed.write_text(json.dumps({**json.loads((trained_model / "split.json").read_text()), "seed": 7}))
    common = (str(trained_model), "--dataset", str(mini_dataset))
    for flags, message in (
        (("--output-dir", str(a_file)), "is not a writable folder"),
        (("--output-dir", str(tmp_path / "r"), "--split-file", str(bad_json)), "is not a readable split.json"),
        (("--output-dir", str(tmp_path / "r"), "--split-file", str(a_list)), "is not a split.json written by"),
        (("--output-dir", str(tmp_path / "r"), "--split-file", str(no_used)), "is not a split.json written by"),
        (("--output-dir", str(tmp_path / "r"), "--split-file", str(other_seed)), "was made with --seed 7, but the model"),
        (("--output-dir", str(tmp_path / "r"), "--dataset", "./nope"), "--dataset ./nope: no such folder"),
    ):
        result = _evaluate(*common, *flags)
        assert_clean_error(result, message)
        assert "evaluating" not in result.stderr  # refused before the first picture was classified
    assert not (tmp_path / "r" / "evaluation.json").exists()


def _split_with(trained_model, path, **used):
    split = json.loads((trained_model / "split.json").read_text())
    path.write_text(json.dumps({**split, "used": {**split["used"], **used}}))
    return path


def test_a_split_that_repeats_a_row_or_holds_training_rows_is_refused(trained_model, mini_dataset, tmp_path):
    split = json.loads((trained_model / "split.json").read_text())
    common = (str(trained_model), "--dataset", str(mini_dataset), "--output-dir", str(tmp_path / "r"))
    repeated = _split_with(trained_model, tmp_path / "repeated.json", test=[split["used"]["test"][0]] * 50)
    assert_clean_error(_evaluate(*common, "--split-file", str(repeated)), "lists 49 of its 50 test rows more than once")
    trained_on = _split_with(trained_model, tmp_path / "trained-on.json", test=split["train"][:30])
    assert_clean_error(_evaluate(*common, "--split-file", str(trained_on)),
                       "30 of its test rows are rows the model was trained or calibrated on")
    assert not (tmp_path / "r" / "evaluation.json").exists()


def test_the_models_own_split_is_checked_against_its_manifest(trained_model, mini_dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    split = json.loads((model / "split.json").read_text())
    _split_with(trained_model, model / "split.json", test=split["train"][:32])  # an edit that would flatter it
    result = _evaluate(str(model), "--dataset", str(mini_dataset), "--output-dir", str(tmp_path / "r"))
    assert_clean_error(result, "split.json is not the file its training run wrote")

