"""The model card (README.md with Hub metadata) that the training script writes next to the weights."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..config import HUB_METADATA

__all__ = ["make_model_card"]

_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A cat-vs-dog image classifier: a timm `{{ backbone }}` backbone with a small head
(Flatten → Linear {{ hidden_size }} + ReLU → Dropout {{ dropout }} → Linear 1 + sigmoid),
{{ trained }} with 🤗 Accelerate by `train_accelerate.py` of the catdog project.
The sigmoid output is P({{ labels[1] }}); label order is {{ labels | join(", ") }}.

## Use it

```bash
pip install "catdog-classifier @ git+https://github.com/catdog-project/catdog"
```

```python
from catdog_model import load_predictor
from PIL import Image
predictor = load_predictor("{{ repo_id }}")  # downloads config.json, the OpenVINO IR and ood.safetensors
print(predictor.predict([Image.open("pet.jpg")]))  # [{'cat': ..., 'dog': ...}]
explanation = predictor.explain(Image.open("pet.jpg"))  # + is_cat_or_dog, ood_score, heatmap (Grad-CAM)
```

The OpenVINO engine (`openvino_model.xml`/`.bin`: int8 weights, run in bf16 where the CPU computes it
natively) serves by default; `load_predictor(..., exact=True)` serves the float32 weights of
`model.safetensors` instead. `config.json` lists every file's sha256, and `load_predictor` refuses a file
that does not match.

## Results

Held-out **test split** ({{ test_samples }} images, never used for training or model selection):

| metric | value |
|---|---|
| test accuracy | {{ "%.4f" | format(test_accuracy) }} |
| test loss (BCE) | {{ "%.4f" | format(test_loss) }} |
| test ROC AUC | {{ "%.4f" | format(evaluation.roc_auc) }} |
| test ECE, calibrated ({{ evaluation.ece_bins }} bins) | {{ "%.4f" | format(evaluation.ece) }} |

{% if evaluation %}
Confusion matrix (rows: true label, columns: predicted):

| | {{ evaluation.confusion_matrix.labels | join(" | ") }} |
|---|---|---|
{% for row in evaluation.confusion_matrix.counts -%}
| **{{ evaluation.confusion_matrix.labels[loop.index0] }}** | {{ row | join(" | ") }} |
{% endfor %}
{% for figure in figures -%}
![{{ figure }}]({{ figure }})
{% endfor %}
The full report is `evaluation.html` (self-contained) and `evaluation.json`; rerun it with
`python -m catdog_model.training.evaluate {{ repo_id }} --dataset {{ dataset }} --output-dir report`.
{% endif %}

{% if calibration.temperature != 1.0 -%}
The probabilities are temperature-scaled: the predictor divides the logit by **T = {{ "%.3f" | format(calibration.temperature) }}**,
fitted on the validation split, before the sigmoid (`temperature` in config.json), and kept because {{ calibration.kept_because }}.
This never changes the label, only how sure the model says it is.
{%- else -%}
The probabilities are not temperature-scaled: the fitted T = {{ "%.3f" | format(calibration.fitted_temperature) }} was not kept,
because {{ calibration.kept_because }}.
{%- endif %} Expected calibration error ({{ calibration.bins }} bins) and BCE:

| split | ECE before | ECE after | BCE before | BCE after |
|---|---|---|---|---|
| validation | {{ "%.4f" | format(calibration.validation.ece_before) }} | {{ "%.4f" | format(calibration.validation.ece_after) }} | {{ "%.4f" | format(calibration.validation.loss_before) }} | {{ "%.4f" | format(calibration.validation.loss_after) }} |
| test | {{ "%.4f" | format(evaluation.ece_uncalibrated) }} | {{ "%.4f" | format(evaluation.ece) }} | {{ "%.4f" | format(evaluation.loss) }} | {{ "%.4f" | format(evaluation.loss_calibrated) }} |

Per epoch (the weights kept are from epoch {{ best_epoch }}, the best validation accuracy):

| epoch | train loss | train acc | val loss | val acc |
|---|---|---|---|---|
{% for row in history -%}
| {{ row.epoch }} | {{ "%.4f" | format(row.train_loss) }} | {{ "%.4f" | format(row.train_accuracy) }} | {{ "%.4f" | format(row.val_loss) }} | {{ "%.4f" | format(row.val_accuracy) }} |
{% endfor %}

## Training set-up

- Dataset: {{ dataset_source }}, {{ skipped }} rows skipped because their image could not be decoded.
- Split (seed {{ seed }}, stratified): {{ split_sizes.train }} train / {{ split_sizes.validation }} validation / {{ split_sizes.test }} test images; the row indices are in `split.json`.
- Backbone initialisation: {{ init }}.
- Input: {{ image_size }}×{{ image_size }} RGB, resized without cropping; the backbone's mean/std normalisation is inside the model.
- Augmentation (training only): random rotation ±20°, horizontal flip, zoom 0.8–1.2.
- Loss BCE-with-logits, SGD lr {{ learning_rate }}, {{ epochs }} epoch{{ 's' if epochs != 1 }}, batch size {{ batch_size }} per process
  × {{ world_size }} process(es) × {{ accumulation }} accumulation step(s), mixed precision `{{ mixed_precision }}`.
- Versions: {% for name, version in versions.items() %}{{ name }} {{ version }}{% if not loop.last %}, {% endif %}{% endfor %}.

Every argument and the full history are in `metrics.json`.

## "Neither a cat nor a dog"

{% if evaluation.ood -%}
`predictor.explain(image)` also says whether a picture looks like a cat or a dog at all. The detector
(Mahalanobis distances on the head's hidden layer and on two early backbone stages, `ood.safetensors`)
flags a picture whose score is above **{{ "%.3f" | format(evaluation.ood.threshold) }}** (`ood_threshold` in config.json), the
95th percentile on the validation split. It flags {{ "%.1f" | format(100 * evaluation.ood.flagged_in_distribution) }}% of the test split and
{{ "%.1f" | format(100 * evaluation.ood.flagged_out_of_distribution) }}% of {{ evaluation.ood.out_of_distribution }} {{ evaluation.ood.out_of_distribution_images }}
(AUROC {{ "%.3f" | format(evaluation.ood.auroc) }}). Those pictures are easy; real photos of other things are harder:
evaluate them with `python -m catdog_model.training.evaluate ... --ood-dir FOLDER`.
{%- else -%}
This model has no "neither" detector: any picture gets one of the two labels.
{%- endif %}

## Limitations

Trained only on photos of cats and dogs. The "neither" detector catches pictures unlike the training
photos, not every picture that is not a cat or a dog.
"""


