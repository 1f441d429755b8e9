"""The one serving path: load a trained model from a folder or the Hub, check it, then classify pictures.

    predictor = load_predictor("user/catdog")            # or "user/catdog@v1", or a local folder
    predictor.predict(["cat.jpg"])                       # [{"cat": 0.97, "dog": 0.03}]: PIL images or paths
    predictor.explain("car.jpg").verdict.answer          # "neither": see Explanation
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from ..config import INT8_IR_FILES, IR_FILES, OOD_FILE, WEIGHTS
from ..hardware import int8_pays, usable_cores
from ..images import MAX_PIXELS, decode, model_input, open_image, to_rgb
from .detector import ood_score
from .engine import EngineOutputs, OpenVINOEngine, compile_openvino
from .files import REEXPORT, ModelFiles, ModelLoadError, first_line, parse_source
from .verdict import Verdict, decide

__all__ = ["DecodeBudget", "Explanation", "ModelLoadError", "Predictor", "load_predictor"]

logger = logging.getLogger(__name__)

Picture = Union[Image.Image, str, Path, bytes]


class DecodeBudget:
    """Bytes that decoded pictures may hold at once across threads, so a server's memory stays bounded."""

    def __init__(self, total_bytes: int) -> None:
        self.total, self.free = total_bytes, total_bytes
        self._changed = threading.Condition()

    def acquire(self, cost: int) -> int:
        cost = min(self.total, cost)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= cost)
            self.free -= cost
        return cost

    def release(self, cost: int) -> None:
        with self._changed:
            self.free += cost
            self._changed.notify_all()


def decode_cost(image: Image.Image) -> int:
    """The peak bytes of decoding ``image`` and converting it to RGB, from its header: Pillow's bytes a pixel for its
    mode, plus the RGB copy's and any working copy's, plus a row of the decoder's (a 40,000,000-pixel strip's is
    160 MB)."""
    stored = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    working = 8 if image.mode.startswith("I") or image.mode == "F" else 5 if "A" in image.mode or image.mode == "P" else 4
    return image.width * image.height * (stored + working) + image.width * 4


# Two of the largest RGB pictures allowed, decoded and converted, at once.
DEFAULT_BUDGET = 2 * MAX_PIXELS * 8


def _jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib's "jet" colours for values in [0, 1], as uint8 RGB."""
    channels = [np.clip(1.5 - np.abs(4 * values - offset), 0, 1) for offset in (3, 2, 1)]
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


