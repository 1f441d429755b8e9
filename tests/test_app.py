"""The Space, driven through its API with gradio_client, as a real server on a loopback port."""

import csv
import io
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from harness import rss_mb, start_app as start_server
from conftest import ROOT, start_app


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _photo(size=(120, 90), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _valid_files(folder):
    photo = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [_photo(seed=1), _photo(seed=2)]
    gradient = np.linspace(0, 255, 6000, dtype=np.uint8)[None, :, None].repeat(4000, 0).repeat(3, 2)
    sixteen = Image.fromarray((np.arange(120 * 90, dtype=np.uint16).reshape(90, 120) * 7))
    return {
        "rgb.jpg": _save(photo, folder / "rgb.jpg"),
        "grayscale.png": _save(photo.convert("L"), folder / "grayscale.png"),
        "rgba.png": _save(photo.convert("RGBA"), folder / "rgba.png"),
        "palette.png": _save(photo.convert("P"), folder / "palette.png"),
        "cmyk.jpg": _save(photo.convert("CMYK"), folder / "cmyk.jpg"),
        "16bit.png": _save(sixteen, folder / "16bit.png"),
        "photo.webp": _save(photo, folder / "photo.webp"),
        "animated.gif": _save(frames[0], folder / "animated.gif", save_all=True, append_images=frames[1:]),
        "rotated.jpg": _save(photo, folder / "rotated.jpg", exif=exif),
        "large.jpg": _save(Image.fromarray(gradient), folder / "large.jpg", quality=80),
        "tiny.png": _save(Image.new("RGB", (1, 1), (200, 100, 50)), folder / "tiny.png"),
    }


def _assert_label(result):
    """/predict's label is the verdict; a confident one is the likelier label, at 70% or more."""
    assert result["label"] in ("cat", "dog", "not sure", "neither")
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert set(confidences) == {"cat", "dog"} and abs(sum(confidences.values()) - 1) < 1e-5
    if result["label"] in ("cat", "dog"):
        assert result["label"] == max(confidences, key=confidences.get) and confidences[result["label"]] >= 0.70


def test_predict_api_on_every_kind_of_valid_image(client, trained_model, tmp_path):
    from catdog_model import load_predictor, open_image
    predictor = load_predictor(str(trained_model))
    files = _valid_files(tmp_path)
    assert os.path.getsize(files["large.jpg"]) < 10 * 1024 * 1024
    for name, path in files.items():
        result = client.predict(handle_file(str(path)), api_name="/predict")
        _assert_label(result)
        # What the predictor itself answers for the file, decoded as the app decodes it (JPEGs at the model's scale).
        expected = predictor.explain(open_image(path, draft_size=predictor.image_size), heatmap=False)
        assert result["label"] == expected.verdict.answer, name
        confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
        assert confidences["dog"] == pytest.approx(expected.probabilities["dog"], abs=1e-5), name


def test_predictions_match_the_predictor(client, trained_model):
    from catdog_model import load_predictor, open_image
    predictor, path = load_predictor(str(trained_model)), ROOT / "examples" / "chelsea_cat.jpg"
    # The app decodes JPEGs at the model's scale (Image.draft): the same answer as a full decode, to within 0.01.
    expected = predictor.predict([open_image(path, draft_size=predictor.image_size)])[0]
    assert expected["dog"] == pytest.approx(predictor.predict([Image.open(path)])[0]["dog"], abs=0.01)
    result = client.predict(handle_file(str(path)), api_name="/predict")
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert confidences["dog"] == pytest.approx(expected["dog"], abs=1e-5)
    explained = client.predict(handle_file(str(path)), api_name="/explain")
    assert explained["probabilities"]["dog"] == pytest.approx(expected["dog"], abs=1e-5)
    assert explained["is_cat_or_dog"] == predictor.explain(open_image(path, draft_size=64)).is_cat_or_dog
    assert explained["ood_score"] > 0


def _bad_files(folder):
    good = io.BytesIO()
    _photo().save(good, "JPEG")
    (folder / "notes.jpg").write_text("this is not a picture")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    bomb = folder / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)
    return {
        "notes.jpg": "not an image",
        "truncated.jpg": "damaged or truncated",
        "empty.png": "empty",
        "bomb.png": "too large",
    }


