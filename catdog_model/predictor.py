"""The one serving path: load a trained model from a folder or the Hub, then predict in batches.

    predictor = load_predictor("user/catdog")            # or "user/catdog@v1", or a local folder
    predictor.predict([Image.open("cat.jpg")])           # [{"cat": 0.97, "dog": 0.03}]
    predictor.explain(Image.open("car.jpg"))             # Explanation(probabilities, ood_score, is_cat_or_dog, heatmap)

The Gradio app and the benchmarks use exactly this object.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from safetensors import SafetensorError

from .images import check_image, preprocess, to_rgb
from .model import CatDogClassifier
from .ood import OOD_FILE, grad_cam, load_detector, ood_score, resize_heatmap
from .openvino_engine import OpenVINOForward, try_openvino
from .serving import SERVING_FILE, Int8Linear, load_serving_file, make_fast

__all__ = ["Explanation", "ModelLoadError", "Predictor", "load_predictor", "parse_source"]

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what is missing and how to fix it."""


def parse_source(source: str) -> tuple[str, Optional[str]]:
    """Split "user/repo@revision" into ("user/repo", "revision"), or check a local folder.

    Raises ``ModelLoadError`` for what can be neither: an empty name, a file, a local-looking path
    that does not exist, a revision on a local folder, or a string that is no Hub repo id.
    """
    source = str(source).strip()
    if not source:
        raise ModelLoadError("No model given: pass a folder written by train_accelerate.py or a Hub id like user/repo.")
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelLoadError(f"{source} is a file; pass the folder that holds config.json and model.safetensors.")
    repo_id, _, revision = source.partition("@")
    if Path(repo_id).expanduser().is_dir():
        raise ModelLoadError(f"{source}: a local folder has no revisions; drop '@{revision}' or pass a Hub id.")
    # Our models always live under a user or organisation, so "name", "./name" or "a/b/c" mean a folder.
    looks_local = repo_id.startswith((".", "/", "~")) or "\\" in repo_id or repo_id.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"No such model folder: {source} (a Hub id has the form user/repo).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"{source!r} is neither a folder nor a valid Hub id (user/repo, optionally @revision).") from None
    if "@" in source and not revision:
        raise ModelLoadError(f"{source!r} ends with '@' but names no revision.")
    return repo_id, revision or None


@dataclass
class Explanation:
    """What the model makes of one picture, beyond the label."""

    probabilities: dict[str, float]  # calibrated, as predict() gives them
    ood_score: Optional[float]  # distance from the training pictures (see ood.py); None if the model has no detector
    is_cat_or_dog: bool  # False when ood_score is above the model's threshold
    heatmap: np.ndarray  # Grad-CAM for the predicted label, float32 in [0, 1], the picture's aspect ratio


