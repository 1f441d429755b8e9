"""The Hub round trip over real HTTP, against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py):
a dataset pushed and trained on by its Hub id at a tag, the model pushed and pulled into fresh caches, its
card, the Space serving it by id and by tag, and a push the server drops midway.

Each step runs in its own process, as a user would run it: huggingface_hub and datasets read HF_ENDPOINT
when they are imported, and every step gets an empty Hugging Face cache of its own.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from catdog_model.config import INT8_IR_FILES, IR_FILES, SPACE_FILES
from catdog_model.hardware import int8_pays, native_bf16
from harness import start_app as start_server
from conftest import MINI_DATASET, ROOT, assert_clean_error, training_command

pytestmark = pytest.mark.slow  # two training runs, uploads and downloads: about 3 minutes
SERVING_FILES = set(SPACE_FILES)  # config.json, the engines, the detector, the report: never model.safetensors


def _start_hub(folder: Path, stop_on: str = "") -> tuple[str, subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (folder / "mirrors").mkdir(parents=True)
    (folder / "hub.toml").write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"
mirrors-path = ["{folder / 'mirrors'}"]
repos-path = "{folder / 'repos'}"
metadata-cache-ttl = 0

[accessibility]
offline = true
""")  # upstream: port 9 on loopback, closed, so that nothing is ever asked of the real Hub
    env = {**os.environ, "CATDOG_HUB_STOP_ON": stop_on}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), "--config", str(folder / "hub.toml"),
                                "--log-path", str(folder / "logs")], cwd=folder, env=env,
                               stdout=open(folder / "hub.log", "w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/whoami-v2", timeout=2).status_code == 200:
                return url, process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the Hub server did not start:\n{(folder / 'hub.log').read_text()[-3000:]}")


def _hub_env(url: str, home: Path) -> dict:
    """A process's view of the Hub: this server, a token, no Xet, and an empty cache of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "CATDOG_"))}
    return {**env, "HF_ENDPOINT": url, "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
            "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}  # spelled out: the app's launcher starts from the tests' own


def _python(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    url, process = _start_hub(folder)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """A 200-row dataset pushed and tagged v1, a model trained on it by Hub id and pushed (tagged v1), then a
    second model pushed over it (tagged v2)."""
    work = tmp_path_factory.mktemp("round-trip")
    _python(f"""
import datasets
from huggingface_hub import HfApi
rows = datasets.load_dataset({str(MINI_DATASET)!r}, split="train")
rows.select([*range(0, 100), *range(1500, 1600)]).push_to_hub("user/catdog-data")
HfApi().create_tag("user/catdog-data", tag="v1", repo_type="dataset")
""", _hub_env(hub, work / "hf-data"), work)
    for tag, seed in (("v1", "1"), ("v2", "2")):
        command = training_command(work / tag, "--backbone", "test_resnet", "--epochs", "1", "--max-train-samples", "32",
                                   "--max-eval-samples", "16", "--seed", seed, "--push-to-hub", "--hub-model-id", "user/catdog")
        command[command.index("--dataset") + 1:command.index("--dataset") + 2] = ["user/catdog-data", "--dataset-revision", "v1"]
        result = subprocess.run(command, cwd=ROOT, env=_hub_env(hub, work / f"hf-train-{tag}"), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        _python(f"from huggingface_hub import HfApi\nHfApi().create_tag('user/catdog', tag={tag!r})",
                _hub_env(hub, work / "hf-tag"), work)
    return work


def test_training_reads_the_dataset_by_its_hub_id_at_a_tag(pushed):
    metrics = json.loads((pushed / "v1" / "metrics.json").read_text())
    assert metrics["dataset"] == "user/catdog-data" and metrics["dataset_revision"] == "v1"
    assert metrics["full_split_sizes"]["train"] + metrics["full_split_sizes"]["validation"] + metrics["full_split_sizes"]["test"] == 200
    assert metrics["dataset_fingerprint"].startswith("user/catdog-data@")


@pytest.mark.parametrize("source, tag", [("user/catdog", "v2"), ("user/catdog@v1", "v1")])
def test_a_fresh_process_loads_the_pushed_model_by_id_and_tag_and_downloads_only_what_it_serves(
        hub, pushed, tmp_path, source, tag):
    result = _python(f"""
import json, pathlib
from PIL import Image
from catdog_model import load_predictor
predictor = load_predictor({source!r})
picture = Image.open({str(ROOT / 'examples' / 'beagle_puppy.jpg')!r})
print(json.dumps({{"engine": predictor.engine_name, "p": predictor.predict([picture])[0],
                  "verdict": predictor.explain(picture).verdict.answer,
                  "files": sorted(p.name for p in pathlib.Path({str(tmp_path / 'hf')!r}).rglob('*') if p.is_file() and '/snapshots/' in str(p))}}))