def test_bad_files_get_a_clear_error_and_the_app_keeps_serving(client, tmp_path):
    for name, message in _bad_files(tmp_path).items():
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(tmp_path / name)), api_name="/predict")
        _assert_label(client.predict(handle_file(str(ROOT / "examples" / "chelsea_cat.jpg")), api_name="/predict"))


def test_upload_over_10_mb_is_refused(client, tmp_path):
    path = tmp_path / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)).save(path)
    assert os.path.getsize(path) > 10 * 1024 * 1024
    with pytest.raises(AppError, match=r"The file is 1\d\.\d MB; the limit is 10 MB a picture"):
        client.predict(handle_file(str(path)), api_name="/predict")
    _assert_label(client.predict(handle_file(str(ROOT / "examples" / "chelsea_cat.jpg")), api_name="/predict"))
    # In a batch, the oversized file gets its own error row; the others are classified.
    table, _ = client.predict([handle_file(str(path)), handle_file(str(ROOT / "examples" / "chelsea_cat.jpg"))],
                              api_name="/predict_batch")
    (big, big_verdict, _, _, big_note), (cat, cat_verdict, *_) = table["data"]
    assert big == "huge.png" and big_verdict == "error" and big_note.startswith("Too large: The file is")
    assert cat_verdict in ("cat", "dog", "not sure", "neither")


def test_batch_gives_a_table_and_a_csv(client, tmp_path):
    files = _valid_files(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "text.ppm").write_bytes(b"P6 a text file\n")  # its decoder raised a raw ValueError: no table at all
    paths = [files["rgb.jpg"], files["grayscale.png"], tmp_path / "broken.jpg", tmp_path / "text.ppm"]
    table, csv_path = client.predict([handle_file(str(p)) for p in paths], api_name="/predict_batch")
    rows = table["data"]
    assert [row[0] for row in rows] == ["rgb.jpg", "grayscale.png", "broken.jpg", "text.ppm"]
    for row in rows[:2]:
        assert row[1] in ("cat", "dog", "not sure", "neither") and abs(row[2] + row[3] - 1) < 2e-3
    assert rows[2][1] == "error" and rows[2][4].startswith("Cannot read this file: ")
    assert rows[3][1] == "error" and rows[3][4].startswith("Cannot read this file: This file is not an image")
    assert os.path.basename(csv_path) == "catdog-predictions.csv"
    lines = open(csv_path).read().splitlines()
    assert lines[0] == "file,verdict,P(cat),P(dog),note" and len(lines) == 5


def test_the_batch_keeps_the_uploaded_names_and_its_csv_is_safe_in_a_spreadsheet(client, tmp_path):
    names = ["=1+1.png", "+cmd.png", "@SUM(A1).png", "-2+3.png"]  # OWASP's CSV-injection openers
    photo = _photo()
    for name in names:
        (tmp_path / name).mkdir()  # each in its own folder, under its exact name
        photo.save(tmp_path / name / name)
    table, csv_path = client.predict([handle_file(str(tmp_path / name / name)) for name in names],
                                     api_name="/predict_batch")
    assert [row[0] for row in table["data"]] == names
    with open(csv_path, newline="") as file:
        cells = [row[0] for row in list(csv.reader(file))[1:]]
    assert cells == ["'" + name for name in names]


def _hang_up_mid_upload(url: str) -> None:
    """A visitor closing the tab: a multipart upload announced at 100 kB, cut off after 1 kB."""
    host, port = url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                           b"Content-Type: multipart/form-data; boundary=B\r\n\r\n--B\r\nContent-Disposition: "
                           b'form-data; name="files"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + b"x" * 1000)
        time.sleep(0.3)