@dataclass
class Predictor:
    """A loaded model and how to ask it. Safe to share between threads: every forward pass runs on one
    model thread, in order of arrival, and ``predict_shared`` batches the single pictures that wait there.

    One thread, because torch gives each calling thread its own OpenMP team: a server calling the model
    from many threads left the last team spinning while the next worked, which halved the throughput
    of 8 concurrent clients on 2 cores.
    """

    model: CatDogClassifier
    source: str
    revision: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    batch_size: int = 16
    detector: Optional[dict] = None  # the tensors of ood.safetensors
    max_shared_batch: int = 8  # predict_shared's largest batch: more adds latency on a 2-core CPU, not throughput
    openvino: Optional[OpenVINOForward] = None  # computes the forward pass once compiled (openvino_engine.py)
    _openvino_thread: Optional[threading.Thread] = field(default=None, repr=False, compare=False)
    _jobs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False, compare=False)
    _model_thread: Optional[threading.Thread] = field(default=None, repr=False, compare=False)
    _start_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def serving_path(self) -> str:
        """How the model computes: "exact fp32", or the fast path's precision."""
        if not isinstance(self.model.head[1], Int8Linear):
            return "exact fp32"
        path = f"{'bf16' if self.model.compute_dtype == torch.bfloat16 else 'fp32'} backbone + int8 head"
        return path + (", OpenVINO" if self.openvino is not None else "")

    def start_openvino(self, wait: bool = False) -> None:
        """Compile the fast path with OpenVINO: now, or on a background thread once the first answer is out,
        so that a server's first request is not slowed; torch serves until it is done. Where OpenVINO is
        missing or fails, torch goes on serving (logged)."""
        if not isinstance(self.model.head[1], Int8Linear) or self._openvino_thread is not None:
            return
        threads = torch.get_num_threads()
        compile_now = lambda: setattr(self, "openvino", try_openvino(self.model, threads))  # noqa: E731
        self._openvino_thread = threading.Thread(target=compile_now, name="catdog-openvino", daemon=True)
        if wait:
            self.wait_for_openvino()

    def wait_for_openvino(self, timeout: Optional[float] = None) -> bool:
        """Start a pending compile if it has not started, wait for it; True if OpenVINO now serves."""
        self._begin_openvino()
        if self._openvino_thread is not None:
            self._openvino_thread.join(timeout)
        return self.openvino is not None

    def _begin_openvino(self) -> None:
        """Start the compile thread that ``start_openvino`` prepared, once; a no-op otherwise."""
        with self._start_lock:
            if self._openvino_thread is not None and self._openvino_thread.ident is None:
                self._openvino_thread.start()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """One ``{label: probability}`` per image, in order, batched."""
        if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
            hint = ": wrap it in a list" if isinstance(images, Image.Image) else ""
            raise TypeError(f"predict takes a list of PIL images, got {type(images).__name__}{hint}")
        results = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([preprocess(image, self.image_size) for image in images[start : start + self.batch_size]])
            results.extend(self._on_model_thread(self._probabilities, batch))
        return results

    @torch.inference_mode()
    def _probabilities(self, batch: torch.Tensor) -> list[dict[str, float]]:
        negative, positive = self.labels
        logits = self.openvino(batch)[1] if self.openvino is not None else self.model(batch)
        return [{negative: 1.0 - p, positive: p} for p in self.model.probability(logits).tolist()]

    def predict_shared(self, image: Image.Image) -> dict[str, float]:
        """``predict([image])[0]`` for servers whose threads share this predictor: the pictures that wait
        while the model is busy run together as its next batch (up to ``max_shared_batch``), so that eight
        clients get more answers per second than one, and a lone client waits for no batch to fill.
        The resize happens in the caller's thread, in parallel with the model."""
        return self._submit(None, preprocess(image, self.image_size))

    def _on_model_thread(self, function: Callable, *args):
        """``function(*args)``, run on the model thread; its result, or its exception raised here."""
        return self._submit(lambda: function(*args), None)

    def _submit(self, function: Optional[Callable], pixels: Optional[torch.Tensor]):
        with self._start_lock:
            if self._model_thread is None:
                self._model_thread = threading.Thread(target=self._serve, name="catdog-model", daemon=True)
                self._model_thread.start()
        future = Future()
        self._jobs.put((function, pixels, future))
        return future.result()

    def _serve(self) -> None:
        """The model thread: a call runs alone; single pictures that wait together run as one batch."""
        held = None
        while True:
            function, pixels, future = held or self._jobs.get()
            if function is not None:
                futures, run, held = [future], lambda function=function: [function()], None
            else:
                futures, images, held = self._waiting_pictures(future, pixels)
                run = lambda images=images: self._probabilities(torch.stack(images))  # noqa: E731
            try:
                results = run()
            except BaseException as error:  # every caller waiting on this pass hears of it, not only one
                for waiting in futures:
                    waiting.set_exception(error)
                continue
            for waiting, result in zip(futures, results):
                waiting.set_result(result)
            self._begin_openvino()  # the first answer is out: a pending OpenVINO compile may start now

    def _waiting_pictures(self, future: Future, pixels: torch.Tensor) -> tuple[list, list, Optional[tuple]]:
        """This picture and those queued behind it, up to ``max_shared_batch``; and the call that stopped
        the batch, if one did (it runs next, in its turn)."""
        futures, images = [future], [pixels]
        while len(futures) < self.max_shared_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job[0] is not None:
                return futures, images, job
            images.append(job[1])
            futures.append(job[2])
        return futures, images, None

    def explain(self, image: Image.Image) -> Explanation:
        """Probabilities, whether the picture looks like a cat or a dog at all, and where the model looked.

        One backbone pass; the heatmap's gradient is computed in closed form from the head's weights.
        """
        upright = to_rgb(check_image(image))
        pixels = preprocess(upright, self.image_size)[None]
        logits, features, heatmaps = self._on_model_thread(lambda: grad_cam(self.model, pixels, self.openvino))
        p = float(self.model.probability(logits)[0])
        negative, positive = self.labels
        score, looks_right = None, True
        if self.detector is not None:
            score = float(ood_score(features, self.detector)[0])
            looks_right = score <= self.model.ood_threshold
        heatmap = resize_heatmap(heatmaps[0], upright.width, upright.height, longest=self.image_size)
        return Explanation({negative: 1.0 - p, positive: p}, score, looks_right, heatmap)


def _read_json(repo_id: str, filename: str, revision: Optional[str]) -> object:
    """A JSON file next to the weights, from the folder or the Hub (huggingface_hub caches it)."""
    path = Path(repo_id) / filename if Path(repo_id).is_dir() else hf_hub_download(repo_id, filename, revision=revision)
    return json.loads(Path(path).read_text())


