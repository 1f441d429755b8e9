"""catdog Space: drag, paste or snap a picture and the model says cat, dog, not sure, or neither.

    python app.py                              # ./catdog-model if it exists, else the published model
    CATDOG_MODEL=some/folder python app.py     # a folder written by train_accelerate.py
    python app.py --model user/repo@v1         # any Hub repo, pinned to a revision
"""

from __future__ import annotations

import argparse
import csv
import html
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gradio as gr

from catdog_model import DEFAULT_LABELS, ImageError, ModelLoadError, Predictor, load_predictor
from catdog_model.cli import debug, exit_with_error, parse_command
from catdog_model.hardware import cap_malloc_arenas, usable_cores
from catdog_model.predict import classify_chunk, decode_chunk, neutralised
from catdog_model.serving.describe import demonstration_notice, details, headline, report
from catdog_model.serving.files import MODEL_ORDER, resolve_model
from catdog_model.serving.space_files import remove_expired, temporary_folder, tidy_cache
from catdog_model.serving.verdict import NEITHER, NOT_SURE, Verdict

MAX_FILE_MB = 10  # per picture: a larger one gets its own clear error (a row of its own in a batch)
SERVER_CAP_MB = 50  # Gradio refuses anything larger outright, against abuse
MAX_BATCH_FILES = 100
EXAMPLES_DIR = Path(__file__).parent / "examples"
FIX_HINT = ("Run `make demo`: with no model to serve, it trains a quick one into ./catdog-model, then serves it. Or set "
            "`CATDOG_MODEL` (or `--model`) to a model folder or a Hub repo you can reach, e.g. `user/repo@v1`.")
# After an answer, bring it into view: on a phone the columns stack and it lies below the picture.
SHOW_ANSWER_JS = "() => document.querySelector('#verdict')?.scrollIntoView({block: 'start', behavior: 'instant'})"
# On a phone, the heatmap and the probabilities share a row under the verdict, and the examples fit 4 a row.
CSS = ("#answer-row { flex-wrap: nowrap; } #answer-row > * { min-width: 0 !important; } "
       "#examples .grid-container { grid-template-columns: repeat(auto-fit, minmax(72px, 1fr)); grid-template-rows: none; "
       "grid-auto-rows: auto; } #examples .grid-wrap { height: auto !important; min-height: 0 !important; } "
       # Captions whole, across the thumbnail's foot; the report's figures one a row on a phone.
       "#examples .caption-label { white-space: normal; max-width: none; left: 0; right: 0; bottom: 0; border-radius: 0; "
       "font-size: 11px; line-height: 1.25; } "
       "@media (max-width: 640px) { #report-figures .grid-container { grid-template-columns: 1fr !important; } } "
       # The batch's results: file names may break anywhere, verdicts and probabilities never.
       "#batch-results { width: 100%; border-collapse: collapse; } #batch-results th { text-align: left; } "
       "#batch-results td { vertical-align: top; padding: 6px 8px; border-top: 1px solid #8884; overflow-wrap: anywhere; } "
       "#batch-results td:last-child { white-space: nowrap; }")

logger = logging.getLogger("catdog.app")


def _upload_path(upload) -> Optional[str]:
    # Gradio hands the raw upload over as a cached file path, a FileData dict or a FileData object.
    return upload if isinstance(upload, str) else upload.get("path") if isinstance(upload, dict) else getattr(upload, "path", None)


def _upload_name(upload) -> str:  # the name the file had on the user's machine, not Gradio's cache name
    name = upload.get("orig_name") if isinstance(upload, dict) else getattr(upload, "orig_name", None)
    return name or Path(_upload_path(upload) or "").name


