"""catdog Space: drag, paste or snap a picture and the model says cat or dog.

    python app.py                              # ./catdog-model if it exists, else the published model
    CATDOG_MODEL=some/folder python app.py     # a folder written by train_accelerate.py
    python app.py --model user/repo@v1         # any Hub repo, pinned to a revision

The model is loaded once, at start-up, through ``catdog_model.load_predictor``. If it cannot be
loaded the app still starts, shows what is missing, and the API answers with the same message.
Sized for a 2-vCPU Space: one shared model, one inference at a time, a bounded queue.
The model's OpenVINO engine serves from the first request; ``--exact`` serves the eager float32 model.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import html
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path


def _setting(name: str, default: str, minimum: int | None = None) -> int | bool:
    """$name as a whole number (at least ``minimum``) or, with no minimum, as a yes/no switch. A value that is
    neither stops the app with one line: a Space's log should say what is wrong, not run on another setting."""
    value = os.environ.get(name, default).strip()
    if minimum is None and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    if minimum is not None and value.isdecimal() and int(value) >= minimum:
        return int(value)
    meaning = "1/true/yes or 0/false/no" if minimum is None else f"a whole number from {minimum}"
    sys.exit(f"error: ${name} must be {meaning}, got {value!r} (see the settings table in README.md)")