def _read_metrics(repo_id: str, revision: Optional[str]) -> dict:
    """metrics.json, if the training script wrote one; {} otherwise: it only feeds the model panel."""
    try:
        metrics = _read_json(repo_id, "metrics.json", revision)
    except (OSError, ValueError, EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _serving_file(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """model.serving.safetensors if the model has one (models trained before it existed do not)."""
    if Path(repo_id).is_dir():
        path = Path(repo_id) / SERVING_FILE
        return str(path) if path.is_file() else None
    try:
        return hf_hub_download(repo_id, SERVING_FILE, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError):  # none, or not cached offline: model.safetensors may be
        return None


def _load_model(source: str, repo_id: str, revision: Optional[str], exact: bool) -> CatDogClassifier:
    local = Path(repo_id).is_dir()
    where = repo_id if local else f"{source!r} on the Hub"
    if local and not (Path(repo_id) / "config.json").is_file():
        raise ModelLoadError(f"{repo_id} has no config.json: it is not a folder written by train_accelerate.py.")
    try:
        serving = None if exact else _serving_file(repo_id, revision)
        if local and not serving and not (Path(repo_id) / "model.safetensors").is_file():
            raise ModelLoadError(f"Could not read the model in {repo_id}: model.safetensors is missing.")
        config = _read_json(repo_id, "config.json", revision)
        if not isinstance(config, dict):
            raise ModelLoadError(f"The config.json of {where} is a JSON {type(config).__name__}, not an object.")
        if serving:
            return load_serving_file(config, serving)
        model = CatDogClassifier.from_pretrained(repo_id, revision=revision)
        return model if exact else make_fast(model)
    except (LocalEntryNotFoundError, EntryNotFoundError) as error:
        if local:
            raise ModelLoadError(f"Could not read the model in {repo_id}: {error}") from None
        raise ModelLoadError(
            f"Could not download {source!r} from the Hugging Face Hub (offline, no access, or a file is missing)."
        ) from None
    except HfHubHTTPError as error:
        raise ModelLoadError(f"The Hub refused {source!r}: {str(error).splitlines()[0]}") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"The config.json of {where} is not valid JSON ({error}).") from None
    except ModelLoadError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, SafetensorError, OSError) as error:
        # Weights that do not fit the config (strict loading), or a config this code cannot build.
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ModelLoadError(f"The files of {where} do not form a valid model: {reason}") from None


def _load_detector(source: str, repo_id: str, revision: Optional[str], model: CatDogClassifier) -> Optional[dict]:
    """ood.safetensors when the config has a threshold (models trained before the detector have neither)."""
    if model.ood_threshold is None:
        return None
    try:
        path = Path(repo_id) / OOD_FILE if Path(repo_id).is_dir() else hf_hub_download(repo_id, OOD_FILE, revision=revision)
        return load_detector(path, model)
    except (OSError, EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError):
        raise ModelLoadError(f"{source}: config.json sets ood_threshold but {OOD_FILE} could not be read.") from None
    except (ValueError, SafetensorError) as error:
        raise ModelLoadError(f"{source}: {str(error).splitlines()[0]}") from None


OPENVINO_MODES = ("background", "now", "off")


def load_predictor(source: str, batch_size: int = 16, exact: bool = False, openvino: Optional[str] = None) -> Predictor:
    """Load a model from a local folder, "user/repo" or "user/repo@revision", in eval mode.

    By default it serves the fast CPU path (serving.py), from ``model.serving.safetensors`` when the model
    has one, so that only that file and config.json are read or downloaded. ``exact=True`` serves the
    eager float32 model from ``model.safetensors``. Raises ``ModelLoadError``, and only that, with a
    one-line message naming the source and the reason.

    ``openvino`` (default: $CATDOG_OPENVINO, else "background"): compile the fast path with OpenVINO on a
    background thread while torch serves ("background"), before returning ("now"), or not at all ("off").
    """
    mode = openvino or os.environ.get("CATDOG_OPENVINO") or "background"
    if mode not in OPENVINO_MODES:
        raise ModelLoadError(f"openvino (or $CATDOG_OPENVINO) must be one of {', '.join(OPENVINO_MODES)}, got {mode!r}.")
    repo_id, revision = parse_source(source)
    model = _load_model(str(source).strip(), repo_id, revision, exact)
    model.eval()
    detector = _load_detector(str(source).strip(), repo_id, revision, model)
    predictor = Predictor(model, source=repo_id, revision=revision, metrics=_read_metrics(repo_id, revision),
                          batch_size=batch_size, detector=detector)
    if not exact and mode != "off":
        predictor.start_openvino(wait=mode == "now")
    logger.info("serving %s: %s", source, predictor.serving_path)
    return predictor