""", {**_hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}, tmp_path)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    # One engine comes down, the one it serves: int8 where the run's passed its check and the CPU has VNNI or AMX.
    served = INT8_IR_FILES if answer["engine"] == "openvino-int8" else IR_FILES
    assert set(answer["files"]) == SERVING_FILES - set(IR_FILES + INT8_IR_FILES) | set(served)
    int8_passed = INT8_IR_FILES[0] in json.loads((pushed / tag / "config.json").read_text())["manifest"]["files"]
    assert answer["engine"] == ("openvino-int8" if int8_passed and int8_pays() else "openvino-bf16" if native_bf16()
                                else "openvino-f32")
    assert set(answer["p"]) == {"cat", "dog"} and answer["verdict"] in ("cat", "dog", "not sure", "neither")
    # The answer is the pushed model's: that run's config.json came down, the one its manifest vouches for.
    local = json.loads((pushed / tag / "config.json").read_text())
    downloaded = json.loads(next((tmp_path / "hf").rglob("snapshots/*/config.json")).read_text())
    assert downloaded["manifest"] == local["manifest"]


def test_the_model_card_loads_from_the_hub_with_the_test_accuracy(hub, pushed, tmp_path):
    result = _python("from huggingface_hub import ModelCard\ncard = ModelCard.load('user/catdog')\n"
                     "print(card.data.eval_results[0].metric_type, card.data.eval_results[0].metric_value)",
                     _hub_env(hub, tmp_path / "hf"), tmp_path)
    accuracy = json.loads((pushed / "v2" / "evaluation.json").read_text())["accuracy"]  # main is the second push
    metric, value = result.stdout.strip().splitlines()[-1].split()
    assert metric == "accuracy" and float(value) == pytest.approx(accuracy)


def test_the_space_serves_the_pushed_model_by_id_and_picks_up_a_new_tag(hub, pushed, tmp_path):
    for tag in ("v1", "v2"):  # as a Space is configured: the model in $CATDOG_MODEL
        env = {**_hub_env(hub, tmp_path / f"hf-{tag}"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "CATDOG_THREADS": "1",
               "CATDOG_MODEL": f"user/catdog@{tag}"}
        url, process = start_server(None, env, tmp_path / f"app-{tag}.log")
        try:
            result = Client(url, verbose=False).predict(handle_file(str(ROOT / "examples" / "beagle_puppy.jpg")),
                                                        api_name="/explain")
            assert set(result["probabilities"]) == {"cat", "dog"}
            assert f"serving revision {tag} of user/catdog" in (tmp_path / f"app-{tag}.log").read_text()
            config = httpx.get(url + "config", timeout=30).text
            assert "user/catdog" in config and f"revision `{tag}`" in config
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def test_a_push_the_server_drops_midway_keeps_every_local_file_and_names_the_command(tmp_path, mini_dataset):
    url, process = _start_hub(tmp_path / "hub", stop_on="user/catdog-dropped")  # it exits on that repo's commit
    try:
        env = _hub_env(url, tmp_path / "hf")
        result = subprocess.run(training_command(tmp_path / "out", "--backbone", "test_resnet", "--epochs", "1",
                                                 "--max-train-samples", "16",
                                                 "--max-eval-samples", "16", "--push-to-hub", "--hub-model-id",
                                                 "user/catdog-dropped"),
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert_clean_error(result, "Could not push to user/catdog-dropped", "hf upload user/catdog-dropped")
    kept = {path.name for path in (tmp_path / "out").iterdir()}
    listed = set(json.loads((tmp_path / "out" / "config.json").read_text())["manifest"]["files"])  # the int8 engine if kept
    assert listed | (SERVING_FILES - set(INT8_IR_FILES)) | {"model.safetensors", "README.md"} <= kept


def test_a_quick_fine_tune_takes_imagenet_weights_through_timms_own_download_then_serves(hub, pushed, tmp_path):
    """As `make demo` does where the Hub answers: the dataset by id, the backbone's "ImageNet" weights fetched by
    timm's pretrained=True from a repo laid out as timm's are (random values, the right names and shapes), the
    backbone frozen, then the Space serving the result."""
    env = _hub_env(hub, tmp_path / "hf")
    _python("""