def _cap_malloc_arenas(arenas: int) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core) and rarely hands the
    memory back; Gradio answers requests on many worker threads, so the server's memory grew by hundreds
    of MB per few hundred requests without levelling off. A cap keeps it flat (benchmarks/load_test.py).
    It must be set here, not in the environment: a Space starts `python app.py` with none of ours."""
    if arenas > 0 and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX
        except (OSError, AttributeError):  # not glibc: nothing to cap
            pass


# Before torch and gradio start any thread. CATDOG_MALLOC_ARENAS=0 switches it off (for the load test).
_cap_malloc_arenas(_setting("CATDOG_MALLOC_ARENAS", "2", minimum=0))

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402
from gradio_client import handle_file  # noqa: E402

from catdog_model import (DEFAULT_LABELS, ImageError, ModelLoadError, PredictionError, load_predictor,  # noqa: E402
                          open_image, to_rgb)
from catdog_model.images import MAX_PIXELS, PixelBudget  # noqa: E402
from catdog_model.ood import overlay_heatmap  # noqa: E402

DEFAULT_MODEL = "catdog-project/catdog-resnet50"  # the published model: named here and in README.md only
LOCAL_MODEL = "catdog-model"  # train_accelerate.py's default --output-dir, relative to where the app starts
MAX_FILE_MB = 10  # per picture: a larger one gets its own clear error (a row of its own in a batch)
SERVER_CAP_MB = 50  # Gradio refuses anything larger outright, against abuse
MAX_BATCH_FILES = 100
# /predict calls that arrive together share one forward pass, up to this many (CATDOG_MAX_BATCH=1: one at a time).
MAX_BATCH = _setting("CATDOG_MAX_BATCH", "8", minimum=1)
UNSURE_BELOW = 0.70  # below this probability for the top label, the page says the model is not sure
# Uploads and batch CSVs are deleted this many seconds after they were made, so a Space that runs for months
# keeps a bounded disk (Gradio's delete_cache for its uploads and outputs; our own CSV folders in predict_batch).
UPLOAD_TTL_S = _setting("CATDOG_UPLOAD_TTL", "3600", minimum=1)
EXAMPLES_DIR = Path(__file__).parent / "examples"
# The API page's sample inputs: the project's own photos, where anyone can fetch them.
EXAMPLES_URL = "https://raw.githubusercontent.com/catdog-project/catdog/main/examples"
API_EXAMPLES = [f"{EXAMPLES_URL}/chelsea_cat.jpg", f"{EXAMPLES_URL}/german_shepherd_camera_trap.jpg"]

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
# huggingface_hub prints through a handler of its own and also passes records on to ours: each Hub retry
# warning came out twice. Keep one, in this format.
logging.getLogger("huggingface_hub").handlers.clear()
logger = logging.getLogger("catdog.app")


def _model_source(argv: list[str]) -> tuple[str, str, bool]:
    """The model to serve, why that one (--model, then $CATDOG_MODEL, then ./catdog-model, then the Hub), and --exact."""
    parser = argparse.ArgumentParser(description="Serve the catdog demo.")
    parser.add_argument(
        "--model", default=None,
        help=f"Hub repo id, id@revision, or a local folder (default: $CATDOG_MODEL, else ./{LOCAL_MODEL} if it "
             f"exists, else {DEFAULT_MODEL})",
    )
    parser.add_argument("--exact", action="store_true",
                        help="serve the eager float32 model (model.safetensors) instead of the OpenVINO engine")
    parsed = parser.parse_args(argv)
    exact = parsed.exact or _setting("CATDOG_EXACT", "0")
    model = parsed.model
    if model:
        return model, "--model", exact
    if os.environ.get("CATDOG_MODEL"):
        return os.environ["CATDOG_MODEL"], "$CATDOG_MODEL", exact
    if (Path(LOCAL_MODEL) / "config.json").is_file():
        return LOCAL_MODEL, f"no --model or $CATDOG_MODEL, and ./{LOCAL_MODEL} (the training script's output) exists", exact
    return DEFAULT_MODEL, f"no --model, $CATDOG_MODEL or ./{LOCAL_MODEL}: the published model", exact


# Flags are read only when run as a script, so that tests can import `demo`.
MODEL_SOURCE, WHY, EXACT = _model_source(sys.argv[1:] if __name__ == "__main__" else [])
# Inference is the only heavy work: use the cores deliberately, not whatever a library guesses.
THREADS = _setting("CATDOG_THREADS", str(min(2, os.cpu_count() or 1)), minimum=1)

logger.info("loading the model %s (%s)", MODEL_SOURCE, WHY)
try:
    predictor = load_predictor(MODEL_SOURCE, exact=EXACT, threads=THREADS)
    predictor.max_shared_batch = MAX_BATCH
    load_error = None
    if Path(predictor.source).is_dir():
        logger.info("serving the local folder %s", predictor.source)
    else:
        logger.info("serving %s from the Hub (revision %s)", predictor.source, predictor.revision or "main")
except ModelLoadError as error:
    predictor, load_error = None, str(error)
    logger.error("no model: %s", load_error)

FIX_HINT = (
    f"Train a small model offline with `make train-mini`, then run `make demo` again: it serves ./{LOCAL_MODEL} "
    "when that folder exists. Or set `CATDOG_MODEL` (or `--model`) to a Hub repo you can reach, e.g. `user/repo@v1`."
)
NO_MODEL_MESSAGE = f"No model is loaded: {load_error} {FIX_HINT.replace('`', '')}"  # API text: no markdown


def _facts(metrics: dict) -> dict:
    """What the panel shows of metrics.json, each field checked: a malformed one is left out, with a log line,
    since that file only describes the model."""
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    facts = {"backbone_init": metrics.get("backbone_init"), "dataset": metrics.get("dataset"),
             "accuracy": test.get("accuracy"), "samples": test.get("samples")}
    kinds = {"backbone_init": str, "dataset": str, "accuracy": (int, float), "samples": int}
    for key, kind in kinds.items():
        if facts[key] is not None and (not isinstance(facts[key], kind) or isinstance(facts[key], bool)):
            logger.warning("metrics.json: %s is %r, not a %s; the model panel leaves it out", key, facts[key],
                           getattr(kind, "__name__", "number"))
            facts[key] = None
    return facts


def _headline() -> str:
    """What is loaded, from its own config.json and metrics.json: never a claim about another model."""
    if predictor is None:
        return "No model is loaded yet: see below."
    facts = _facts(predictor.metrics)
    init, dataset = facts["backbone_init"] or "", facts["dataset"]
    how = "trained from scratch" if init.startswith("random") else "fine-tuned from ImageNet weights" if init else "trained"
    where = f" on `{Path(dataset).name if Path(dataset).exists() else dataset}`" if dataset else ""
    return f"A {predictor.backbone} {how}{where}, at {predictor.image_size} px, tells which it is."


def _model_panel() -> str:
    if predictor is None:
        return f"### ⚠️ No model loaded\n\n{load_error}\n\n**To fix it:** {FIX_HINT}"
    facts = _facts(predictor.metrics)
    accuracy = "not recorded (no metrics.json next to the weights)"
    if facts["accuracy"] is not None:
        accuracy = f"**{facts['accuracy']:.2%}**" + (f" on {facts['samples']:,} held-out test images" if facts["samples"] else "")
    if Path(predictor.source).is_dir():
        name, where = f"`{predictor.source}`", "local folder"
    else:
        name, where = f"[`{predictor.source}`](https://huggingface.co/{predictor.source})", f"revision `{predictor.revision or 'main'}`"
    return (f"**Model** {name} · {where} · "
            f"{predictor.backbone} at {predictor.image_size} px · test accuracy {accuracy} · "
            f"engine `{predictor.engine}`")


# Decoded pixels the requests in flight may hold together: two of the largest pictures allowed. A flat
# 40-megapixel PNG is 128 KB on the wire and 120 MB decoded; eight at once took the server from 1.3 to 2.5 GB.
PIXELS_IN_FLIGHT = PixelBudget(2 * MAX_PIXELS)


def _open_upload(path: str):
    """Size limit first (cheap), then the header's pixel count, then a decode no larger than the model needs."""
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > MAX_FILE_MB:
        raise ImageError(f"The file is too large ({size_mb:.1f} MB); the limit is {MAX_FILE_MB} MB.")
    return open_image(path, draft_size=predictor.image_size if predictor else None)


