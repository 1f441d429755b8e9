"""train_accelerate.py end to end: outputs, learning, resume, errors, two processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from catdog_model import CatDogClassifier, load_predictor
from catdog_model.training.data import load_image_dataset, load_split
from catdog_model.hardware import native_bf16
from conftest import MINI_DATASET, ROOT, assert_clean_error, train_in_process



def test_run_writes_every_output_file(trained_model):
    names = {path.name for path in trained_model.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "split.json", "README.md"} <= names
    metrics = json.loads((trained_model / "metrics.json").read_text())
    assert len(metrics["history"]) == 6 and json.loads((trained_model / "evaluation.json").read_text())["samples"] == 32
    assert metrics["args"]["epochs"] == 6 and metrics["seed"] == 42 and metrics["world_size"] == 1
    assert set(metrics["versions"]) >= {"torch", "timm", "accelerate"}
    # No --mixed-precision and no accelerate config: bf16 exactly where this CPU computes it natively.
    assert metrics["mixed_precision"] == ("bf16" if native_bf16() else "no")
    assert metrics["mixed_precision_reason"].startswith("default: the CPU")
    assert metrics["best_epoch"] == 1 + max(range(6), key=lambda i: metrics["history"][i]["val_accuracy"])


def test_loss_falls_and_32_images_are_overfitted(trained_model):
    history = json.loads((trained_model / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert max(row["train_accuracy"] for row in history) >= 0.95


def test_model_card_has_hub_metadata_and_the_test_accuracy(trained_model):
    evaluation = json.loads((trained_model / "evaluation.json").read_text())
    card = ModelCard.load(trained_model / "README.md")
    assert card.data.library_name == "catdog" and card.data.license == "mit"
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert card.data.eval_results[0].metric_value == evaluation["accuracy"]
    assert f"| test accuracy | {evaluation['accuracy']:.4f} |" in card.text
    assert "trained from scratch with 🤗 Accelerate" in card.text  # --no-pretrained: not "fine-tuned"
    assert card.data.model_name == trained_model.name  # the folder's name, never its absolute path
    assert "load_predictor(" in card.text


def test_saved_folder_loads_and_the_test_split_can_be_evaluated_again(trained_model, mini_dataset):
    model = CatDogClassifier.from_pretrained(trained_model)
    assert (model.image_size, model.labels) == (64, ("cat", "dog"))
    predictor = load_predictor(str(trained_model))
    test = load_split(trained_model / "split.json", load_image_dataset(str(mini_dataset)), "test").select(range(32))
    predictions = predictor.predict(list(test["image"]))
    accuracy = sum((p["dog"] > 0.5) == bool(y) for p, y in zip(predictions, test["labels"])) / len(test)
    assert accuracy == pytest.approx(json.loads((trained_model / "evaluation.json").read_text())["accuracy"])
    split = json.loads((trained_model / "split.json").read_text())
    assert not set(split["test"]) & (set(split["train"]) | set(split["validation"]))


def test_missing_dataset_is_one_clear_line(tmp_path):
    result = train_in_process(tmp_path / "out", "--dataset", str(tmp_path / "nowhere"), check=False)
    assert_clean_error(result, "error: Could not load the dataset")


@pytest.mark.slow
def test_imagenet_weights_offline_names_the_ways_out(tmp_path):
    # In a process of its own, as typed: the exit code and the one line, with no traceback.
    result = subprocess.run(
        [sys.executable, "train_accelerate.py", "--dataset", str(MINI_DATASET), "--output-dir", str(tmp_path / "out"),
         "--max-train-samples", "8", "--image-size", "64"],  # no --no-pretrained: it tries the Hub, offline
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert_clean_error(result, "Could not download the ImageNet weights", "--no-pretrained", "`hf download timm/resnet50.a1_in1k`")
    assert not (tmp_path / "out").exists()  # refused before it wrote anything: no folder left behind


def test_push_without_token_fails_before_training(tmp_path):
    result = train_in_process(tmp_path / "out", "--push-to-hub", "--hub-model-id", "me/catdog", check=False)
    assert_clean_error(result, "needs --hub-model-id and a token")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_push_failure_keeps_the_local_files(tmp_path):
    result = train_in_process(
        tmp_path / "out", "--backbone", "test_resnet", "--epochs", "1", "--max-train-samples", "8", "--max-eval-samples", "8",
        "--push-to-hub", "--hub-model-id", "me/catdog", "--hub-token", "hf_not_a_real_token", check=False,
    )
    assert_clean_error(result, "Could not push to me/catdog", "files are kept in")
    assert {"model.safetensors", "metrics.json", "README.md", "split.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert ", 1 epoch, batch size" in (tmp_path / "out" / "README.md").read_text()
    assert "--exclude 'checkpoints/*'" in result.stderr


def test_existing_model_is_not_overwritten(trained_model):
    before = (trained_model / "model.safetensors").stat().st_mtime_ns
    result = train_in_process(trained_model, "--epochs", "1", check=False)
    assert_clean_error(result, "already holds a model", "--overwrite-output-dir")
    assert (trained_model / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_bf16_mixed_precision_runs_and_saves_float32_weights(tmp_path):
    train_in_process(tmp_path / "out", "--backbone", "test_resnet", "--mixed-precision", "bf16", "--epochs", "1", "--batch-size", "4",
                 "--max-train-samples", "8", "--max-eval-samples", "8")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mixed_precision"] == "bf16" and metrics["mixed_precision_reason"] == "--mixed-precision"
    assert {tensor.dtype for tensor in load_file(tmp_path / "out" / "model.safetensors").values()} <= {torch.float32, torch.int64}


@pytest.mark.parametrize("flags, message", [
    (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    (("--epochs", "0"), "--epochs must be at least 1"),
    (("--max-train-samples", "0"), "--max-train-samples must be at least 1"),
    (("--max-eval-samples", "0"), "--max-eval-samples must be at least 1"),
    (("--gradient-accumulation-steps", "0"), "--gradient-accumulation-steps must be at least 1"),
    (("--checkpoints-total-limit", "0"), "--checkpoints-total-limit must be at least 1"),
    (("--num-workers", "-1"), "--num-workers must be 0 or more"),
    (("--learning-rate", "nan"), "--learning-rate must be a finite number above 0, got nan"),
    (("--learning-rate", "-0.1"), "--learning-rate must be a finite number above 0"),
    (("--learning-rate", "inf"), "--learning-rate must be a finite number above 0"),
    (("--image-size", "0"), "--image-size 0: image_size must be a positive whole number"),
    (("--image-size", "4096"), "billion weights"),
    (("--backbone", "resnet5O"), "timm has no model named 'resnet5O' (did you mean resnet50"),
    (("--backbone", "hf-hub:nobody/no-backbone"), "--backbone hf-hub:nobody/no-backbone: could not read its config"),
    (("--backbone", "resnet50.a1_in1k", "--image-size", "0"), "image_size must be a positive"),  # tagged names pass
    (("--overwrite-output-dir", "--resume-from-checkpoint", "latest"), "pick one"),
    (("--seed", "-1"), "--seed must be from 0 to 2**32 - 1, got -1"),
    (("--seed", str(2**64)), "--seed must be from 0 to 2**32 - 1"),
    (("--learning-rate", "1e308"), "--learning-rate must be a finite number above 0"),  # no float32 holds it
    (("--dataset", ""), "--dataset is empty"),
    (("--output-dir", " "), "--output-dir is empty"),
    (("--push-to-hub", "--hub-token", "hf_x", "--hub-model-id", "not a valid id"), "is not a valid Hub repo id"),
])
def test_every_flag_is_checked_before_any_work(flags, message):
    import train_accelerate
    from catdog_model.training.settings import parse_args
    with pytest.raises(train_accelerate.TrainingError) as error:
        train_accelerate.check_model_flags(parse_args(["--no-pretrained", *flags]))
    assert message in str(error.value)


def test_a_flag_argparse_cannot_read_is_one_line_with_a_pointer_to_help(capsys):
    from catdog_model.training.settings import parse_args
    with pytest.raises(SystemExit) as exit:
        parse_args(["--epochs", "ten"])
    message = capsys.readouterr().err
    assert exit.value.code == 2 and message.count("\n") == 1
    assert message == "error: argument --epochs: invalid int value: 'ten' (see --help)\n"


def test_help_shows_every_default():
    from catdog_model.training.settings import parse_args
    with pytest.raises(SystemExit), __import__("contextlib").redirect_stdout(__import__("io").StringIO()) as out:
        parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "(default: 10)" in text and "(default: microsoft/cats_vs_dogs)" in text and "505 MB each at 224 px" in text


def test_where_the_hub_does_not_answer_training_is_refused_before_its_libraries_load(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))  # a closed port: nothing answers
    result = subprocess.run([sys.executable, "-X", "importtime", "train_accelerate.py", "--output-dir", str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    line = "error: --dataset microsoft/cats_vs_dogs and ImageNet weights (or --no-pretrained) need the Hub"
    assert result.returncode == 1 and line in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    imported = {row.split("|")[-1].strip() for row in result.stderr.splitlines() if row.startswith("import time:")}
    assert "catdog_model.serving.files" in imported and not {"torch", "timm", "datasets"} & imported
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (("--backbone", "resnet5O"), "timm has no model named"),  # checked with the model's flags (above), before the data
    (("--checkpointing-steps", "0"), "--checkpointing-steps takes a number of steps (1 or more)"),
    (("--checkpointing-steps", "²"), "--checkpointing-steps takes a number of steps (1 or more)"),  # isdigit() took it
])
def test_bad_flags_fail_in_one_line_before_the_dataset_check(tmp_path, flags, message):
    result = train_in_process(tmp_path / "out", *flags, check=False)
    assert_clean_error(result, message)
    assert "Checking images" not in result.stderr and not (tmp_path / "out" / "split.json").exists()


def test_an_output_folder_that_cannot_be_written_fails_before_the_dataset_check(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = train_in_process(tmp_path / "a-file" / "out", check=False)
    assert_clean_error(result, "is not writable")
    assert "Checking images" not in result.stderr
    if os.geteuid() != 0:  # root writes anywhere, whatever the mode
        (tmp_path / "read-only").mkdir(mode=0o555)
        assert_clean_error(train_in_process(tmp_path / "read-only", check=False), "is not writable")


def test_split_file_records_the_rows_actually_used(trained_model):
    split = json.loads((trained_model / "split.json").read_text())
    assert {len(split["used"][name]) for name in ("train", "validation", "test")} == {32}
    assert len(split["train"]) == 2160 and set(split["used"]["test"]) <= set(split["test"])


def test_model_card_names_the_local_dataset_its_hash_and_how_to_load_this_folder(trained_model):
    card = (trained_model / "README.md").read_text()
    metrics = json.loads((trained_model / "metrics.json").read_text())
    assert f"the local folder `cats_vs_dogs_mini` ({metrics['dataset_fingerprint'][:23]}…)" in card
    assert "main, unpinned" not in card and f'load_predictor("{trained_model.name}")' in card
    assert "6 epochs" in card
