"""An evaluation report anyone can rerun, on any saved or Hub model, with the engine that serves:

    python -m catdog_model.training.evaluate MODEL --dataset DATASET [--split-file split.json] --output-dir DIR

It writes ``evaluation.json`` and three figures (confusion matrix, reliability, the most confident mistakes). Training
calls ``write_report`` with its fp32 model, so the card and the page show the same numbers."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.classification import binary_auroc, binary_confusion_matrix
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import REPORT_FIGURES
from ..errors import CatdogError
from ..cli import exit_with_error, parse_command
from ..images import model_input
from ..serving.detector import ood_score
from ..serving.files import check_writable, no_such_folder, unreachable_hub_message
from ..serving.predictor import load_predictor
from ..serving.verdict import NEITHER, NOT_SURE, decide
from . import TrainingError
from .calibration import ECE_BINS, calibration_summary
from .data import (SPLIT_FILE, collate, dataset_fingerprint, load_image_dataset, load_split, make_transform,
                   read_split_file, undecoded)

__all__ = ["EVALUATION_FILE", "compute_metrics", "report_training_run", "synthetic_ood_images", "write_report",
           "main"]

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
MISTAKES_SHOWN = 8
SYNTHETIC = "synthetic: noise, flat colours, gradients, stripes, text"


def synthetic_ood_images(count: int = 60, size: int = 256, seed: int = 0) -> list[Image.Image]:
    """Pictures that are plainly neither cat nor dog: noise, flat colours, gradients, stripes and text."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == 1:
            pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
        elif kind == 2:
            ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 60, 3)
            pixels = np.broadcast_to(ramp, (size, size, 3)).clip(0, 255).astype(np.uint8)
        elif kind == 3:
            period = int(rng.integers(6, 40))
            stripes = ((np.arange(size) // period) % 2).astype(np.uint8)[None, :, None] * 255
            pixels = np.broadcast_to(stripes, (size, size, 3)).copy()
        else:
            page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(page)
            for line in range(0, size, 14):
                words = " ".join("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(6))
                draw.text((6, line), words, fill=(0, 0, 0))
            images.append(page)
            continue
        images.append(Image.fromarray(pixels))
    return images


def _auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """AUROC of scores where larger means "positive"; ranks only, so any scale works."""
    scores = torch.cat([negatives, positives]).double()
    ranks = scores.argsort().argsort().double() / max(len(scores) - 1, 1)  # torchmetrics reads raw scores as logits
    target = torch.cat([torch.zeros(len(negatives)), torch.ones(len(positives))]).int()
    return float(binary_auroc(ranks, target))


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float, class_names: Sequence[str],
                    ood: dict) -> dict:
    """The report's numbers. ``ood``: the detector's "threshold", "in_scores" (of these images), "out_scores" and
    "out_images" (what those are)."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    probabilities = torch.sigmoid(logits / temperature)
    matrix = binary_confusion_matrix(probabilities, labels)
    calibration = calibration_summary(logits, labels, temperature)
    results = {
        "samples": len(labels),
        "accuracy": float(((logits > 0).long() == labels).float().mean()),
        "loss": calibration["loss_before"],
        "loss_calibrated": calibration["loss_after"],
        "roc_auc": float(binary_auroc(probabilities, labels)),
        "ece": calibration["ece_after"],
        "ece_uncalibrated": calibration["ece_before"],
        "ece_bins": ECE_BINS,
        "temperature": temperature,
        "confusion_matrix": {"labels": list(class_names), "rows_are": "true label", "columns_are": "predicted label",
                             "counts": matrix.tolist()},
    }
    results["verdicts"] = _verdict_counts(probabilities, labels, class_names, ood)
    outside = len(ood["out_scores"])
    results["ood"] = {
        "threshold": ood["threshold"], "in_distribution": len(ood["in_scores"]), "out_of_distribution": outside,
        "out_of_distribution_images": ood.get("out_images"),
        "auroc": _auroc(ood["in_scores"], ood["out_scores"]) if outside else None,
        "flagged_in_distribution": float((ood["in_scores"] > ood["threshold"]).float().mean()),
        "flagged_out_of_distribution": float((ood["out_scores"] > ood["threshold"]).float().mean()) if outside else None,
    }
    return results


def _verdict_counts(probabilities: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], ood: dict) -> dict[str, int]:
    """What the Space would answer for each picture (verdict.py): confident and right, confident and wrong, not sure,
    neither."""
    counts = {"right": 0, "wrong": 0, NOT_SURE: 0, NEITHER: 0}
    for index, (p, label) in enumerate(zip(probabilities.tolist(), labels.tolist())):
        verdict = decide({class_names[0]: 1 - p, class_names[1]: p}, float(ood["in_scores"][index]) <= ood["threshold"])
        counts[("right" if verdict.answer == class_names[label] else "wrong") if verdict.is_confident else verdict.answer] += 1
    return counts


def _figure_confusion(results: dict, axes) -> None:
    counts, names = results["confusion_matrix"]["counts"], results["confusion_matrix"]["labels"]
    axes.imshow(counts, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axes.text(column, row, str(counts[row][column]), ha="center", va="center", fontsize=16)
    axes.set_xticks([0, 1], names)
    axes.set_yticks([0, 1], names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"accuracy {results['accuracy']:.3f} on {results['samples']} images")


def _figure_reliability(results: dict, logits: torch.Tensor, labels: torch.Tensor, axes) -> None:
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    for temperature, name in ((1.0, "before scaling"), (results["temperature"], "after scaling")):
        p = torch.sigmoid(logits / temperature)
        confidence = torch.maximum(p, 1 - p)
        correct = ((p > 0.5).long() == labels).float()
        bins = torch.bucketize(confidence, edges[1:-1])
        shown = [(float(confidence[bins == b].mean()), float(correct[bins == b].mean())) for b in range(ECE_BINS) if (bins == b).any()]
        axes.plot(*zip(*shown), marker="o", label=name)
    axes.plot([0.5, 1], [0.5, 1], linestyle=":", color="grey", label="perfect")
    axes.set_xlabel("confidence of the top label")
    axes.set_ylabel("accuracy")
    axes.set_title(f"ECE {results['ece_uncalibrated']:.3f} → {results['ece']:.3f} (T = {results['temperature']:.2f})")
    axes.legend(loc="upper left")


def _figure_mistakes(mistakes: list[tuple[Image.Image, str, float]], figure) -> None:
    for index, (image, truth, confidence) in enumerate(mistakes):
        axes = figure.add_subplot(2, (len(mistakes) + 1) // 2, index + 1)
        axes.imshow(image.convert("RGB"))
        axes.set_title(f"a {truth}, {confidence:.0%} sure it is not", fontsize=8)
        axes.axis("off")


def _save_figures(results: dict, logits: torch.Tensor, labels: torch.Tensor, output_dir: Path, mistakes: list) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, on any machine
    from matplotlib import pyplot

    written = []
    for name in REPORT_FIGURES if mistakes else list(REPORT_FIGURES)[:-1]:
        figure = pyplot.figure(figsize=(9, 4.5) if name == "mistakes.png" else (5, 4.2))
        if name == "mistakes.png":
            _figure_mistakes(mistakes, figure)
        elif name == "reliability.png":
            _figure_reliability(results, logits, labels, figure.add_subplot())
        else:
            _figure_confusion(results, figure.add_subplot())
        figure.tight_layout()
        figure.savefig(output_dir / name, dpi=90)
        pyplot.close(figure)
        written.append(name)
    return written


def write_report(output_dir: Path, model, logits: torch.Tensor, labels: torch.Tensor, ood: dict,
                 image_of: Optional[Callable[[int], Image.Image]] = None) -> dict:
    """The numbers, the figures and evaluation.json in ``output_dir``. ``model``: the labels and temperature (a model or
    a predictor); ``image_of(i)``: the picture of ``logits[i]``, for the mistakes."""
    temperature, class_names, output_dir = model.temperature, model.labels, Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = compute_metrics(logits, labels, temperature, class_names, ood)
    p = torch.sigmoid(logits.float().cpu() / temperature)
    wrong = ((p > 0.5).long() != labels.long().cpu()).nonzero().flatten()
    worst = wrong[torch.argsort((p[wrong] - 0.5).abs(), descending=True)][:MISTAKES_SHOWN].tolist()
    mistakes = [(image_of(i), class_names[int(labels[i])], float(max(p[i], 1 - p[i]))) for i in worst] if image_of else []
    results["figures"] = _save_figures(results, logits.float().cpu(), labels.long().cpu(), output_dir, mistakes)
    (output_dir / EVALUATION_FILE).write_text(json.dumps(results, indent=2))
    return results


def report_training_run(model, detector: dict, test_outputs: tuple, image_of: Callable[[int], Image.Image],
                        output_dir: Path) -> dict:
    """The training run's report on its test outputs, with synthetic pictures that are plainly neither for the "neither"
    AUROC."""
    synthetic = torch.stack([torch.from_numpy(model_input(image, model.image_size)) for image in synthetic_ood_images()])
    with torch.no_grad():
        _, _, synthetic_features = model.forward_with_features(synthetic.to(next(model.parameters()).device))
    logits, labels, features = test_outputs
    ood = {"threshold": model.ood_threshold, "in_scores": torch.from_numpy(ood_score(features, detector)),
           "out_scores": torch.from_numpy(ood_score(synthetic_features, detector)),
           "out_images": SYNTHETIC}
    results = write_report(output_dir, model, logits, labels, ood, image_of)
    logger.info("'neither' detector: threshold %.3f flags %.1f%% of the test split and %.1f%% of %d synthetic pictures "
                "(AUROC %.3f)", model.ood_threshold, 100 * results["ood"]["flagged_in_distribution"],
                100 * results["ood"]["flagged_out_of_distribution"], len(synthetic), results["ood"]["auroc"])
    return results


def _model_outputs(predictor, rows, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and "neither" scores of dataset rows through the serving engine, read through a DataLoader as timm's
    inference.py does."""
    pictures = undecoded(rows, data).with_transform(make_transform(data, predictor.image_size, train=False))
    loader = DataLoader(pictures, batch_size=predictor.batch_size, collate_fn=lambda batch: collate(batch)["pixels"])
    logits, scores = [], []
    for pixels in tqdm(loader, desc="evaluating"):
        outputs = predictor.outputs(pixels.numpy())  # model_input's uint8 pixels: the serving path's input
        logits.append(torch.from_numpy(outputs.logits))
        scores.append(torch.from_numpy(ood_score(outputs.features, predictor.detector)))
    return torch.cat(logits), torch.cat(scores)


def _check_split_is_the_models(split_file: Path, predictor, fingerprint: str) -> None:
    """Refuse a split file that would not measure the model on photos it has not seen, each once: another run's, made on
    other data, or edited."""
    saved, metrics = read_split_file(split_file), predictor.metrics
    for key, flag in (("seed", "--seed"), ("dataset", "--dataset")):
        if key in metrics and key in saved and saved[key] != metrics[key]:
            raise TrainingError(f"--split-file {split_file} was made with {flag} {saved[key]}, but the model was trained "
                               f"with {flag} {metrics[key]}: its test rows would include the model's training rows")
    if saved.get("fingerprint") != fingerprint:
        raise TrainingError(f"--split-file {split_file} was made on other data ({saved.get('fingerprint')}, now "
                           f"{fingerprint}): another revision or a reordered copy; its row numbers would point at other rows")
    test = saved["used"]["test"]
    if len(set(test)) != len(test):
        raise TrainingError(f"{split_file} lists {len(test) - len(set(test))} of its {len(test)} test rows more than once: "
                           "each photo must count once")
    own = predictor.files.path(SPLIT_FILE, required=False)  # the model's own rows, vouched for by its manifest
    if own is not None:
        model_rows = read_split_file(own)
        seen = set(test) & (set(model_rows["train"]) | set(model_rows.get("validation", [])))
        if seen:
            raise TrainingError(f"{split_file}: {len(seen)} of its test rows are rows the model was trained or calibrated "
                               "on (its own split.json, which its manifest vouches for, says so)")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="folder written by train_accelerate.py, or a Hub id (user/repo[@revision])")
    parser.add_argument("--dataset", default="microsoft/cats_vs_dogs", help="Hub dataset id or local folder")
    parser.add_argument("--dataset-revision", default=None)
    parser.add_argument("--split-file", default=None, help="split.json: evaluate its test rows (default: the model's own, if local)")
    parser.add_argument("--all-rows", action="store_true", help="evaluate the whole dataset instead of a test split")
    parser.add_argument("--output-dir", required=True)
    args = parse_command(parser, argv)
    try:  # every input is checked before the evaluation, which may take a while
        if Path(args.model).is_dir() and Path(args.output_dir).resolve() == Path(args.model).resolve():
            raise TrainingError(f"--output-dir {args.output_dir} is the model's own folder, whose report the manifest "
                               "vouches for: write the new report elsewhere.")
        check_writable(Path(args.output_dir))
        if missing := no_such_folder("--dataset", args.dataset):
            raise TrainingError(missing)
        predictor = load_predictor(args.model)
        if unreachable := unreachable_hub_message(None if Path(args.dataset).exists() else f"--dataset {args.dataset}"):
            raise TrainingError(unreachable)
        data = load_image_dataset(args.dataset, args.dataset_revision)
        # Without --split-file, a local model's own split.json, checked against its manifest like every file it serves.
        split_file = args.split_file or (predictor.files.path(SPLIT_FILE, required=False) if predictor.files.local else None)
        if args.all_rows or split_file is None:
            logger.info("evaluating every row of %s (no split file)", args.dataset)
            rows = data.dataset
        else:
            _check_split_is_the_models(Path(split_file), predictor, dataset_fingerprint(args.dataset, args.dataset_revision))
            rows = load_split(Path(split_file), data, "test", used=True)
    except (CatdogError, OSError) as error:
        exit_with_error(error)
    if tuple(data.labels) != tuple(predictor.labels):
        exit_with_error(f"the dataset's labels {list(data.labels)} are not the model's {list(predictor.labels)}")
    logits, in_scores = _model_outputs(predictor, rows, data)
    out_scores = torch.tensor([found.ood_score for found in predictor.explain_many(synthetic_ood_images())])
    ood = {"threshold": predictor.ood_threshold, "in_scores": in_scores, "out_scores": out_scores, "out_images": SYNTHETIC}
    try:
        results = write_report(Path(args.output_dir), predictor, logits, torch.tensor(rows[data.label_column]), ood,
                               lambda i: rows[i][data.image_column])
    except OSError as error:  # a full disk, most often
        exit_with_error(f"Could not write the report in {args.output_dir}: {error.strerror or error}.")
    logger.info("accuracy %.4f, ROC AUC %.4f, ECE %.4f, 'neither' AUROC %.4f on %d images with %s; report in %s",
                results["accuracy"], results["roc_auc"], results["ece"], results["ood"]["auroc"], results["samples"],
                predictor.engine_name, Path(args.output_dir) / EVALUATION_FILE)


if __name__ == "__main__":
    main()
