"""A loaded model described in plain words for the page, from its own config.json, metrics.json and
evaluation.json only (the files its manifest vouches for; a missing one reads as {})."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import REPORT_FIGURES
from .predictor import Predictor

__all__ = ["DEMONSTRATION_BELOW", "demonstration_notice", "details", "headline", "report"]


# A model right on fewer of its held-out test photos than this is called a demonstration model.
DEMONSTRATION_BELOW = 0.90


def _dataset(predictor: Predictor) -> Optional[str]:
    """The dataset it was trained on; a local folder by its name only (its full path means nothing to a visitor)."""
    dataset = predictor.metrics.get("dataset")
    return (Path(dataset).name if Path(dataset).exists() else dataset) if dataset else None


def _from_scratch(predictor: Predictor) -> bool:
    return (predictor.metrics.get("backbone_init") or "").startswith("random")


def headline(predictor: Predictor) -> str:
    """One sentence: the backbone, how it was trained, on what, at which size."""
    how = ("trained from scratch" if _from_scratch(predictor) else "fine-tuned from ImageNet weights"
           if predictor.metrics.get("backbone_init") else "trained")
    dataset = _dataset(predictor)
    where = f" on `{dataset}`" if dataset else ""
    return f"A {predictor.backbone} {how}{where}, at {predictor.image_size} px, tells which it is."


def demonstration_notice(predictor: Predictor) -> Optional[str]:
    """A plain warning when the model was not pretrained, or is right on under 90% of its test photos
    (or never recorded how often): what it is, what it was trained on and what to expect. None otherwise."""
    accuracy, trained_on = predictor.evaluation.get("accuracy"), predictor.metrics.get("split_sizes", {}).get("train")
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
    precision = "bfloat16" if predictor.engine.endswith("bf16") else "float32"
    return (f"**Model** {name} ({where}): a {predictor.backbone} at {predictor.image_size} px. **Answers computed by** "
            f"a fast CPU engine (OpenVINO, {precision} arithmetic, 8-bit weights) (`{predictor.engine}`).")


def report(predictor: Predictor) -> tuple[str, list[tuple[str, str]]]:
    """"How good is this model?": a few sentences, and the evaluation figures (path, caption) the model ships."""
    evaluation = predictor.evaluation
    if evaluation.get("accuracy") is None:
        return "This model recorded no evaluation (no evaluation.json next to its weights).", []
    lines = [f"Right on **{evaluation['accuracy']:.1%}** of {evaluation.get('samples') or 'its'} photos held out from training."]
    verdicts = evaluation.get("verdicts", {})
    if verdicts:
        lines.append(f"On those photos this page would answer: **{verdicts['right']}** right and **{verdicts['wrong']}** "
                     f"wrong with confidence, **{verdicts['not sure']}** \"not sure\" and **{verdicts['neither']}** \"neither\".")
    if "ece" in evaluation:
        lines.append(f"When it says 80%, it is right about 80% of the time, give or take {evaluation['ece']:.1%} "
                     "(expected calibration error).")
    figures = [(str(path), caption) for name, caption in REPORT_FIGURES.items() if (path := predictor.model_file(name))]
    return "\n\n".join(lines), figures