@pytest.mark.slow
def test_uploads_and_batch_files_do_not_pile_up_on_disk_and_hang_ups_are_one_line(trained_model, tmp_path):
    """A Space runs for months: what 40 uploads, 4 batches and 5 visitors leaving mid-upload leave is deleted once
    older than the TTL, and each hang-up is one line in the log."""
    cache, own = tmp_path / "gradio", tmp_path / "tmp"  # Gradio's cache, and the temporary folder the app writes CSVs in
    own.mkdir()
    env = {"GRADIO_TEMP_DIR": str(cache), "TMPDIR": str(own), "CATDOG_THREADS": "1", "CATDOG_UPLOAD_TTL": "2"}
    url, process = start_server(str(trained_model), env, tmp_path / "app.log")
    try:
        client = Client(url, verbose=False)
        stored = lambda: {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}  # noqa: E731
        examples = stored()  # the page's example photos, copied there at start-up: kept
        pictures = [_save(_photo(size=(400, 300), seed=seed), tmp_path / f"photo{seed}.png") for seed in range(4)]
        for index in range(40):
            client.predict(handle_file(str(pictures[index % 4])), api_name="/predict")
        for _ in range(4):
            client.predict([handle_file(str(path)) for path in pictures], api_name="/predict_batch")
        for _ in range(5):
            _hang_up_mid_upload(url)
        assert len(stored() - examples) >= 5  # the 4 uploads and the CSV (the same 4 times: Gradio keeps one copy)
        time.sleep(6)  # past the TTL, and past a run of Gradio's clean-up, which comes every TTL seconds
        assert stored() == examples
        client.predict([handle_file(str(pictures[0]))], api_name="/predict_batch")
        assert len(list(own.glob("catdog-csv-*/*"))) == 1  # the app's older CSV folders went with the new batch
        log = (tmp_path / "app.log").read_text()
        assert log.count("a client hung up") == 5 and "Traceback" not in log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_uploads_with_no_prediction_stay_within_the_budget(trained_model, tmp_path):
    """Ten distinct 20 MB uploads, never classified: what the app keeps stays within $CATDOG_UPLOADS_MB, the newest
    upload kept, the page's examples too."""
    from catdog_model.serving.space_files import TIDY_EVERY_S

    cache = tmp_path / "gradio"
    env = {"GRADIO_TEMP_DIR": str(cache), "CATDOG_THREADS": "1", "CATDOG_UPLOADS_MB": "50"}
    url, process = start_server(str(trained_model), env, tmp_path / "app.log")
    try:
        examples = {path for path in cache.rglob("*") if path.is_file()}
        rng = np.random.default_rng(0)
        for index in range(10):
            files = {"files": (f"big{index}.png", rng.bytes(20 * 2**20), "image/png")}
            newest = httpx.post(url + "gradio_api/upload", files=files, timeout=60).json()[0]
        time.sleep(3 * TIDY_EVERY_S)
        kept = {path for path in cache.rglob("*") if path.is_file()} - examples
        assert sum(path.stat().st_size for path in kept) <= 50 * 2**20 and Path(newest) in kept
        assert examples and all(path.is_file() for path in examples)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_eight_of_the_worst_uploads_allowed_at_once_raise_the_peak_by_under_a_gigabyte(trained_model, tmp_path):
    """The largest pictures the limits allow, each nearly nothing on the wire: 40 megapixels of RGBA, 16-bit grey,
    a 1×40,000,000 strip, and an icon that hides a huge frame (refused before it is decoded)."""
    worst = {"rgba.png": Image.new("RGBA", (8000, 5000), (120, 140, 160, 200)),
             "grey16.png": Image.fromarray(np.full((6300, 6300), 30000, np.uint16)),
             "strip.png": Image.new("RGB", (40_000_000, 1), (90, 60, 30))}
    for name, picture in worst.items():
        picture.save(tmp_path / name)
    Image.new("RGB", (4000, 4000), "red").save(tmp_path / "hidden.ico", sizes=[(16, 16), (256, 256)])
    uploads = [*worst, *worst, "rgba.png", "hidden.ico"]
    env = {"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "CATDOG_THREADS": "2"}
    url, process = start_server(str(trained_model), env, tmp_path / "app.log")
    try:
        Client(url, verbose=False).predict(handle_file(str(ROOT / "examples" / "chelsea_cat.jpg")), api_name="/predict")
        baseline, peak, done = rss_mb(process), [0.0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(process))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        def send(name):
            try:
                return Client(url, verbose=False).predict(handle_file(str(tmp_path / name)), api_name="/predict")
            except AppError as error:
                return error

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, uploads))
        done.set()
        sampler.join()
    finally:
        process.terminate()
        process.wait(timeout=30)
    for name, answer in zip(uploads, answers):
        if name == "hidden.ico":
            assert isinstance(answer, AppError) and "not an image that can be read" in str(answer)
        else:
            _assert_label(answer)
    # The decode budget counts bytes from the header: a few pictures at a time, each with its converted copy.
    assert peak[0] - baseline < 1024, (baseline, peak[0])


