"""The one serving path: load a trained model from a folder or the Hub, check it, then predict in batches.

    predictor = load_predictor("user/catdog")            # or "user/catdog@v1", or a local folder
    predictor.predict([Image.open("cat.jpg")])           # [{"cat": 0.97, "dog": 0.03}]
    predictor.explain(Image.open("car.jpg"))             # Explanation(probabilities, ood_score, is_cat_or_dog, heatmap)

One engine serves, chosen at load and named by ``predictor.engine``: the OpenVINO IR shipped next to the
weights (engine.py), or eager torch fp32 (export.py) for ``exact=True`` and where OpenVINO cannot serve.
Every file read is checked against the manifest in config.json (manifest.py). Serving the IR needs numpy
and OpenVINO only: torch is imported only for the torch engine. The Gradio app, the evaluation command
and the benchmarks use exactly this object.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from safetensors import SafetensorError

from . import engine as engines
from .engine import IR_FILES, EngineOutputs
from .hardware import usable_cores
from .images import image_array, to_rgb
from .manifest import WEIGHTS
from .model_files import ModelFiles, ModelLoadError, first_line, parse_source
from .heatmap import resize_heatmap
from .ood import OOD_FILE, load_detector, ood_score
from .verdict import Verdict, decide

__all__ = ["Explanation", "ModelLoadError", "PredictionError", "Predictor", "load_predictor", "parse_source"]

logger = logging.getLogger(__name__)


class PredictionError(RuntimeError):
    """The model computed no usable answer (a non-finite output): never passed on as a prediction."""


@dataclass
class Explanation:
    """What the model makes of one picture, beyond the label."""

    probabilities: dict[str, float]  # calibrated, as predict() gives them
    ood_score: Optional[float]  # distance from the training pictures (see ood.py); None if the model has no detector
    is_cat_or_dog: bool  # False when ood_score is above the model's threshold
    heatmap: np.ndarray  # Grad-CAM for the predicted label, float32 in [0, 1], the picture's aspect ratio

    @property
    def verdict(self) -> Verdict:
        """What to tell a person: a label, "not sure" or "neither" (verdict.py, the rule every output uses)."""
        return decide(self.probabilities, self.is_cat_or_dog)


@dataclass
class Predictor:
    """A loaded model and how to ask it. Safe to share between threads: every forward pass runs on one
    model thread, in order of arrival, and ``explain_shared`` batches the single pictures that wait there.

    One thread, because a torch or OpenVINO pass called from many threads at once gives each its own
    thread team: on 2 cores those teams spun against each other and halved a server's throughput.
    """

    backend: Callable[[np.ndarray], EngineOutputs]  # OpenVINOEngine (engine.py) or TorchEngine (export.py)
    config: dict  # the model's own config.json, checked: labels, image_size, temperature, ood_threshold, ...
    source: str
    revision: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    batch_size: int = 16
    detector: Optional[dict] = None  # the tensors of ood.safetensors
    max_shared_batch: int = 8  # explain_shared's largest batch: more adds latency on a 2-core CPU, not throughput
    _files: Optional["ModelFiles"] = field(default=None, repr=False, compare=False)
    _jobs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False, compare=False)
    _model_thread: Optional[threading.Thread] = field(default=None, repr=False, compare=False)
    _start_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def engine(self) -> str:
        """What computes the answers: "openvino-bf16", "openvino-f32" or "torch-fp32"."""
        return self.backend.name

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.config["labels"])

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def ood_threshold(self) -> Optional[float]:
        return self.config["ood_threshold"]

    @property
    def temperature(self) -> float:
        return self.config["temperature"]

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """One ``{label: probability}`` per image, in order, batched: the model's raw answer. For what to
        tell a person ("not sure" and "neither" included) use ``explain(...).verdict``."""
        return [explanation.probabilities for explanation in self.explain_many(images, heatmaps=False, caller="predict")]

    def explain(self, image: Image.Image) -> Explanation:
        """Probabilities, the verdict, whether the picture looks like a cat or a dog at all, and where the
        model looked: all from the one forward pass a prediction makes (the engine computes the heatmap too)."""
        return self.explain_many([image])[0]

    def explain_many(self, images: Sequence[Image.Image], heatmaps: bool = True, caller: str = "explain_many") -> list[Explanation]:
        """``explain`` for each image, in order, ``batch_size`` pictures per forward pass."""
        if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
            hint = ": wrap it in a list" if isinstance(images, Image.Image) else ""
            raise TypeError(f"{caller} takes a list of PIL images, got {type(images).__name__}{hint}")
        explanations = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            upright = [to_rgb(image) for image in batch] if heatmaps else batch  # image_array turns the rest
            outputs = self.outputs(np.stack([image_array(image, self.image_size) for image in upright]))
            explanations.extend(self._explanations(outputs, upright if heatmaps else None))
        return explanations

    def explain_shared(self, image: Image.Image, heatmaps: bool = True) -> Explanation:
        """``explain(image)`` for servers whose threads share this predictor: the pictures that wait
        while the model is busy run together as its next batch (up to ``max_shared_batch``), so that eight
        clients get more answers per second than one, and a lone client waits for no batch to fill.
        The resize happens in the caller's thread, in parallel with the model. ``heatmaps=False``: an
        API answer that shows none skips drawing it."""
        upright = to_rgb(image) if heatmaps else image  # image_array turns it otherwise
        outputs = self._submit(None, image_array(upright, self.image_size))
        return self._explanations(outputs, [upright] if heatmaps else None)[0]

    def explain_pixels(self, pixels) -> list[Explanation]:
        """``explain`` without heatmaps for a batch already turned into model input (``image_array``):
        for servers that decode each picture under a memory budget and batch the small arrays."""
        return self._explanations(self.outputs(pixels), None)

    def outputs(self, pixels) -> EngineOutputs:
        """The engine's outputs for a batch of preprocessed pictures (N, 3, S, S) in [0, 1], numpy or torch;
        ``PredictionError`` if any is not finite."""
        return self._on_model_thread(self._checked_outputs, np.asarray(pixels, dtype=np.float32))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated P(``labels[1]``): the sigmoid of the logit divided by the fitted temperature."""
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / self.temperature))

    def _checked_outputs(self, pixels: np.ndarray) -> EngineOutputs:
        outputs = self.backend(pixels)
        if not all(np.isfinite(values).all() for values in (outputs.logits, *outputs.features.values())):
            raise PredictionError(f"The model {self.source} computed a non-finite output: its weights are damaged. "
                                  "Retrain it, or load another revision.")
        return outputs

    def _explanations(self, outputs: EngineOutputs, upright: Optional[list[Image.Image]]) -> list[Explanation]:
        """One Explanation per picture of a forward pass; heatmaps resized to ``upright``'s shapes, or empty."""
        negative, positive = self.labels
        p = self.probabilities(outputs.logits).tolist()
        scores = ood_score(outputs.features, self.detector).tolist() if self.detector is not None else [None] * len(p)
        explanations = []
        for index, (value, score) in enumerate(zip(p, scores)):
            heatmap = np.zeros((0, 0), np.float32)
            if upright is not None:
                picture = upright[index]
                heatmap = resize_heatmap(outputs.heatmaps[index], picture.width, picture.height, longest=self.image_size)
            looks_right = score is None or score <= self.ood_threshold
            explanations.append(Explanation({negative: 1.0 - value, positive: value}, score, looks_right, heatmap))
        return explanations

    def _on_model_thread(self, function: Callable, *args):
        """``function(*args)``, run on the model thread; its result, or its exception raised here."""
        return self._submit(lambda: function(*args), None)

    def _submit(self, function: Optional[Callable], pixels: Optional[np.ndarray]):
        with self._start_lock:
            if self._model_thread is None:
                self._model_thread = threading.Thread(target=self._serve, name="catdog-model", daemon=True)
                self._model_thread.start()
        future = Future()
        self._jobs.put((function, pixels, future))
        return future.result()

    def _serve(self) -> None:
        """The model thread: a call runs alone; single pictures that wait together run as one batch,
        each waiting caller getting its own picture's outputs."""
        held = None
        while True:
            function, pixels, future = held or self._jobs.get()
            if function is not None:
                futures, run, held = [future], lambda function=function: [function()], None
            else:
                futures, images, held = self._waiting_pictures(future, pixels)
                run = lambda images=images: self._checked_outputs(np.stack(images)).split()  # noqa: E731
            try:
                results = run()
            except BaseException as error:  # every caller waiting on this pass hears of it, not only one
                for waiting in futures:
                    waiting.set_exception(error)
                continue
            for waiting, result in zip(futures, results):
                waiting.set_result(result)

    def _waiting_pictures(self, future: Future, pixels: np.ndarray) -> tuple[list, list, Optional[tuple]]:
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

    def model_file(self, name: str) -> Optional[Path]:
        """One of the model's own files (an evaluation figure, say), checked against its manifest and
        downloaded if it lives on the Hub; None if the model has no such file."""
        return self._files.path(name, required=False) if self._files is not None else None