@dataclass
class Space:
    """The app's handlers, bound to one predictor (or to why there is none)."""

    predictor: Optional[Predictor]
    load_error: Optional[str] = None
    upload_ttl_s: int = 3600
    csv_dir: Path = field(default_factory=lambda: temporary_folder("catdog-csv-"))

    @property
    def table_headers(self) -> list[str]:
        negative, positive = self.predictor.labels if self.predictor else DEFAULT_LABELS
        return ["file", "verdict", f"P({negative})", f"P({positive})", "note"]

    def _require_model(self) -> None:
        if self.predictor is None:
            raise gr.Error(f"No model is loaded: {self.load_error} {FIX_HINT.replace('`', '')}", title="No model",
                           print_exception=False)

    def _api_explanation(self, upload):
        """The API's upload explained, or a gr.Error (gradio_client raises it as AppError)."""
        self._require_model()
        path = _upload_path(upload)
        if not path:
            raise gr.Error("Upload a picture of a cat or a dog first.", print_exception=False)
        try:
            return self.predictor.explain(path, heatmap=False)  # neither endpoint returns one
        except ImageError as error:
            raise gr.Error(str(error), title=error.title, print_exception=False) from None

    def predict(self, upload: str | dict | None) -> dict:
        """Is it a cat or a dog? One of four answers: "cat", "dog", "not sure" (under 70% either way, calibrated) or
        "neither" (unlike every training photo: a car, a cup, noise). Returns {"label": the answer, "confidences": both
        labels' probabilities, [{"label": str, "confidence": float}, ...]}.

        Args:
            upload: the picture: a JPEG, PNG, WebP, GIF... of up to 10 MB and 40 megapixels.
        """
        explanation = self._api_explanation(upload)  # as gr.Label's own value, sent as it is (postprocess=False)
        ranked = sorted(explanation.probabilities.items(), key=lambda item: -item[1])
        return {"label": explanation.verdict.answer, "confidences": [{"label": name, "confidence": p} for name, p in ranked]}

    def explain(self, upload: str | dict | None) -> dict:
        """Is it a cat or a dog, and why? The answer ("cat", "dog", "not sure" under 70% either way, or "neither":
        unlike every training photo) with what it rests on. Returns a dict: verdict (str), the answer; label (str), the
        likelier label; probabilities (dict of str to float); is_cat_or_dog (bool); ood_score (float), "neither" above
        ood_threshold (float).

        Args:
            upload: the picture: a JPEG, PNG, WebP, GIF... of up to 10 MB and 40 megapixels.
        """
        explanation = self._api_explanation(upload)
        return {"verdict": explanation.verdict.answer, "label": explanation.verdict.leaning,
                "probabilities": explanation.probabilities, "is_cat_or_dog": explanation.is_cat_or_dog,
                "ood_score": explanation.ood_score, "ood_threshold": self.predictor.ood_threshold}

    def predict_on_page(self, upload: str | dict | None) -> tuple:
        """The verdict, probabilities and heatmap; problems shown beside the picture, not in a fading toast."""
        if self.predictor is None:
            return _page(status=f"⚠️ **No model is loaded**, so nothing can be classified. {FIX_HINT}")
        path = _upload_path(upload)
        if not path:
            return _page(status="👆 **Choose a picture first:** drop one above, paste one, or tap an example.")
        try:
            explanation = self.predictor.explain(path)
        except ImageError as error:
            return _page(status=f"⚠️ **{error.title}.** {error}")
        verdict = explanation.verdict
        # For "neither", the bars are what the classifier would answer, were it a cat or a dog: labelled so.
        bars = gr.update(value=explanation.probabilities,
                         label="If it were a cat or a dog" if verdict.answer == NEITHER else "Probabilities")
        return _page(bars, verdict=_verdict_markdown(verdict), heatmap=explanation.overlay)

    def predict_batch(self, files: list | None, progress=gr.Progress()) -> tuple[list[list], str]:
        """Cat or dog, for up to 100 pictures: each gets "cat", "dog", "not sure" or "neither", as one picture would,
        or "error" with the reason when it cannot be read. Returns the rows (file, verdict, both probabilities, note)
        and a CSV file of them.

        Args:
            files: the pictures, each a JPEG, PNG, WebP, GIF... of up to 10 MB.
        """
        self._require_model()
        if not files:
            raise gr.Error("Choose one or more pictures first.", print_exception=False)
        if len(files) > MAX_BATCH_FILES:
            raise gr.Error(f"At most {MAX_BATCH_FILES} files at a time, please.", print_exception=False)
        rows, step = [], self.predictor.batch_size
        with ThreadPoolExecutor(2) as pool:
            for start in progress.tqdm(range(0, len(files), step), desc=f"Classifying, {step} pictures a pass"):
                chunk = [(_upload_name(upload), _upload_path(upload) or "") for upload in files[start : start + step]]
                classified = classify_chunk(self.predictor, chunk, decode_chunk(self.predictor, chunk, pool))
                rows += [[row["picture"], row["verdict"], *(None if p is None else round(p, 3) for p in list(row.values())[2:4]),
                          row["note"]] for row in classified]
        return rows, self._write_csv(rows)

    def _write_csv(self, rows: list[list]) -> str:
        """The table as CSV in a folder of its own, so that the file keeps its plain name; folders older than the upload
        TTL go."""
        remove_expired(self.csv_dir.iterdir(), self.upload_ttl_s)
        csv_path = Path(tempfile.mkdtemp(dir=self.csv_dir)) / "catdog-predictions.csv"
        with open(csv_path, "w", newline="") as out:
            csv.writer(out).writerows([self.table_headers, *([neutralised(cell) for cell in row] for row in rows)])
        return str(csv_path)

    def predict_batch_on_page(self, files: list | None, progress=gr.Progress()) -> tuple:
        """The page's batch: the same rows, two columns that fit a phone, problems shown inline."""
        try:
            rows, csv_path = self.predict_batch(files, progress)
        except gr.Error as error:
            return gr.update(), gr.update(visible=False), _status(f"👆 **{error.message}**")
        return _results_html(rows, self.table_headers), gr.update(value=csv_path, visible=True), _status()