@pytest.mark.slow
def test_missing_model_starts_with_a_notice_and_a_clear_api_error(tmp_path):
    url, process = start_app(str(tmp_path / "no-such-model"), tmp_path)
    try:
        config = httpx.get(url + "config", timeout=10).text
        assert "No model loaded" in config and "CATDOG_MODEL" in config
        with pytest.raises(AppError, match="No model is loaded") as error:
            Client(url, verbose=False).predict(handle_file(str(ROOT / "examples" / "chelsea_cat.jpg")), api_name="/predict")
        assert "make demo" in str(error.value) and "`" not in str(error.value)  # plain text for API users
        assert "make demo" in config and "No model is loaded yet" in config
        assert "Traceback" not in (tmp_path / "app.log").read_text()
        assert not (ROOT / "app.pyi").exists()  # a gr component subclass would write this stub next to app.py
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_without_a_model_named_the_training_output_folder_is_served(trained_model, tmp_path):
    shutil.copytree(trained_model, tmp_path / "catdog-model")
    url, process = start_app(None, tmp_path, cwd=tmp_path)
    try:
        result = Client(url, verbose=False).predict(handle_file(str(ROOT / "examples" / "chelsea_cat.jpg")), api_name="/predict")
        assert {c["label"] for c in result["confidences"]} == {"cat", "dog"}
        log = (tmp_path / "app.log").read_text()
        assert "./catdog-model (the training script's output) exists" in log and "serving the local folder catdog-model" in log
        config = httpx.get(url + "config", timeout=10).text  # the header describes this model, not the published one
        assert "A resnet50 trained from scratch on `cats_vs_dogs_mini`, at 64 px" in config and "fine-tuned on `microsoft" not in config
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_space_metadata_matches_the_code():
    """README's Space front matter: the gradio pin and the model repo are the code's."""
    import re

    from huggingface_hub import metadata_load

    from packaging.requirements import Requirement

    metadata = metadata_load(ROOT / "README.md")
    line = re.search(r"^gradio\S*", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(0)
    pinned = Requirement(line).specifier
    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] in pinned  # the Space's gradio is what we allow
    assert f">={metadata['sdk_version']}" in str(pinned)  # and the oldest we allow: what the app is tested on
    from catdog_model.serving.files import DEFAULT_MODEL

    repo_id, _, revision = DEFAULT_MODEL.partition("@")
    assert metadata["app_file"] == "app.py" and metadata["models"] == [repo_id]
    assert metadata["datasets"] == ["microsoft/cats_vs_dogs"] and "mcp-server" in metadata["tags"]
    from catdog_model.config import SPACE_FILES

    preloaded, files, pinned = metadata["preload_from_hub"][0].split()  # what the Space serves, at its release
    assert (preloaded, files.split(","), pinned) == (repo_id, list(SPACE_FILES), revision)