def _fitted(width: int, height: int, longest: int) -> tuple[int, int]:
    """A (width, height) scaled until its longest side is ``longest``."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _stretched(heatmap: np.ndarray, width: int, height: int, longest: int) -> np.ndarray:
    """A (h, w) heatmap stretched back to the picture's aspect ratio."""
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(_fitted(width, height, longest), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def _overlay(picture: Image.Image, heatmap: np.ndarray, opacity: float = 0.45, longest: int = 384) -> Image.Image:
    """The picture, its longest side ``longest`` pixels, under the heatmap in "jet" colours."""
    small = picture.resize(_fitted(*picture.size, longest), Image.BILINEAR, reducing_gap=3.0)
    heat = Image.fromarray(_jet(heatmap)).resize(small.size, Image.BILINEAR)
    return Image.blend(small, heat, opacity)


@dataclass
class Explanation:
    """What the model makes of one picture, beyond the label."""

    probabilities: dict[str, float]  # calibrated, as predict() gives them
    ood_score: float  # distance from the training pictures (see detector.py)
    is_cat_or_dog: bool  # False when ood_score is above the model's threshold
    heatmap: Optional[np.ndarray] = None  # Grad-CAM for the likelier label, float32 in [0, 1], the picture's aspect ratio
    overlay: Optional[Image.Image] = None  # the picture with the heatmap drawn over it, its longest side 384 px

    @property
    def verdict(self) -> Verdict:
        """What to tell a person: a label, "not sure" or "neither" (verdict.py)."""
        return decide(self.probabilities, self.is_cat_or_dog)


@dataclass
class Predictor:
    """A loaded model and how to ask it. Thread-safe: decoding runs in the caller's thread, forward passes one at a time
    under a lock (on a 2-core CPU, passes side by side only fight over the cores)."""

    engine: OpenVINOEngine  # pixels -> EngineOutputs
    files: ModelFiles  # the model's files, each checked against its manifest
    source: str  # a local folder or "user/repo"
    revision: Optional[str]
    labels: tuple[str, str]  # config.json's, as check_config reads them (config.py)
    image_size: int
    backbone: str
    temperature: float  # probabilities are sigmoid(logit / temperature), fitted after training
    ood_threshold: float  # a "neither" score above this is "neither" (detector.py)
    detector: dict  # the arrays of ood.safetensors
    metrics: dict = field(default_factory=dict)  # metrics.json: how the model was trained
    evaluation: dict = field(default_factory=dict)  # evaluation.json: how good it is on its test split
    batch_size: int = 16
    max_megabytes: Optional[float] = None  # refuse picture files larger than this
    budget: DecodeBudget = field(default_factory=lambda: DecodeBudget(DEFAULT_BUDGET), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def engine_name(self) -> str:
        """"openvino-int8", "openvino-bf16" or "openvino-f32"."""
        return self.engine.name

    @property
    def weights_sha256(self) -> str:
        """The sha256 of the weights every file of this model was made from."""
        return self.files.manifest["files"][WEIGHTS]["sha256"]

    def predict(self, pictures: Sequence[Picture]) -> list[dict[str, float]]:
        """One ``{label: probability}`` per picture, in order. For what to tell a person, use ``explain(...).verdict``.
        """
        return [explanation.probabilities for explanation in self.explain_many(pictures, caller="predict")]

    def explain(self, picture: Picture, heatmap: bool = True) -> Explanation:
        """Probabilities, verdict, the "neither" score and (``heatmap``) where the model looked: one forward pass."""
        if heatmap:
            with self._decoded(picture) as image:
                upright = to_rgb(image, draft_size=self.image_size)
                explanation = self._explanations(self.outputs(model_input(upright, self.image_size)[None]))[0]
                explanation.heatmap = _stretched(explanation.heatmap, upright.width, upright.height, self.image_size)
                explanation.overlay = _overlay(upright, explanation.heatmap)
                return explanation
        return self.explain_many([picture])[0]

    def explain_many(self, pictures: Sequence[Picture], caller: str = "explain_many") -> list[Explanation]:
        """``explain`` without heatmaps, ``batch_size`` pictures a forward pass."""
        if isinstance(pictures, (str, bytes, Path, Image.Image)) or not isinstance(pictures, Sequence):
            hint = ": wrap it in a list" if isinstance(pictures, (str, Path, Image.Image)) else ""
            raise TypeError(f"{caller} takes a list of PIL images or file paths, got {type(pictures).__name__}{hint}")
        return [explanation for start in range(0, len(pictures), self.batch_size) for explanation in
                self.explain_inputs([self.model_input(picture) for picture in pictures[start : start + self.batch_size]])]

    def model_input(self, picture: Picture) -> np.ndarray:
        """One picture as the model's (3, S, S) uint8 input, decoded under the budget."""
        with self._decoded(picture) as image:
            return model_input(image, self.image_size)

    def explain_inputs(self, inputs: Sequence[np.ndarray]) -> list[Explanation]:
        """``explain`` without heatmaps, for inputs already decoded (``model_input``) by the caller's threads."""
        return [explanation for start in range(0, len(inputs), self.batch_size)
                for explanation in self._explanations(self.outputs(np.stack(inputs[start : start + self.batch_size])))]

    def outputs(self, pixels: np.ndarray) -> EngineOutputs:
        """The engine's outputs for (N, 3, S, S) uint8 or [0, 1] pixels, one pass at a time."""
        pixels = np.asarray(pixels)
        pixels = pixels.astype(np.float32) / 255 if pixels.dtype == np.uint8 else pixels.astype(np.float32)
        with self._lock:
            return self.engine(pixels)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated P(``labels[1]``): sigmoid(logit / temperature)."""
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / self.temperature))

    def _explanations(self, outputs: EngineOutputs) -> list[Explanation]:
        negative, positive = self.labels
        scores = ood_score(outputs.features, self.detector).tolist()
        return [Explanation({negative: 1.0 - p, positive: p}, score, score <= self.ood_threshold, heatmap)
                for p, score, heatmap in zip(self.probabilities(outputs.logits).tolist(), scores, outputs.heatmaps)]

    @contextlib.contextmanager
    def _decoded(self, picture: Picture) -> Iterator[Image.Image]:
        """The picture opened (if a path) and decoded under the budget; closed at the end if this opened it."""
        opened = None
        if isinstance(picture, (str, Path, bytes)):
            picture = opened = open_image(picture, draft_size=self.image_size, max_megabytes=self.max_megabytes,
                                          decode_now=False)
        elif not isinstance(picture, Image.Image):
            raise TypeError(f"expected a PIL image, a file path or a file's bytes, got {type(picture).__name__}")
        cost = self.budget.acquire(decode_cost(picture))
        try:
            decode(picture, draft_size=self.image_size)
            yield picture
        finally:
            self.budget.release(cost)
            if opened is not None:
                opened.close()

    def model_file(self, name: str) -> Optional[Path]:
        """One of the model's optional files (a figure, say), checked; None, with a log line, if unusable."""
        return _optional_file(self.files, name)


def _optional_file(files: ModelFiles, name: str) -> Optional[Path]:
    try:
        return files.path(name, required=False)
    except ModelLoadError as error:
        logger.warning("leaving %s out: %s", name, error)
        return None


def _load_engine(files: ModelFiles, threads: int, int8: Optional[bool]) -> OpenVINOEngine:
    """The int8 engine where the model has one and ``int8`` allows (by default: where the CPU has int8 dot products),
    else the other."""
    has_int8 = INT8_IR_FILES[0] in files.manifest["files"]
    if int8 and not has_int8:
        raise ModelLoadError(f"{files.where} has no int8 engine (none passed its check, or it predates them): "
                             f"make one with `{REEXPORT} FOLDER --int8`.")
    names = INT8_IR_FILES if has_int8 and (int8_pays() if int8 is None else int8) else IR_FILES
    xml, _ = files.path(names[0]), files.path(names[1])  # OpenVINO reads the .bin beside the .xml
    try:
        return compile_openvino(xml, threads, int8=names == INT8_IR_FILES)
    except Exception as error:  # OpenVINO's reader and compiler raise their own types
        raise ModelLoadError(f"{files.where}: OpenVINO cannot read {names[0]} ({first_line(error)}).") from None


def _optional_json(files: ModelFiles, name: str) -> dict:
    """metrics.json or evaluation.json: they only describe the model, so one its manifest cannot vouch for is left out."""
    path = _optional_file(files, name)
    return json.loads(path.read_text()) if path else {}


def load_predictor(source: str, batch_size: int = 16, threads: Optional[int] = None,
                   max_megabytes: Optional[float] = None, int8: Optional[bool] = None) -> Predictor:
    """Load a model from a folder, "user/repo" or "user/repo@revision", every file checked against its manifest; raises
    ``ModelLoadError`` in one line.

    ``threads``: the engine's (default: every usable core). ``int8``: True or False picks the engine; None, the int8 one
    where the model has one and the CPU has VNNI or AMX."""
    repo_id, revision = parse_source(source)
    files = ModelFiles(str(source).strip(), repo_id, revision)
    config = files.config()
    engine = _load_engine(files, threads or usable_cores(), int8)
    detector = {name: values.astype(np.float32) for name, values in load_file(str(files.path(OOD_FILE))).items()}
    described = {name: config[name] for name in ("labels", "image_size", "backbone", "temperature", "ood_threshold")}
    predictor = Predictor(engine, files, repo_id, revision, **described, detector=detector,
                          metrics=_optional_json(files, "metrics.json"), evaluation=_optional_json(files, "evaluation.json"),
                          batch_size=batch_size, max_megabytes=max_megabytes)
    logger.info("serving %s with %s", source, predictor.engine_name)
    return predictor