def _load_engine(files: ModelFiles, exact: bool, threads: int):
    """The OpenVINO IR where it can serve, else torch fp32 (logged)."""
    if not exact and engines.openvino is None:
        logger.warning("OpenVINO is not installed: torch (fp32) serves, several times slower (pip install openvino)")
    elif not exact:
        xml = files.path(IR_FILES[0], required=False)
        binary = files.path(IR_FILES[1], required=False) if xml else None
        try:
            if xml and binary:
                return engines.compile_openvino(xml, threads)
            from .export import export_openvino

            logger.info("%s has no OpenVINO IR (a model trained before it shipped one): exporting it from %s now",
                        files.where, WEIGHTS)
            return engines.compile_openvino(export_openvino(files.torch_model), threads)
        except ModelLoadError:
            raise
        except engines.NonFiniteWeightError as error:
            raise ModelLoadError(f"{files.where}: {error}; retrain the model.") from None
        except Exception as error:  # OpenVINO's reader, converter and compiler raise their own types
            logger.warning("OpenVINO cannot serve %s (%s): torch (fp32) serves instead", files.where, first_line(error))
    from .export import TorchEngine

    return TorchEngine(files.torch_model, threads)


def load_predictor(source: str, batch_size: int = 16, exact: bool = False, threads: Optional[int] = None) -> Predictor:
    """Load a model from a local folder, "user/repo" or "user/repo@revision", ready to serve.

    By default the OpenVINO IR shipped next to the weights serves (engine.py), so a Hub model downloads
    config.json, the IR and ood.safetensors only; ``exact=True`` serves the eager float32 model from
    model.safetensors. Each file is checked against the manifest in config.json. Raises
    ``ModelLoadError``, and only that, with a one-line message naming the source and the reason.
    ``threads``: how many the engine computes with (default: every core this process may use).
    """
    repo_id, revision = parse_source(source)
    files = ModelFiles(str(source).strip(), repo_id, revision)
    config = files.config()
    threads = threads or usable_cores()
    backend = _load_engine(files, exact, threads)
    if backend.image_size != config["image_size"]:
        raise ModelLoadError(f"{files.where}: the engine takes {backend.image_size} px pictures, config.json says "
                             f"{config['image_size']}: its files come from different models.")
    detector = None
    if config["ood_threshold"] is not None:  # models trained before the detector have neither
        try:
            detector = load_detector(files.path(OOD_FILE), backend.feature_sizes)
        except (OSError, ValueError, SafetensorError) as error:
            raise ModelLoadError(f"{files.source}: {str(error).splitlines()[0]}") from None
    metrics_path = files.path("metrics.json", required=False)
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path else {}
    except (OSError, ValueError):
        metrics = {}
    predictor = Predictor(backend, config, source=repo_id, revision=revision,
                          metrics=metrics if isinstance(metrics, dict) else {}, batch_size=batch_size, detector=detector,
                          _files=files)
    logger.info("serving %s with %s", source, predictor.engine)
    return predictor