def test_the_api_page_documents_every_endpoints_outputs_by_name_and_type(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/predict", "/explain", "/predict_batch"}
    assert all(endpoint["description"] and "preprocess" not in endpoint["description"] for endpoint in endpoints.values())
    returns = {name: [(r["label"], r["python_type"]["type"]) for r in endpoint["returns"]] for name, endpoint in endpoints.items()}
    assert returns["/predict"][0][0] == "Verdict" and returns["/predict"][0][1].startswith("dict(label: str")
    assert returns["/explain"][0][0] == "Explanation"
    for field in ("verdict (str)", "probabilities (dict of str to float)", "is_cat_or_dog (bool)", "ood_score (float)"):
        assert field in endpoints["/explain"]["description"]
    assert [label for label, _ in returns["/predict_batch"]] == ["Results", "CSV"]


def test_a_picture_url_the_server_cannot_fetch_is_one_clear_error(client):
    with pytest.raises(AppError, match="Unable to resolve hostname nonexistent.invalid"):
        client.predict(handle_file("https://nonexistent.invalid/cat.jpg"), api_name="/predict")


def test_explain_api_says_neither_for_noise(client, tmp_path):
    noise = np.random.default_rng(9).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    result = client.predict(handle_file(str(_save(Image.fromarray(noise), tmp_path / "noise.png"))), api_name="/explain")
    assert result["is_cat_or_dog"] is False and set(result["probabilities"]) == {"cat", "dog"}


@pytest.mark.slow
def test_the_space_serves_its_engine_from_the_first_request_and_stops_cleanly_on_sigterm(trained_model, tmp_path):
    """As shipped: the OpenVINO engine answers the first request; SIGTERM (how a Space stops) exits 0, leaving
    nothing of its own in the temporary folder."""
    (tmp_path / "tmp").mkdir()
    env = {"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "CATDOG_THREADS": "2", "TMPDIR": str(tmp_path / "tmp")}
    url, process = start_server(str(trained_model), env, tmp_path / "app.log")
    try:
        client, photo = Client(url, verbose=False), handle_file(str(ROOT / "examples" / "chelsea_cat.jpg"))
        first = client.predict(photo, api_name="/predict")
        client.predict([photo], api_name="/predict_batch")  # a batch's CSV, in a folder of the app's own
        assert list((tmp_path / "tmp").glob("catdog-csv-*/*/catdog-predictions.csv"))
        log = (tmp_path / "app.log").read_text()
        assert "compiled the model" in log and "with openvino-" in log and "torch" not in log
        dog = {c["label"]: c["confidence"] for c in first["confidences"]}["dog"]
        assert client.predict(photo, api_name="/explain")["probabilities"]["dog"] == pytest.approx(dog, abs=1e-5)
        assert "(`openvino-" in httpx.get(url + "config", timeout=30).text  # named on the page, in "About the model"
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
    assert returncode == 0 and "terminate called" not in (tmp_path / "app.log").read_text()
    assert not list((tmp_path / "tmp").glob("catdog-*"))


def _mcp(url: str, tool: str, arguments: dict):
    """One call through an MCP client, over the Space's streamable HTTP endpoint, as an AI agent makes it."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def call():
        async with streamable_http_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await session.list_tools(), await session.call_tool(tool, arguments)

    return asyncio.run(call())


def test_the_space_is_an_mcp_server_whose_tools_say_the_four_answers(app_url, trained_model):
    import ast
    import base64

    from catdog_model import load_predictor, open_image

    schema = {tool["name"]: tool for tool in httpx.get(app_url + "gradio_api/mcp/schema", timeout=30).json()}
    assert set(schema) == {"predict", "explain", "predict_batch"}
    for tool in schema.values():
        assert all(f'"{answer}"' in tool["description"] for answer in ("cat", "dog", "not sure", "neither"))
    upload = schema["predict"]["inputSchema"]["properties"]["upload"]
    assert upload["type"] == "string" and "File" in upload["format"] and "10 MB" in upload["description"]
    path = ROOT / "examples" / "chelsea_cat.jpg"
    picture = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    tools, result = _mcp(app_url, "explain", {"upload": picture})
    assert {tool.name for tool in tools.tools} == set(schema) and not result.isError
    answer = ast.literal_eval(result.content[0].text)  # the endpoint's dict, as Gradio writes it
    predictor = load_predictor(str(trained_model))
    assert answer["verdict"] == predictor.explain(open_image(path, draft_size=predictor.image_size)).verdict.answer
    _, refused = _mcp(app_url, "predict", {"upload": "data:image/jpeg;base64," + base64.b64encode(b"no").decode()})
    assert refused.isError and "not an image that can be read" in refused.content[0].text