def _require_model() -> None:
    if predictor is None:
        raise gr.Error(NO_MODEL_MESSAGE, title="No model", print_exception=False)


def _upload_path(upload) -> str | None:
    # Gradio hands the raw upload over as a cached file path, a FileData dict or a FileData object.
    return upload if isinstance(upload, str) else upload.get("path") if isinstance(upload, dict) else getattr(upload, "path", None)


def _api_image(upload: str | dict | None):
    """The API's upload, opened, or a gr.Error that gradio_client raises as AppError with the reason."""
    _require_model()
    path = _upload_path(upload)
    if not path:
        raise gr.Error("Upload a picture of a cat or a dog first.", print_exception=False)
    try:
        return _open_upload(path)
    except ImageError as error:
        raise gr.Error(str(error), title="Cannot read this file", print_exception=False) from None


def _model_failed(error: PredictionError) -> gr.Error:
    logger.error("%s", error)
    return gr.Error(str(error), title="The model failed", print_exception=False)


def predict(upload: str | dict | None) -> dict[str, float]:
    """Classify one picture (JPEG, PNG, WebP, GIF, ... up to 10 MB); returns the label and each class's probability."""
    with PIXELS_IN_FLIGHT.hold(_upload_path(upload)):
        image = _api_image(upload)  # first: it checks that a model is loaded
        try:
            return predictor.predict_shared(image)  # batched with the other /predict calls waiting for the model
        except PredictionError as error:
            raise _model_failed(error) from None


def _status(text: str = "") -> dict:
    return gr.update(value=text, visible=bool(text))


def explain(upload: str | dict | None) -> dict:
    """Classify one picture and say whether it looks like a cat or a dog at all: {"probabilities", "is_cat_or_dog", "ood_score"}."""
    with PIXELS_IN_FLIGHT.hold(_upload_path(upload)):
        image = _api_image(upload)  # first: it checks that a model is loaded
        try:
            explanation = predictor.explain(image)
        except PredictionError as error:
            raise _model_failed(error) from None
    return {"probabilities": explanation.probabilities, "is_cat_or_dog": explanation.is_cat_or_dog,
            "ood_score": explanation.ood_score}


def _page(label=None, status: str = "", verdict: str = "", heatmap=None, heading: bool = True) -> tuple:
    """The result column's four outputs: the probabilities, the inline status, the verdict and the heatmap."""
    return (gr.update(value=label, show_heading=heading), _status(status),
            gr.update(value=verdict, visible=bool(verdict)), heatmap)