def _results_html(rows: list[list], headers: list[str]) -> str:
    """The batch's rows in two narrow columns: file over note, verdict over probabilities."""
    def cell(text: str, under: str) -> str:
        return f"<td><b>{html.escape(str(text))}</b>" + (f"<br><small>{html.escape(under)}</small>" if under else "") + "</td>"

    body = "".join(
        "<tr>" + cell(name, note) + cell(verdict, "" if p_negative is None else
                                         f"{headers[2]} {p_negative:.3f} · {headers[3]} {p_positive:.3f}") + "</tr>"
        for name, verdict, p_negative, p_positive, note in rows)
    return f"<table id='batch-results'><thead><tr><th>file</th><th>verdict</th></tr></thead><tbody>{body}</tbody></table>"


def _status(text: str = "") -> dict:
    return gr.update(value=text, visible=bool(text))


def _verdict_markdown(verdict: Verdict) -> str:
    icon = {NEITHER: "🚫", NOT_SURE: "🤔"}.get(verdict.answer, "🐱" if verdict.leaning == DEFAULT_LABELS[0] else "🐶")
    title = {NEITHER: "Neither a cat nor a dog", NOT_SURE: "Not sure"}.get(verdict.answer, verdict.answer.capitalize())
    return f"### {icon} {html.escape(title)}\n{html.escape(verdict.sentence())}"


def _page(label=None, status: str = "", verdict: str = "", heatmap=None) -> tuple:
    """The first tab's outputs: probabilities, status, verdict, heatmap."""
    return label, _status(status), gr.update(value=verdict, visible=bool(verdict)), heatmap


def _examples() -> tuple[list[str], list[str]]:
    """The pictures examples/README.md credits, with its captions: an uncredited picture is not shown."""
    credits = (EXAMPLES_DIR / "README.md").read_text() if (EXAMPLES_DIR / "README.md").is_file() else ""
    rows = [(str(EXAMPLES_DIR / name), caption.strip()) for name, caption in re.findall(r"^\| `([^`]+)` \|([^|]+)\|", credits, re.M)]
    return [path for path, _ in rows if Path(path).is_file()], [caption for path, caption in rows if Path(path).is_file()]


