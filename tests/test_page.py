"""The Space's handlers, page text and settings, called directly: app.Space and build_demo with a predictor
the test controls, and the verdict rule they all share."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, in_process

CAT_PHOTO = str(ROOT / "examples" / "chelsea_cat.jpg")


class FixedPredictor:
    """Answers every picture with the same probabilities (and, unless told, says it looks like the training photos)."""

    labels, image_size, batch_size, ood_threshold = ("cat", "dog"), 64, 16, 1.0
    source, revision, backbone, engine_name = "someone/catdog", None, "resnet50", "openvino-bf16"
    files = SimpleNamespace(local=False)
    metrics: dict = {}
    evaluation: dict = {}

    def __init__(self, p_dog: float, looks_right: bool = True):
        self.p_dog, self.looks_right = p_dog, looks_right

    def explain(self, picture, heatmap=True):
        from PIL import Image

        from catdog_model import Explanation, open_image

        open_image(picture, max_megabytes=10)  # the real predictor's checks of the file
        return Explanation({"cat": 1 - self.p_dog, "dog": self.p_dog}, 0.0 if self.looks_right else 9.0,
                           self.looks_right, overlay=Image.new("RGB", (384, 255)) if heatmap else None)

    def model_input(self, picture):
        from catdog_model import open_image

        open_image(picture, max_megabytes=10)  # the real predictor's checks of the file
        return np.zeros((3, self.image_size, self.image_size), np.uint8)

    def explain_inputs(self, inputs):
        from catdog_model import Explanation

        return [Explanation({"cat": 1 - self.p_dog, "dog": self.p_dog}, 0.0 if self.looks_right else 9.0, self.looks_right)
                for _ in inputs]

    def model_file(self, name):
        return None


class NoProgress:
    tqdm = staticmethod(lambda items, **kwargs: items)


def _space(predictor, tmp_path=None, monkeypatch=None):
    import app

    if monkeypatch is not None:
        monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where a batch's CSV goes
    return app.Space(predictor)


@pytest.mark.parametrize("p_dog, looks_right, answer", [(0.55, True, "not sure"), (0.31, True, "not sure"),
                                                          (0.95, True, "dog"), (0.05, True, "cat"), (0.97, False, "neither")])
def test_one_verdict_on_the_page_in_the_api_and_in_the_batch_and_its_csv(tmp_path, monkeypatch, p_dog, looks_right, answer):
    from catdog_model import decide

    space = _space(FixedPredictor(p_dog, looks_right), tmp_path, monkeypatch)
    assert decide({"cat": 1 - p_dog, "dog": p_dog}, looks_right).answer == answer
    bars, status, verdict, heatmap = space.predict_on_page(CAT_PHOTO)
    assert bars["value"] == {"cat": 1 - p_dog, "dog": p_dog} and verdict["visible"] and not status["visible"]
    assert bars["label"] == ("If it were a cat or a dog" if answer == "neither" else "Probabilities")
    assert {"not sure": "Not sure", "neither": "Neither a cat nor a dog"}.get(answer, answer.capitalize()) in verdict["value"]
    ranked = sorted([("cat", 1 - p_dog), ("dog", p_dog)], key=lambda item: -item[1])
    assert space.predict(CAT_PHOTO) == {"label": answer, "confidences": [{"label": k, "confidence": v} for k, v in ranked]}
    assert space.explain(CAT_PHOTO)["verdict"] == answer and space.explain(CAT_PHOTO)["label"] == ("dog" if p_dog > 0.5 else "cat")
    rows, csv_path = space.predict_batch([CAT_PHOTO], progress=NoProgress())
    assert rows[0][1] == answer and (rows[0][4] == "") == (answer in ("cat", "dog"))
    with open(csv_path, newline="") as file:
        assert list(csv.reader(file))[1][1] == answer
    assert heatmap.size == (384, 255)  # the predictor's overlay, shown as it is


def test_a_label_is_text_on_the_page_never_markup():
    class Odd(FixedPredictor):
        labels = ("<img src=x onerror=alert(1)>", "dog")

        def explain(self, picture, heatmap=True):
            explanation = super().explain(picture)
            explanation.probabilities = {"<img src=x onerror=alert(1)>": 0.6, "dog": 0.4}  # "not sure": named
            return explanation

    _, _, verdict, _ = _space(Odd(0.4)).predict_on_page(CAT_PHOTO)
    assert "Not sure" in verdict["value"] and "&lt;img src=x onerror=alert(1)&gt;" in verdict["value"]
    assert "<img" not in verdict["value"]


def test_the_page_shows_problems_inline_instead_of_raising(tmp_path):
    import app

    (tmp_path / "notes.jpg").write_text("not a picture")
    assert _space(FixedPredictor(0.9)).predict_on_page(str(tmp_path / "notes.jpg"))[1]["value"].startswith(
        "⚠️ **Cannot read this file.**")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (app.MAX_FILE_MB * 2**20 + 1))
    status = _space(FixedPredictor(0.9)).predict_on_page(str(big))[1]["value"]
    assert status.startswith("⚠️ **Too large.** The file is 10.0 MB; the limit is 10 MB a picture.")
    assert "Choose a picture first" in _space(FixedPredictor(0.9)).predict_on_page(None)[1]["value"]
    result, status, _, heatmap = app.Space(None, "it is gone").predict_on_page(CAT_PHOTO)
    assert result is None and heatmap is None
    assert "No model is loaded" in status["value"] and "make demo" in status["value"]


def test_classify_with_nothing_chosen_says_so_inline_on_both_tabs(tmp_path, monkeypatch):
    space = _space(FixedPredictor(0.9), tmp_path, monkeypatch)
    assert "Choose a picture first" in space.predict_on_page(None)[1]["value"]
    table, csv_file, status = space.predict_batch_on_page(None, progress=NoProgress())
    assert "Choose one or more pictures first" in status["value"] and csv_file["visible"] is False


def test_a_batch_takes_at_most_100_files_on_the_page_and_in_the_api(tmp_path, monkeypatch):
    import gradio as gr

    space = _space(FixedPredictor(0.95), tmp_path, monkeypatch)
    rows, _ = space.predict_batch([CAT_PHOTO] * 100, progress=NoProgress())
    assert len(rows) == 100 and {row[1] for row in rows} == {"dog"}
    with pytest.raises(gr.Error, match="At most 100 files at a time"):
        space.predict_batch([CAT_PHOTO] * 101, progress=NoProgress())
    table, csv_file, status = space.predict_batch_on_page([CAT_PHOTO] * 101, progress=NoProgress())
    assert "At most 100 files at a time" in status["value"] and csv_file["visible"] is False


def test_the_batch_reads_each_chunk_as_one_forward_pass(tmp_path, monkeypatch):
    calls = []

    class Counting(FixedPredictor):
        def explain_inputs(self, inputs):
            calls.append(len(inputs))
            return super().explain_inputs(inputs)

    predictor = Counting(0.9)
    predictor.batch_size = 4
    rows, _ = _space(predictor, tmp_path, monkeypatch).predict_batch([CAT_PHOTO] * 10, progress=NoProgress())
    assert calls == [4, 4, 2] and [row[1] for row in rows] == ["dog"] * 10


def test_the_demonstration_notice_reads_the_models_own_files():
    from catdog_model.serving.describe import demonstration_notice

    weak = FixedPredictor(0.5)
    weak.metrics = {"pretrained": False, "dataset": "cats_vs_dogs_mini", "split_sizes": {"train": 2160}}
    weak.evaluation = {"accuracy": 0.6633, "samples": 300}
    notice = demonstration_notice(weak)
    assert "demonstration model" in notice and "from scratch" in notice and "2,160 photos" in notice
    assert "**66%**" in notice and "64 px" in notice
    strong = FixedPredictor(0.5)
    strong.metrics, strong.evaluation = {"pretrained": True}, {"accuracy": 0.984, "samples": 4652}
    assert demonstration_notice(strong) is None
    unmeasured = FixedPredictor(0.5)
    unmeasured.metrics = {"pretrained": True}
    assert "recorded no test accuracy" in demonstration_notice(unmeasured)
    strong.evaluation["accuracy"] = 0.85
    assert "**85%**" in demonstration_notice(strong) and "from scratch" not in demonstration_notice(strong)


def test_how_good_is_this_model_says_what_the_page_would_have_answered_on_the_test_photos():
    from catdog_model.serving.describe import report

    evaluated = FixedPredictor(0.5)
    evaluated.evaluation = {"accuracy": 0.6633, "samples": 300, "ece": 0.077,
                            "verdicts": {"right": 67, "wrong": 14, "not sure": 203, "neither": 16}}
    text, figures = report(evaluated)
    assert "**66.3%** of 300 photos" in text and "give or take 7.7%" in text and figures == []
    assert "**67** right and **14** wrong with confidence, **203** \"not sure\" and **16** \"neither\"" in text


@pytest.mark.parametrize("metrics, evaluation", [
    ({"dataset": 123, "pretrained": "no", "split_sizes": {"train": "2160"}},
     {"accuracy": "0.9", "samples": 300.5, "ece": None, "verdicts": {"right": 1, "wrong": "2"}}),
    ({"dataset": None, "split_sizes": [2160]}, {"accuracy": float("nan"), "verdicts": [1, 2, 3, 4]}),
    ({"split_sizes": {"train": True}}, {"accuracy": True}), ([], "not a dict")])
def test_a_report_field_of_another_type_leaves_its_sentence_out_never_the_page(metrics, evaluation):
    """metrics.json and evaluation.json only describe the model; another version may write their fields otherwise."""
    import app
    from catdog_model.serving.describe import demonstration_notice, headline, report

    odd = FixedPredictor(0.5)
    odd.metrics, odd.evaluation = metrics, evaluation
    assert headline(odd) == "A resnet50 trained, at 64 px, tells which it is."
    assert "recorded no test accuracy" in demonstration_notice(odd) and "on photos at 64 px" in demonstration_notice(odd)
    assert report(odd) == ("This model recorded no evaluation (no evaluation.json next to its weights, or no accuracy "
                           "in it).", [])
    assert "How good is this model?" in str(app.build_demo(odd).config)
    odd.evaluation = {"accuracy": 0.75, "samples": "300", "ece": "0.1", "verdicts": {"right": 1, "wrong": "2"}}
    assert report(odd)[0] == "Right on **75.0%** of its photos held out from training."


def test_the_files_the_app_keeps_stay_within_the_budget_the_oldest_removed_first(tmp_path):
    """Everything in Gradio's cache counts against $CATDOG_UPLOADS_MB (uploads, results, abandoned uploads, pictures
    an MCP client sent inline) but the files Gradio keeps for good, which neither count nor go."""
    import app
    from catdog_model.serving.space_files import keep_under_budget, kept_files, remove_expired

    demo, cache = app.build_demo(FixedPredictor(0.5)), tmp_path
    files = []
    for age in range(6, 0, -1):  # 30 MB each, 6 s old down to 1 s (sparse: no real disk)
        path = cache / ("tmpabandoned" if age == 3 else f"hash{age}/{'example.jpg' if age == 6 else 'upload.png'}")
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as file:
            file.truncate(30 * 2**20)
        os.utime(path, (time.time() - age,) * 2)
        files.append(path)
    next(iter(demo.blocks.values())).keep_in_cache.add(str(files[0]))  # as Gradio marks a component's own value
    keep_under_budget(kept_files(demo, cache), cache, 100 * 2**20)
    assert [path.exists() for path in files] == [True, False, False, True, True, True]
    assert not (cache / "hash5").exists() and sorted(p.name for p in cache.iterdir()) == ["hash1", "hash2", "hash6",
                                                                                           "tmpabandoned"]
    remove_expired(kept_files(demo, cache), 1.5, cache)  # past a TTL of 1.5 s: all but the newest
    assert [path.exists() for path in files] == [True, False, False, False, False, True]


def test_the_engine_is_named_in_plain_words_with_the_details_alongside():
    from catdog_model.serving.describe import details

    assert "a fast CPU engine (OpenVINO, bfloat16 arithmetic" in details(FixedPredictor(0.5))
    assert "`openvino-bf16`" in details(FixedPredictor(0.5))


@pytest.mark.slow
def test_importing_the_app_loads_nothing_and_reads_no_setting():
    env = {**os.environ, "CATDOG_CONCURRENCY": "abc", "CATDOG_MODEL": "no/such-model"}
    code = "import sys, app\nassert 'torch' not in sys.modules and 'openvino_model.xml' not in str(vars(app))\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok" and "loading the model" not in result.stderr, result.stderr


@pytest.mark.parametrize("name, value", [("CATDOG_CONCURRENCY", "abc"), ("CATDOG_CONCURRENCY", "0"),
                                         ("CATDOG_CONCURRENCY", "-1"), ("CATDOG_THREADS", "abc"), ("CATDOG_THREADS", "0"),
                                         ("CATDOG_THREADS", "2147483648"), ("CATDOG_MALLOC_ARENAS", "x"),
                                         ("CATDOG_MALLOC_ARENAS", "99999999999999999999"), ("CATDOG_UPLOAD_TTL", "0"),
                                         ("CATDOG_UPLOADS_MB", "49")])
def test_a_setting_that_cannot_work_stops_the_app_in_one_line(name, value, monkeypatch):
    import app

    monkeypatch.setenv(name, value)
    monkeypatch.setenv("CATDOG_MODEL", "no/such-model")  # --check: a setting let through ends at the model, not a server
    result = in_process(lambda: app.main(["--check"]), ["app.py", "--check"])
    assert result.returncode == 1 and f"${name} must be" in result.stderr and repr(value) in result.stderr


@pytest.mark.slow
def test_a_bad_setting_stops_python_app_py_as_typed_in_one_line():
    env = {**os.environ, "CATDOG_THREADS": "abc", "CATDOG_MODEL": "no/such-model"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: $CATDOG_THREADS must be a whole number from 1 to 1024, "
                                                      "got 'abc' (see the settings table in README.md)")


def test_an_empty_model_is_an_error_not_another_model(capsys):
    import app

    with pytest.raises(SystemExit) as exit:
        app._model_source(["--model", ""])
    assert exit.value.code == 1 and "--model is empty" in capsys.readouterr().err


def test_hub_warnings_are_logged_once_in_the_shared_format():
    code = ("from catdog_model.cli import setup_logging\nsetup_logging()\nfrom huggingface_hub.utils import logging\n"
            "logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if "Retrying in 1s" in line]
    assert len(lines) == 1 and "WARNING huggingface_hub.utils._http:" in lines[0], result.stderr[-2000:]


def test_every_example_is_credited_and_captioned_and_all_three_kinds_are_there():
    import app

    pictures, captions = app._examples()
    shipped = sorted(p.name for p in (ROOT / "examples").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    assert sorted(os.path.basename(p) for p in pictures) == shipped  # none uncredited, none credited but missing
    kinds = [caption.split(":")[0] for caption in captions]
    assert kinds.count("Cat") >= 3 and kinds.count("Dog") >= 3 and kinds.count("Neither") >= 2
    credits = (ROOT / "examples" / "README.md").read_text()
    for name in shipped:
        row = next(line for line in credits.splitlines() if line.startswith(f"| `{name}` |"))
        assert len([cell for cell in row.split("|") if cell.strip()]) == 4  # file, caption, source, licence


@pytest.mark.parametrize("name", [" =1+1", "\u3000=1+1", "\ufeff=1+1", "＝1+1", "＋1", "\t=1", "@SUM(A1)"])
def test_a_file_name_a_spreadsheet_would_run_as_a_formula_is_kept_as_text(name):
    from catdog_model.predict import neutralised  # the batch tab's and the batch command's one guard

    assert neutralised(name) == "'" + name
    assert neutralised("a\nb\r.jpg") == "a b .jpg" and neutralised("cat.jpg") == "cat.jpg"


def _make(*args: str, env: dict) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent  # this environment plays the installed one: nothing is installed
    return subprocess.run(["make", "-s", "-o", f"{venv}/.runtime", "-o", f"{venv}/.train", f"VENV={venv}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_make_demo_with_no_model_no_hub_and_no_dataset_says_what_it_needs_in_seconds(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))  # a closed port: nothing answers
    start = time.monotonic()
    checked = subprocess.run([sys.executable, "app.py", "--check"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 1 and "the Hugging Face Hub cannot be reached" in checked.stderr
    result = _make("demo-model", "DATASET=", env=env)
    assert time.monotonic() - start < 20 and result.returncode != 0
    assert "no model to serve, the Hub does not answer, and no local copy of the dataset" in result.stderr
    assert "DATASET=path/to/cats_vs_dogs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("p, said", [(0.697, "Not sure: the model leans to cat, with only 69.7%."), (0.703, "Cat, 70.3% sure."),
                                     (0.6996, "Not sure: the model leans to cat, with only 69.96%."), (0.81, "Cat, 81% sure.")])
def test_a_confidence_near_the_line_shows_the_digits_that_put_it_on_its_side(p, said):
    from catdog_model import decide

    assert decide({"cat": p, "dog": 1 - p}).sentence() == said
