"""A loaded model described in plain words for the page, from the files its manifest vouches for. A report field that is
missing or of another type (another version may write them) leaves out its own sentence, never the page."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from ..config import REPORT_FIGURES
from .predictor import Predictor

__all__ = ["DEMONSTRATION_BELOW", "demonstration_notice", "details", "headline", "report"]


# A model right on fewer of its held-out test photos than this is called a demonstration model.
DEMONSTRATION_BELOW = 0.90


def _field(report: Any, key: str, kind: type) -> Any:
    """report[key] if it is a ``kind`` (a number: finite, not a bool), else None."""
    value = report.get(key) if isinstance(report, dict) else None
    if kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return value if number else None
    return value if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) else None


def _dataset(predictor: Predictor) -> Optional[str]:
    """The dataset it was trained on; a local folder by its name only (its path means nothing to a visitor)."""
    dataset = _field(predictor.metrics, "dataset", str)
    return (Path(dataset).name if Path(dataset).exists() else dataset) if dataset else None


def _from_scratch(predictor: Predictor) -> bool:
    return _field(predictor.metrics, "pretrained", bool) is False


def headline(predictor: Predictor) -> str:
    """One sentence: the backbone, how it was trained, on what, at which size."""
    pretrained = _field(predictor.metrics, "pretrained", bool)
    how = {True: "fine-tuned from ImageNet weights", False: "trained from scratch", None: "trained"}[pretrained]
    dataset = _dataset(predictor)
    where = f" on `{dataset}`" if dataset else ""
    return f"A {predictor.backbone} {how}{where}, at {predictor.image_size} px, tells which it is."


def demonstration_notice(predictor: Predictor) -> Optional[str]:
    """A plain warning where the model was not pretrained, or is right on under 90% of its test photos (or never
    recorded it): what to expect. None otherwise."""
    accuracy = _field(predictor.evaluation, "accuracy", float)
    trained_on = _field(_field(predictor.metrics, "split_sizes", dict), "train", int)
    from_scratch, dataset = _from_scratch(predictor), _dataset(predictor)
    if not from_scratch and accuracy is not None and accuracy >= DEMONSTRATION_BELOW:
        return None
    trained = "trained from scratch, without ImageNet weights," if from_scratch else "trained"
    photos = f"{trained_on:,} photos" if trained_on else "photos"
    dataset = f" from `{dataset}`" if dataset else ""
    how_good = (f"It is right on **{accuracy:.0%}** of the photos held out to test it"
                if accuracy is not None else "It recorded no test accuracy")
    return (f"⚠️ **This is a demonstration model.** It was {trained} on {photos}{dataset} at "
            f"{predictor.image_size} px. {how_good}, so expect many \"not sure\" answers and some confident "
            "mistakes: it shows how the app works, not how well a cat-vs-dog classifier can do.")


def details(predictor: Predictor) -> str:
    """Where the model comes from and what computes its answers, for the page's "About the model"."""
    if predictor.files.local:
        name, where = f"`{predictor.source}`", "a local folder"
    else:
        name, where = f"[`{predictor.source}`](https://huggingface.co/{predictor.source})", f"revision `{predictor.revision or 'main'}`"
    arithmetic = {"int8": "8-bit weights and arithmetic", "bf16": "bfloat16 arithmetic, 8-bit weights"}.get(
        predictor.engine_name.rpartition("-")[2], "float32 arithmetic, 8-bit weights")
    return (f"**Model** {name} ({where}): a {predictor.backbone} at {predictor.image_size} px. **Answers computed by** "
            f"a fast CPU engine (OpenVINO, {arithmetic}) (`{predictor.engine_name}`).")


def report(predictor: Predictor) -> tuple[str, list[tuple[str, str]]]:
    """"How good is this model?": a few sentences, and the evaluation figures (path, caption) the model ships."""
    evaluation, accuracy = predictor.evaluation, _field(predictor.evaluation, "accuracy", float)
    if accuracy is None:
        return "This model recorded no evaluation (no evaluation.json next to its weights, or no accuracy in it).", []
    lines = [f"Right on **{accuracy:.1%}** of {_field(evaluation, 'samples', int) or 'its'} photos held out from training."]
    verdicts = _field(evaluation, "verdicts", dict)
    right, wrong, not_sure, neither = (_field(verdicts, key, int) for key in ("right", "wrong", "not sure", "neither"))
    if None not in (right, wrong, not_sure, neither):
        lines.append(f"On those photos this page would answer: **{right}** right and **{wrong}** wrong with confidence, "
                     f"**{not_sure}** \"not sure\" and **{neither}** \"neither\".")
    if (ece := _field(evaluation, "ece", float)) is not None:
        lines.append(f"When it says 80%, it is right about 80% of the time, give or take {ece:.1%} "
                     "(expected calibration error).")
    figures = [(str(path), caption) for name, caption in REPORT_FIGURES.items() if (path := predictor.model_file(name))]
    return "\n\n".join(lines), figures