def build_demo(predictor: Optional[Predictor], load_error: Optional[str] = None, concurrency: int = 4,
               upload_ttl_s: int = 3600) -> gr.Blocks:
    """The Space's page and API for this predictor (None: a page that says why, ``load_error``)."""
    space, ready = Space(predictor, load_error, upload_ttl_s), predictor is not None
    with gr.Blocks(title="catdog: cat or dog?", delete_cache=(min(600, upload_ttl_s), upload_ttl_s)) as demo:
        gr.Markdown("# 🐱 catdog 🐶\nDrop a photo of a cat or a dog, paste one, or use your webcam. "
                    + (headline(predictor) if ready else "No model is loaded yet."))
        notice = demonstration_notice(predictor) if ready else f"### ⚠️ No model loaded\n\n{load_error}\n\n**To fix it:** {FIX_HINT}"
        gr.Markdown(notice or "", visible=bool(notice), elem_id="notice")
        with gr.Tab("One picture"):
            _picture_tab(space, ready, concurrency)
        with gr.Tab("Many pictures"):
            _batch_tab(space, ready)
        if ready:
            with gr.Accordion("How good is this model?", open=False, elem_id="report"):
                text, figures = report(predictor)
                gr.Markdown(text)
                if figures:
                    gr.Gallery(figures, columns=3, height="auto", label="Evaluation on the test photos", object_fit="contain",
                               elem_id="report-figures")
            with gr.Accordion("About the model", open=False, elem_id="model-panel"):
                gr.Markdown(details(predictor))
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def _picture_tab(space: Space, ready: bool, concurrency: int) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                             label="Picture", height=300, interactive=ready)
            status = gr.Markdown(visible=False, elem_id="upload-status")
            button = gr.Button("Classify", variant="primary", interactive=ready)
        with gr.Column(elem_id="result-column"):
            verdict = gr.Markdown(visible=False, elem_id="verdict")
            with gr.Row(elem_id="answer-row"):
                heatmap = gr.Image(label="Where it looked", elem_id="heatmap", interactive=False,
                                   height=180, buttons=["download", "fullscreen"])
                result = gr.Label(num_top_classes=2, label="Probabilities", elem_id="result", show_heading=False)
            show_heatmap = gr.Checkbox(value=True, label="Show where the model looked (Grad-CAM)", interactive=ready)
    outputs = [result, status, verdict, heatmap]
    # preprocess=False: the handlers get the uploaded file itself, before Pillow opens it, so that the predictor can
    # check it first. The page's events take turns in one slot; /predict and /explain calls decode side by side up
    # to `concurrency`, and their forward passes take turns (the predictor's lock).
    gr.on([image.upload, button.click], space.predict_on_page, inputs=image, outputs=outputs,
          concurrency_id="model", preprocess=False, api_visibility="private").then(None, js=SHOW_ANSWER_JS)
    image.clear(_page, outputs=outputs, api_visibility="private", queue=False)
    show_heatmap.change(lambda shown: gr.update(visible=shown), inputs=show_heatmap, outputs=heatmap,
                        api_visibility="private", queue=False)
    # The API's endpoints raise their errors (gradio_client turns them into exceptions); the page shows them.
    api_button, explanation = gr.Button(visible=False), gr.JSON(label="Explanation", visible=False)
    # /predict's value is already gr.Label's own format, headed by the verdict: sent as it is (postprocess=False).
    for handler, output, postprocess in ((space.predict, gr.Label(label="Verdict", visible=False), False),
                                         (space.explain, explanation, True)):
        api_button.click(handler, inputs=image, outputs=output, api_name=handler.__name__, concurrency_limit=concurrency,
                         concurrency_id="shared", preprocess=False, postprocess=postprocess)
    examples, captions = _examples()
    if examples:  # thumbnails with captions; a tap loads the picture into the input and classifies it
        gallery = gr.Gallery(list(zip(examples, captions)), label="Examples: tap one", height="auto",
                             allow_preview=False, interactive=False, elem_id="examples")

        def pick(selected: gr.SelectData) -> str:
            return examples[selected.index]

        gallery.select(pick, outputs=image, api_visibility="private", queue=False).then(
            space.predict_on_page, inputs=image, outputs=outputs, concurrency_id="model", preprocess=False,
            api_visibility="private").then(None, js=SHOW_ANSWER_JS)


def _batch_tab(space: Space, ready: bool) -> None:
    files = gr.File(file_count="multiple", file_types=["image"], label=f"Pictures (up to {MAX_BATCH_FILES})",
                    height=180, interactive=ready)
    status = gr.Markdown(visible=False, elem_id="batch-status")
    button = gr.Button("Classify all", variant="primary", interactive=ready)
    table = gr.HTML(elem_id="batch-table")
    csv_file = gr.File(label="Download as CSV", visible=False)
    # preprocess=False: the handler gets each upload's FileData, with the name the file had on the user's machine.
    button.click(space.predict_batch_on_page, inputs=files, outputs=[table, csv_file, status], concurrency_id="model",
                 show_progress_on=table, preprocess=False, api_visibility="private")
    rows = gr.Dataframe(headers=space.table_headers, label="Results", visible=False)  # the API's rows
    gr.Button(visible=False).click(space.predict_batch, inputs=files, outputs=[rows, gr.File(label="CSV", visible=False)],
                                   api_name="predict_batch", concurrency_id="model", preprocess=False)