def predict_on_page(upload: str | dict | None) -> tuple:
    """The page's version of ``explain``: problems and doubts are shown next to the picture, where they
    stay until the next upload, instead of in a toast that fades; the heatmap goes to the result column."""
    if predictor is None:
        return _page(status=f"⚠️ **No model is loaded**, so nothing can be classified. {FIX_HINT}")
    path = _upload_path(upload)
    if not path:
        return _page()
    try:
        with PIXELS_IN_FLIGHT.hold(_upload_path(upload)):  # the full picture lives until its overlay is drawn
            image = _open_upload(path)
            explanation = predictor.explain(image)
            heatmap = overlay_heatmap(to_rgb(image), explanation.heatmap)
            del image
    except ImageError as error:
        return _page(status=f"⚠️ **Cannot read this file.** {error}")
    except PredictionError as error:
        logger.error("%s", error)
        return _page(status=f"⚠️ **The model failed on this picture.** {error}")
    probabilities = explanation.probabilities
    if not explanation.is_cat_or_dog:
        return _page(probabilities, verdict="### 🚫 This doesn't look like a cat or a dog\nThe model's raw answer, for what it is worth:",
                     heatmap=heatmap, heading=False)
    top = max(probabilities, key=probabilities.get)
    if probabilities[top] < UNSURE_BELOW:
        return _page(probabilities, heatmap=heatmap, status=(
            f"🤔 **Not sure.** The model leans to *{html.escape(top)}* with only {probabilities[top]:.0%}; it may not be a clear "
            "photo of a cat or a dog."))
    return _page(probabilities, heatmap=heatmap)


def _upload_name(upload) -> str:
    """The name the file had on the user's machine (Gradio stores it under a name of its own)."""
    name = upload.get("orig_name") if isinstance(upload, dict) else getattr(upload, "orig_name", None)
    return name or Path(_upload_path(upload) or "").name


