"""The model card of a finished run, rendered by the model's own mixin from catdog_model/model_card.md."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard

from ..model import CatDogClassifier

__all__ = ["make_model_card"]


def _dataset_source(metrics: dict) -> str:
    """A Hub dataset with its revision, or a local folder with the content hash its checkpoints recorded."""
    fingerprint = metrics.get("dataset_fingerprint") or ""
    if Path(metrics["dataset"]).exists():
        return f"the local folder `{Path(metrics['dataset']).name}`" + (f" ({fingerprint[:23]}…)" if fingerprint else "")
    revision = metrics["dataset_revision"] or "main, unpinned"
    return f"`{metrics['dataset']}` (revision `{revision}`)"


def make_model_card(model: CatDogClassifier, metrics: dict, evaluation: dict, repo_id: str,
                    int8_check: Optional[dict] = None) -> ModelCard:
    """The card of a finished run: its record, its evaluation and the check its int8 engine passed, if any."""
    trained = "fine-tuned from ImageNet weights" if metrics["pretrained"] else "trained from scratch"
    card = model.generate_model_card(repo_id=repo_id, model_name=repo_id, trained=trained, metrics=metrics,
                                     evaluation=evaluation, dataset_source=_dataset_source(metrics),
                                     int8_check=int8_check)
    # A local folder is no Hub dataset id: keep it out of the metadata, which the Hub validates.
    hub_dataset = None if Path(metrics["dataset"]).exists() else metrics["dataset"]
    card.data.datasets = [hub_dataset] if hub_dataset else None
    card.data.metrics, card.data.model_name = ["accuracy"], repo_id
    if metrics["pretrained"]:  # the Hub's model tree: "fine-tuned from" timm's weights
        card.data.base_model = model.backbone.pretrained_cfg.get("hf_hub_id")
        card.data.base_model_relation = "finetune" if card.data.base_model else None
    card.data.eval_results = [
        EvalResult(task_type="image-classification", dataset_type=hub_dataset or "local",
                   dataset_name=Path(metrics["dataset"]).name, dataset_split="test",
                   dataset_revision=metrics["dataset_revision"], metric_type="accuracy",
                   metric_value=evaluation["accuracy"])
    ]
    return card