def _setting(name: str, default: str, minimum: int, maximum: int = 2**31 - 1) -> int:
    """$name as a whole number in [minimum, maximum]; anything else stops the app with one line."""
    value = os.environ.get(name, default).strip()
    if value.isdecimal() and minimum <= int(value) <= maximum:
        return int(value)
    exit_with_error(f"${name} must be a whole number from {minimum} to {maximum}, got {value!r} (see the settings "
                    "table in README.md)")


def _model_source(argv: list[str]) -> tuple[str, str, bool]:
    """The model to serve, why that one, and --check."""
    parser = argparse.ArgumentParser(description="Serve the catdog demo.")
    parser.add_argument("--model", default=None, help=f"Hub repo id, id@revision, or a local folder (default: {MODEL_ORDER})")
    parser.add_argument("--check", action="store_true", help="only load the model: exit 0 if it can be served, else 1")
    parsed = parse_command(parser, argv)
    try:
        return (*resolve_model(parsed.model), parsed.check)
    except ModelLoadError as error:
        exit_with_error(error)


class _HangUpsInOneLine(logging.Filter):
    """A visitor closing the tab mid-upload is routine: one log line, not starlette's traceback (kept with
    CATDOG_DEBUG=1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        hung_up = record.exc_info and type(record.exc_info[1]).__name__ == "ClientDisconnect"  # starlette's, under gradio
        if hung_up and not debug():
            record.msg, record.args, record.exc_info = "a client hung up before its request was read", (), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def main(argv: list[str]) -> None:
    # Before the model's threads start. CATDOG_MALLOC_ARENAS=0 switches it off (for the load test).
    cap_malloc_arenas(_setting("CATDOG_MALLOC_ARENAS", "2", minimum=0, maximum=1024))
    concurrency = _setting("CATDOG_CONCURRENCY", "4", minimum=1, maximum=64)  # API calls decoded side by side
    upload_ttl_s = _setting("CATDOG_UPLOAD_TTL", "3600", minimum=1, maximum=10 * 365 * 86400)
    uploads_mb = _setting("CATDOG_UPLOADS_MB", "500", minimum=SERVER_CAP_MB)  # room for one upload of the largest size
    threads = _setting("CATDOG_THREADS", str(min(2, usable_cores())), minimum=1, maximum=1024)
    source, why, check = _model_source(argv)
    logging.getLogger("uvicorn.error").addFilter(_HangUpsInOneLine())
    logger.info("loading the model %s (%s)", source, why)
    try:
        predictor, load_error = load_predictor(source, threads=threads, max_megabytes=MAX_FILE_MB), None
        where = "the local folder" if predictor.files.local else f"revision {predictor.revision or 'main'} of"
        logger.info("serving %s %s", where, predictor.source)
    except ModelLoadError as error:
        predictor, load_error = None, str(error)
        logger.error("no model: %s", load_error)
    if check:
        sys.exit(0 if predictor else 1)
    demo = build_demo(predictor, load_error, concurrency=concurrency, upload_ttl_s=upload_ttl_s)
    # A Space (or docker, or systemd) stops the app with SIGTERM: close the server as Ctrl+C does, and exit 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    threading.Thread(target=tidy_cache, args=(demo, upload_ttl_s, uploads_mb), daemon=True).start()
    # show_error: what Gradio itself refuses before a handler runs (a picture's URL that the server cannot fetch, say)
    # reaches the client with its reason, not "has not enabled verbose error reporting".
    # mcp_server: the three endpoints are also MCP tools for AI agents, described by their docstrings.
    demo.launch(max_file_size=f"{SERVER_CAP_MB}mb", css=CSS, show_error=True, mcp_server=True)


if __name__ == "__main__":
    main(sys.argv[1:])