def _spreadsheet_safe(cell):
    """A cell a spreadsheet shows as text: OWASP's defence against CSV injection (a leading =, +, -, @, tab or
    carriage return would make it a formula) is a leading apostrophe."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(("=", "+", "-", "@", "\t", "\r")) else cell


def _delete_old_csv_folders() -> None:
    """Gradio deletes the CSV files it serves once they are old; their folders, ours, go here."""
    for folder in Path(get_upload_folder()).glob("catdog-*"):
        try:
            if time.time() - folder.stat().st_mtime > UPLOAD_TTL_S:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # another batch removed it first
            pass


def predict_batch(files: list | None, progress=gr.Progress()) -> tuple[list[list], str]:
    """Classify up to 100 pictures: one table row per file (a file that cannot be read gets an error row) and a CSV of it."""
    _require_model()
    if not files:
        raise gr.Error("Choose one or more pictures first.", print_exception=False)
    if len(files) > MAX_BATCH_FILES:
        raise gr.Error(f"At most {MAX_BATCH_FILES} files at a time, please.", print_exception=False)
    negative, positive = predictor.labels
    rows = []
    for upload in progress.tqdm(files, desc="Classifying"):
        name = _upload_name(upload)
        try:
            with PIXELS_IN_FLIGHT.hold(_upload_path(upload)):
                probabilities = predictor.predict([_open_upload(_upload_path(upload))])[0]
        except (ImageError, PredictionError) as error:
            rows.append([name, f"error: {error}", None, None])
            continue
        label = max(probabilities, key=probabilities.get)
        rows.append([name, label, round(probabilities[negative], 4), round(probabilities[positive], 4)])
    # Inside Gradio's own upload cache, so the app writes nowhere else; a folder per run keeps the plain name.
    _delete_old_csv_folders()
    csv_path = Path(tempfile.mkdtemp(prefix="catdog-", dir=get_upload_folder())) / "catdog-predictions.csv"
    with open(csv_path, "w", newline="") as out:
        csv.writer(out).writerows([TABLE_HEADERS, *([_spreadsheet_safe(cell) for cell in row] for row in rows)])
    return rows, str(csv_path)


labels = predictor.labels if predictor else DEFAULT_LABELS
TABLE_HEADERS = ["file", "label", f"P({labels[0]})", f"P({labels[1]})"]
examples = sorted(str(p) for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})

# On a phone the columns stack: put the result first, so that it is in view after an upload.
CSS = "@media (max-width: 640px) { #result-column { order: -1; } }"

with gr.Blocks(title="catdog: cat or dog?", delete_cache=(min(600, UPLOAD_TTL_S), UPLOAD_TTL_S)) as demo:
    gr.Markdown(f"# 🐱 catdog 🐶\nDrop a photo of a cat or a dog, paste one, or use your webcam. {_headline()}")
    model_panel = gr.Markdown(_model_panel(), elem_id="model-panel")
    ready = predictor is not None
    with gr.Tab("One picture"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                 label="Picture", height=320, interactive=ready)
                status = gr.Markdown(visible=False, elem_id="upload-status")
                button = gr.Button("Classify", variant="primary", interactive=ready)
            with gr.Column(elem_id="result-column"):
                verdict = gr.Markdown(visible=False, elem_id="verdict")
                result = gr.Label(num_top_classes=2, label="Prediction", elem_id="result")
                show_heatmap = gr.Checkbox(value=True, label="Show where the model looked (Grad-CAM)", interactive=ready)
                heatmap = gr.Image(label="Where the model looked: red counted most for its answer", elem_id="heatmap",
                                   interactive=False, height=240, buttons=["download", "fullscreen"])
        page_outputs = [result, status, verdict, heatmap]
        # preprocess=False: gr.Image would open every upload with Pillow before our checks run, so a
        # non-image would fail with a generic error; the handlers get the uploaded file itself instead.
        # One model and two cores: the page's events take turns in a single slot; /predict calls run
        # side by side up to MAX_BATCH, and the predictor batches those that wait for the model.
        gr.on([image.upload, button.click], predict_on_page, inputs=image, outputs=page_outputs,
              concurrency_id="model", preprocess=False, api_visibility="private")
        image.clear(_page, outputs=page_outputs, api_visibility="private", queue=False)
        show_heatmap.change(lambda shown: gr.update(visible=shown), inputs=show_heatmap, outputs=heatmap,
                            api_visibility="private", queue=False)
        # The API's /predict raises its errors (gradio_client turns them into exceptions); the page shows them.
        api_button = gr.Button(visible=False)
        api_button.click(predict, inputs=image, outputs=result, api_name="predict", concurrency_limit=MAX_BATCH,
                         preprocess=False, api_description=predict.__doc__)
        api_button.click(explain, inputs=image, outputs=gr.JSON(visible=False), api_name="explain",
                         concurrency_id="model", preprocess=False, api_description=explain.__doc__)
        if examples:
            gallery = gr.Examples(examples, inputs=image, label="Examples (click one)")
            gallery.load_input_event.then(predict_on_page, inputs=image, outputs=page_outputs,
                                          concurrency_id="model", api_visibility="private")
    with gr.Tab("Many pictures"):
        files = gr.File(file_count="multiple", file_types=["image"], label=f"Pictures (up to {MAX_BATCH_FILES})",
                        height=180, interactive=ready)
        batch_button = gr.Button("Classify all", variant="primary", interactive=ready)
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Results", interactive=False)
        csv_file = gr.File(label="Download as CSV", visible=False)

    # Gradio's API page would otherwise offer its own bus.png as the sample input.
    image.example_payload, image.example_value = lambda: handle_file(API_EXAMPLES[0]), lambda: API_EXAMPLES[0]
    files.example_payload = lambda: [handle_file(url) for url in API_EXAMPLES]
    files.example_value = lambda: API_EXAMPLES

    # preprocess=False: the handler gets each upload's FileData, with the name the file had on the user's machine.
    batch_button.click(predict_batch, inputs=files, outputs=[table, csv_file], api_name="predict_batch",
                       concurrency_id="model", show_progress_on=table, api_description=predict_batch.__doc__,
                       preprocess=False
                       ).success(lambda: gr.File(visible=True), outputs=csv_file, api_visibility="private", queue=False)

demo.queue(max_size=32, default_concurrency_limit=1)

def _stop_on_sigterm(signum, frame) -> None:
    """A Space (or docker, or systemd) stops the app with SIGTERM: close the server as Ctrl+C does, exit 0."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    demo.launch(max_file_size=f"{SERVER_CAP_MB}mb", css=CSS)