def _dataset_source(metrics: dict) -> str:
    """A Hub dataset with its revision, or a local folder with the content hash its checkpoints recorded."""
    fingerprint = metrics.get("dataset_fingerprint") or ""
    if Path(metrics["dataset"]).exists():
        return f"the local folder `{Path(metrics['dataset']).name}`" + (f" ({fingerprint[:23]}…)" if fingerprint else "")
    revision = metrics["dataset_revision"] or "main, unpinned"
    return f"`{metrics['dataset']}` (revision `{revision}`)"


def make_model_card(metrics: dict, evaluation: dict, config: dict, repo_id: str) -> ModelCard:
    """Build the card from the run's record (metrics.json), its evaluation (evaluation.json, with its figures)
    and the model's config: the card reads each number from the one file that holds it."""
    args = metrics["args"]
    # A local folder is no Hub dataset id: keep it out of the metadata, which the Hub validates.
    hub_dataset = None if Path(metrics["dataset"]).exists() else metrics["dataset"]
    card_data = ModelCardData(
        **HUB_METADATA,
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=["accuracy"],
        model_name=repo_id,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=hub_dataset or "local",
                dataset_name=Path(metrics["dataset"]).name,
                dataset_split="held-out test split (split.json)",
                dataset_revision=metrics["dataset_revision"],
                metric_type="accuracy",
                metric_value=evaluation["accuracy"],
            )
        ],
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        repo_id=repo_id,
        model_name=repo_id,
        backbone=config["backbone"],
        hidden_size=config["hidden_size"],
        dropout=config["dropout"],
        labels=config["labels"],
        image_size=config["image_size"],
        trained="trained from scratch" if metrics["backbone_init"].startswith("random") else "fine-tuned from ImageNet weights",
        test_samples=evaluation["samples"],
        test_accuracy=evaluation["accuracy"],
        test_loss=evaluation["loss"],
        best_epoch=metrics["best_epoch"],
        history=metrics["history"],
        calibration=metrics["calibration"],
        evaluation=evaluation,
        figures=evaluation["figures"],
        dataset=metrics["dataset"],
        dataset_source=_dataset_source(metrics),
        skipped=metrics["skipped_rows"],
        seed=args["seed"],
        split_sizes=metrics["split_sizes"],
        init=metrics["backbone_init"],
        learning_rate=args["learning_rate"],
        epochs=args["epochs"],
        batch_size=args["batch_size"],
        world_size=metrics["world_size"],
        accumulation=args["gradient_accumulation_steps"],
        mixed_precision=metrics["mixed_precision"],
        versions=metrics["versions"],
    )
