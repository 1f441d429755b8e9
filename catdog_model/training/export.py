"""The serving engines made from a trained fp32 model: ``ServingGraph`` (logits, Grad-CAM, the detector's features)
converted to OpenVINO and, by NNCF, given int8 weights (every CPU serves it) or int8 weights and activations (kept only
where it passes a check against fp32; served where the CPU has int8 dot products). The command makes a folder's engines
again from the weights its manifest vouches for, or sets the "neither" threshold:

    python -m catdog_model.training.export MODEL_FOLDER [--int8 [--dataset D]] [--ood-threshold SCORE]"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import nncf
import numpy as np
import openvino
import torch
import torch.nn.functional as F
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
from safetensors.numpy import load_file
from torch import nn

from ..config import FEATURE_NAMES, HIDDEN, INT8_IR_FILES, IR_FILES, MANIFEST_KEY, OOD_FILE, OUTPUT_NAMES, WEIGHTS
from ..errors import CatdogError
from ..cli import exit_with_error, parse_command
from ..hardware import usable_cores
from ..model import CatDogClassifier
from ..serving.detector import ood_score
from ..serving.engine import EngineOutputs, compile_openvino
from ..serving.files import ModelFiles, first_line, manifest_of
from ..serving.verdict import decide
from .run_state import TrainingError, save_atomically

__all__ = ["INT8_CHECK", "ServingGraph", "check_int8", "convert", "int8_weights", "main", "model_inputs", "quantize_int8",
           "reexport", "save_openvino", "set_ood_threshold"]

logger = logging.getLogger(__name__)
nncf.set_log_level(logging.WARNING)  # its progress bars stay; not its tables, nor a line for each op it leaves in float

# The int8 engine is kept only where, against the fp32 model on the validation photos, it keeps this much.
INT8_CHECK = {"verdicts_agree": 0.99, "ood_score_r": 0.995, "heatmap_r": 0.95, "probability_error": 0.05}
# What stays in float: the detector's per-channel statistics (CatDogClassifier.inspect), as OpenVINO's PyTorch
# frontend names their ops, and the head's last Linear.
DETECTOR_STATISTICS = ("aten::mean/.*", "aten::std/.*")
LAST_LINEAR = ".*head.4/.*"
CALIBRATION_PHOTOS = 300  # NNCF's default subset
CHECK_PHOTOS = 1000  # at most, of the validation split: minutes of fp32 at 224 px on a CPU


class ServingGraph(nn.Module):
    """pixels (N, 3, S, S) in [0, 1] → logits, Grad-CAM heatmaps and the detector's features, in one pass. The head is
    Linear → ReLU → Linear, so Grad-CAM's mean gradient is exact in closed form, (w2 ⊙ relu'(hidden)) · W1 pooled per
    channel: no autograd, so the export has it too."""

    def __init__(self, model: CatDogClassifier) -> None:
        super().__init__()
        self.model = model
        first = self.model.head[1].weight.detach().float()
        self.register_buffer("pooled", first.view(first.shape[0], self.model.backbone.num_features, -1).sum(-1),
                             persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map, logits, features = self.model.forward_with_features(pixels)
        sign = torch.where(logits >= 0, 1.0, -1.0)[:, None]
        upstream = (features[HIDDEN] > 0).float() * self.model.head[4].weight * sign  # d(±logit)/d(hidden)
        weights = upstream @ self.pooled / (feature_map.shape[2] * feature_map.shape[3])
        cams = F.relu(torch.einsum("nc,nchw->nhw", weights, feature_map))
        cams = cams / cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return logits, cams, *(features[name] for name in FEATURE_NAMES)  # in the order of OUTPUT_NAMES


def convert(model: CatDogClassifier) -> openvino.Model:
    """The serving graph as an OpenVINO model in float32, in memory, its outputs named."""
    size = model.image_size
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO's PyTorch frontend traces with TorchScript, which torch now marks as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        converted = openvino.convert_model(ServingGraph(model.eval()).eval(), example_input=torch.rand(1, 3, size, size),
                                           input=[(-1, 3, size, size)])
    for output, name in zip(converted.outputs, OUTPUT_NAMES):  # the engine reads each by its name
        output.get_tensor().set_names({name})
    return converted


def int8_weights(converted: openvino.Model) -> openvino.Model:
    """The engine every CPU serves: int8 weights, one scale per output channel (NNCF)."""
    return nncf.compress_weights(converted.clone(), mode=nncf.CompressWeightsMode.INT8_SYM)


def quantize_int8(converted: openvino.Model, calibration: Sequence[np.ndarray]) -> openvino.Model:
    """int8 weights and activations: NNCF's post-training quantization on ``calibration`` (training photos' model
    inputs). Left in float where int8 moved the answers (benchmarks/README.md): the detector's statistics, the first
    convolution and the last Linear."""
    first_convolution = next(op.get_friendly_name() for op in converted.get_ordered_ops() if op.get_type_name() == "Convolution")
    kept_in_float = nncf.IgnoredScope(patterns=[*DETECTOR_STATISTICS, LAST_LINEAR], names=[first_convolution])
    # Served only where int8 dot products cannot saturate (VNNI, AMX): no halved range for the first layer.
    exact_ranges = AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.DISABLE)
    batches = nncf.Dataset([pixels[None].astype(np.float32) / 255 for pixels in calibration])
    return nncf.quantize(converted, batches, subset_size=len(calibration), ignored_scope=kept_in_float,
                         advanced_parameters=exact_ranges)


def check_int8(model: CatDogClassifier, quantized: openvino.Model, photos: Sequence[np.ndarray], detector: dict) -> dict:
    """The int8 engine against the fp32 model on ``photos``: verdicts that agree, the largest probability error, the
    "neither" score's and the heatmaps' correlation, and whether each meets INT8_CHECK."""
    engine, graph = compile_openvino(quantized, usable_cores(), int8=True), ServingGraph(model.eval()).eval()
    found = {"int8": [], "fp32": []}
    for start in range(0, len(photos), 16):
        pixels = np.stack(photos[start : start + 16]).astype(np.float32) / 255
        with torch.no_grad():
            found["fp32"].append(EngineOutputs.from_named(dict(zip(OUTPUT_NAMES, (value.numpy() for value in graph(torch.from_numpy(pixels)))))))
        found["int8"].append(engine(pixels))
    answers = {}
    for name, outputs in found.items():
        features = {layer: np.concatenate([output.features[layer] for output in outputs]) for layer in FEATURE_NAMES}
        p = model.probability(torch.from_numpy(np.concatenate([output.logits for output in outputs]))).numpy()
        scores = ood_score(features, detector)
        verdicts = [decide(dict(zip(model.labels, (1 - q, q))), score <= model.ood_threshold).answer for q, score in zip(p, scores)]
        answers[name] = (p, scores, verdicts, np.concatenate([output.heatmaps for output in outputs]))
    (p8, scores8, verdicts8, maps8), (p32, scores32, verdicts32, maps32) = answers["int8"], answers["fp32"]
    heatmap_r = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps8, maps32) if a.std() > 0 and b.std() > 0]
    check = {"photos": len(photos), "verdicts_agree": float(np.mean([a == b for a, b in zip(verdicts8, verdicts32)])),
             "probability_error": float(np.abs(p8 - p32).max()),
             "ood_score_r": float(np.corrcoef(scores8, scores32)[0, 1]) if scores32.std() > 0 else 1.0,
             "heatmap_r": float(np.median(heatmap_r)) if heatmap_r else 1.0}
    failed = [f"{key} {check[key]:.4f}" for key, limit in INT8_CHECK.items()
              if not (check[key] <= limit if key == "probability_error" else check[key] >= limit)]
    return {**check, "passed": not failed, "failed": ", ".join(failed)}


def save_openvino(model: CatDogClassifier, folder: str | Path, calibration: Sequence[np.ndarray] = (),
                  photos: Sequence[np.ndarray] = (), detector: Optional[dict] = None) -> Optional[dict]:
    """Write the engine every CPU serves into ``folder``; with ``calibration``, ``photos`` and the ``detector``, the
    int8 engine too where it passes its check. Returns the check (None without one)."""
    # compress_to_fp16 would not apply: OpenVINO leaves a model that has int8 weights as it is.
    converted = convert(model)
    openvino.save_model(int8_weights(converted), str(Path(folder) / IR_FILES[0]), compress_to_fp16=False)
    if not len(calibration):
        return None
    try:
        quantized = quantize_int8(converted, calibration)
    except Exception as error:  # NNCF's own types, whichever a version raises: the run's model is still written
        logger.warning("int8 engine not made (NNCF: %s): the engine with int8 weights alone serves", first_line(error))
        return {"photos": len(photos), "passed": False, "failed": f"NNCF could not quantize it: {first_line(error)}"}
    check = check_int8(model, quantized, photos, detector)
    if check["passed"]:
        openvino.save_model(quantized, str(Path(folder) / INT8_IR_FILES[0]), compress_to_fp16=False)
        logger.info("int8 engine kept: %.2f%% of %d validation verdicts agree with fp32, \"neither\" score r %.4f, "
                    "heatmap r %.3f", 100 * check["verdicts_agree"], check["photos"], check["ood_score_r"], check["heatmap_r"])
    else:
        logger.warning("int8 engine not kept (below INT8_CHECK against fp32 on %d validation photos: %s): the engine "
                       "with int8 weights alone serves", check["photos"], check["failed"])
    return check


def model_inputs(rows, limit: int) -> list[np.ndarray]:
    """The first ``limit`` rows of a split with the evaluation transform, as uint8 model inputs."""
    return [row["pixels"].numpy() for row in rows.select(range(min(limit, len(rows))))]


def _photos(files: ModelFiles, image_size: int, dataset: Optional[str]) -> tuple[list, list]:
    """Training photos to calibrate on and validation photos to check against: the rows of the folder's split.json, from
    the dataset its run read (or ``dataset``)."""
    from .data import SPLIT_FILE, load_image_dataset, load_split, make_transform, undecoded

    metrics = json.loads(files.path("metrics.json").read_text())
    data = load_image_dataset(dataset or metrics["dataset"], None if dataset else metrics.get("dataset_revision"))
    transform = make_transform(data, image_size, train=False)
    rows = {split: undecoded(load_split(files.path(SPLIT_FILE), data, split, used=True), data).with_transform(transform)
            for split in ("train", "validation")}
    return model_inputs(rows["train"], CALIBRATION_PHOTOS), model_inputs(rows["validation"], CHECK_PHOTOS)


def reexport(folder: Path, int8: bool = False, dataset: Optional[str] = None) -> None:
    """A finished folder's engine made again from its weights, with its manifest entries; with ``int8``, the int8 engine
    too."""
    files = ModelFiles(str(folder), str(folder), None)
    files.config()  # the weights and detector its manifest vouches for, or ModelLoadError's one line
    files.path(WEIGHTS)
    detector = load_file(str(files.path(OOD_FILE))) if int8 else None
    config = json.loads((folder / "config.json").read_text())
    manifest = config[MANIFEST_KEY]["files"]
    try:
        model = CatDogClassifier.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as error:
        raise TrainingError(f"Could not read the model in {folder}: {str(error).splitlines()[0]}") from None
    calibration, photos = _photos(files, model.image_size, dataset) if int8 else ([], [])
    check = {}

    def write(temp: Path) -> None:
        check.update(save_openvino(model, temp, calibration, photos, detector) or {})
        manifest.update(manifest_of(temp, [path.name for path in temp.iterdir()])["files"])
        if check.get("passed"):  # the figures it passed on, vouched for beside the file
            manifest[INT8_IR_FILES[0]]["check"] = check
        elif int8:  # an int8 engine made before is not served against this check
            for name in INT8_IR_FILES:
                manifest.pop(name, None)
        (temp / "config.json").write_text(json.dumps(config, indent=2))

    save_atomically(folder, write)
    logger.info("re-exported the OpenVINO engine of %s from %s", folder, WEIGHTS)
    if int8 and not check["passed"]:
        for name in INT8_IR_FILES:
            (folder / name).unlink(missing_ok=True)
        raise TrainingError(f"the int8 engine did not pass its check against fp32 on {check['photos']} validation photos "
                            f"({check['failed']}; INT8_CHECK in catdog_model/training/export.py): the engine with int8 weights alone serves")


def set_ood_threshold(folder: Path, threshold: float) -> None:
    """The score above which a finished model says "neither", in config.json and its manifest alike; every other file
    kept."""
    ModelFiles(str(folder), str(folder), None).config()
    config = json.loads((folder / "config.json").read_text())
    config["ood_threshold"] = config[MANIFEST_KEY]["config"]["ood_threshold"] = threshold
    save_atomically(folder, lambda temp: (temp / "config.json").write_text(json.dumps(config, indent=2)))
    logger.info("%s says \"neither\" above a score of %g now; its evaluation.json and card still count the verdicts "
                "at the threshold its training chose", folder, threshold)


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Make a finished model folder's OpenVINO engine again from its weights, "
                                     'or set its "neither" threshold.')
    parser.add_argument("folder", type=Path, help="a folder written by train_accelerate.py")
    parser.add_argument("--int8", action="store_true", help="also make the int8 engine: calibrated on the run's training "
                        "photos, kept where it passes its check against fp32 on its validation photos")
    parser.add_argument("--dataset", help="with --int8: where the run's dataset is now (default: the one metrics.json names)")
    parser.add_argument("--ood-threshold", type=_score, default=None, metavar="SCORE",
                        help='set the score above which a picture is "neither" a cat nor a dog (a non-negative number; '
                        "the one training chose is in config.json), and keep the engine")
    args = parse_command(parser, argv)
    try:
        if args.ood_threshold is not None:
            set_ood_threshold(args.folder, args.ood_threshold)
        else:
            reexport(args.folder, args.int8, args.dataset)
    except CatdogError as error:
        exit_with_error(error)


if __name__ == "__main__":
    main()