import timm, torch
from huggingface_hub import HfApi
from safetensors.torch import save_file
repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
torch.manual_seed(7)
save_file(timm.create_model("test_resnet").state_dict(), "model.safetensors")
HfApi().create_repo(repo, exist_ok=True)
HfApi().upload_file(path_or_fileobj="model.safetensors", path_in_repo="model.safetensors", repo_id=repo)
""", env, tmp_path)
    command = training_command(tmp_path / "out", "--epochs", "1", "--max-train-samples", "16", "--max-eval-samples", "16",
                               "--backbone", "test_resnet", "--freeze-backbone")
    command.remove("--no-pretrained")
    command[command.index("--dataset") + 1] = "user/catdog-data"
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    import timm
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(7)
    uploaded, trained = timm.create_model("test_resnet").state_dict(), load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(trained["backbone.conv1.0.weight"], uploaded["conv1.0.weight"])  # frozen: the downloaded weights
    card = (tmp_path / "out" / "README.md").read_text()
    assert "fine-tuned from ImageNet weights" in card and "timm's ImageNet weights" in card
    url, process = start_server(str(tmp_path / "out"), {**env, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")},
                                tmp_path / "app.log")
    try:
        picture = ROOT / "examples" / "beagle_puppy.jpg"
        answer = Client(url, verbose=False).predict(handle_file(str(picture)), api_name="/predict")
        from catdog_model import load_predictor, open_image

        predictor = load_predictor(str(tmp_path / "out"))  # what the fine-tuned model itself answers
        expected = predictor.explain(open_image(picture, draft_size=predictor.image_size), heatmap=False)
        assert answer["label"] == expected.verdict.answer
        assert {c["label"]: c["confidence"] for c in answer["confidences"]}["dog"] == pytest.approx(
            expected.probabilities["dog"], abs=1e-5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_labelled_dataset_is_pushed_with_its_pictures_and_columns_beside_the_verdicts(hub, pushed, tmp_path):
    """catdog-predict --dataset ID --push-to-hub: the Hub's viewer shows each picture, its label and its verdict."""
    result = subprocess.run([sys.executable, "-m", "catdog_model.predict", "--dataset", "user/catdog-data", "--output",
                             str(tmp_path / "rows.jsonl"), "--model", str(pushed / "v1"), "--push-to-hub",
                             "user/catdog-labelled"], cwd=ROOT, env=_hub_env(hub, tmp_path / "hf-predict"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    check = _python("""
import json, datasets
from huggingface_hub import DatasetCard
pushed = datasets.load_dataset("user/catdog-labelled", split="train")
source = datasets.load_dataset("user/catdog-data", split="train")
same = all(a.tobytes() == b.tobytes() for a, b in zip(pushed[::40]["image"], source[::40]["image"]))
print(json.dumps({"features": {k: type(v).__name__ for k, v in pushed.features.items()}, "same pictures": same,
                  "labels": list(pushed["labels"]) == list(source["labels"]), "names": pushed.features["labels"].names,
                  "verdicts": list(pushed["verdict"]), "card": DatasetCard.load("user/catdog-labelled", repo_type="dataset").text}))
""", _hub_env(hub, tmp_path / "hf-read"), tmp_path)
    read = json.loads(check.stdout.strip().splitlines()[-1])
    assert read["features"] == {"image": "Image", "labels": "ClassLabel", "verdict": "Value", "p_cat": "Value",
                                "p_dog": "Value", "ood_score": "Value", "note": "Value"}
    assert read["same pictures"] and read["labels"] and read["names"] == ["cat", "dog"]
    assert read["verdicts"] == [row["verdict"] for row in written] and len(written) == 200
    assert [row["labels"] for row in written[:3]] == [0, 0, 0] and "picture" in written[0]  # the text rows keep them too
    assert read["card"].startswith("# Verdicts by catdog-predict") and str(pushed / "v1") in read["card"]
    assert all(f"{count} {verdict}" in read["card"] for verdict, count in Counter(read["verdicts"]).items())
    assert [row["picture"] for row in written] == [str(i) for i in range(200)] and "classified 200 pictures" in result.stderr


def test_a_folder_run_is_pushed_as_a_dataset_that_load_dataset_reads(hub, pushed, tmp_path):
    result = subprocess.run([sys.executable, "-m", "catdog_model.predict", str(ROOT / "examples"), "--output",
                             str(tmp_path / "rows.csv"), "--model", str(pushed / "v1"), "--push-to-hub",
                             "user/catdog-folder-rows"], cwd=ROOT, env=_hub_env(hub, tmp_path / "hf-predict"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    check = _python("""
import json, datasets
from huggingface_hub import DatasetCard
pushed = datasets.load_dataset("user/catdog-folder-rows", split="train")
print(json.dumps({"rows": pushed.to_list(), "card": DatasetCard.load("user/catdog-folder-rows", repo_type="dataset").text}))
""", _hub_env(hub, tmp_path / "hf-read"), tmp_path)
    read = json.loads(check.stdout.strip().splitlines()[-1])
    with open(tmp_path / "rows.csv", newline="") as written:
        assert [row["picture"] for row in read["rows"]] == [row["picture"] for row in csv.DictReader(written)]
    assert {row["verdict"] for row in read["rows"]} <= {"cat", "dog", "not sure", "neither"} and len(read["rows"]) >= 3
    assert read["card"].startswith("# Verdicts by catdog-predict") and str(pushed / "v1") in read["card"]
