"""The serving engine made from a trained fp32 model: ``ServingGraph`` (logits, Grad-CAM and the detector's features
in one pass) traced into the OpenVINO IR, int8 weights with one scale per output channel (0.28× the bytes of
model.safetensors). For a folder whose IR is missing or damaged, the command makes it again from the weights
the manifest vouches for; or it sets the "neither" threshold, vouched for like the rest:

    python -m catdog_model.training.export MODEL_FOLDER [--ood-threshold SCORE]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Optional

import openvino
import torch
import torch.nn.functional as F
from torch import nn

from ..config import FEATURE_NAMES, HIDDEN, IR_FILES, MANIFEST_KEY, OUTPUT_NAMES, WEIGHTS
from ..errors import CatdogError
from ..cli import exit_with_error, parse_command
from ..model import CatDogClassifier
from ..serving.files import ModelFiles, ModelLoadError, file_sha256, manifest_of
from .run_state import TrainingError, save_atomically

__all__ = ["ServingGraph", "export_openvino", "main", "reexport", "save_openvino", "set_ood_threshold"]

logger = logging.getLogger(__name__)


class ServingGraph(nn.Module):
    """pixels (N, 3, S, S) in [0, 1] → logits, Grad-CAM heatmaps (Selvaraju et al., 2017) and the detector's
    features, in one pass. The head is Linear → ReLU → Linear on the flattened map, so Grad-CAM's mean gradient
    is exact in closed form, (w2 ⊙ relu'(hidden)) · W1 pooled per channel: no autograd, so the export has it too."""

    def __init__(self, model: CatDogClassifier, compact: bool = False) -> None:
        super().__init__()
        self.model = model
        first = self.model.head[1].weight.detach().float()
        pooled = first.view(first.shape[0], self.model.backbone.num_features, -1).sum(-1)
        # ``compact`` (the export): stored in float16 in the IR (4 MB at 224 px), expanded at compile time.
        self.register_buffer("pooled", pooled.half() if compact else pooled, persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map, logits, features = self.model.forward_with_features(pixels)
        sign = torch.where(logits >= 0, 1.0, -1.0)[:, None]
        upstream = (features[HIDDEN] > 0).float() * self.model.head[4].weight * sign  # d(±logit)/d(hidden)
        weights = upstream @ self.pooled.float() / (feature_map.shape[2] * feature_map.shape[3])
        cams = F.relu(torch.einsum("nc,nchw->nhw", weights, feature_map))
        cams = cams / cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return logits, cams, *(features[name] for name in FEATURE_NAMES)  # in the order of OUTPUT_NAMES


def _int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output unit (the first dimension): (int8 weight, float scale)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True) / 127).clamp_min(1e-12)
    return (weight / scale).round().clamp(-127, 127).to(torch.int8), scale


class _Int8Weight(nn.Module):
    """A layer whose weight is stored in int8 and dequantized where it is used. OpenVINO keeps such a weight
    compressed in the IR: it runs a Linear straight from it as an int8 matmul (a quarter of the bytes to
    stream), and expands a convolution's once, at compile time."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        weight, scale = _int8(layer.weight)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)
        self.bias = layer.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale


class _Int8Conv2d(_Int8Weight):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv)
        self.options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, **self.options)


class _Int8Linear(_Int8Weight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _with_int8_weights(model: CatDogClassifier) -> CatDogClassifier:
    """A copy of the model whose plain convolutions and big Linear keep int8 weights (the original is untouched)."""
    big = model.head[1]
    copied = copy.deepcopy(model, memo={id(big.weight): big.weight})  # the 400 MB weight is replaced, not copied
    for name, module in list(copied.named_modules()):
        if type(module) is nn.Conv2d and module.padding_mode == "zeros":  # timm's own conv types keep float weights
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, _Int8Conv2d(module))
    copied.head[1] = _Int8Linear(big)
    return copied


def export_openvino(model: CatDogClassifier) -> openvino.Model:
    """The serving graph of a trained fp32 model, int8 weights, as an OpenVINO model (in memory)."""
    size = model.image_size
    graph = ServingGraph(_with_int8_weights(model.eval()), compact=True).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO's PyTorch frontend traces with TorchScript, which torch now marks as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        converted = openvino.convert_model(graph, example_input=torch.rand(1, 3, size, size), input=[(-1, 3, size, size)])
    for output, name in zip(converted.outputs, OUTPUT_NAMES):  # the engine reads each by its name
        output.get_tensor().set_names({name})
    return converted


def save_openvino(model: CatDogClassifier, folder: str | Path) -> None:
    """Write ``openvino_model.xml`` and ``.bin`` for a trained fp32 model into ``folder``."""
    # compress_to_fp16 would not apply: OpenVINO leaves a model that has int8 weights as it is.
    openvino.save_model(export_openvino(model), str(Path(folder) / IR_FILES[0]), compress_to_fp16=False)


def reexport(folder: Path) -> None:
    """The IR of a finished model folder made again from its weights, and its manifest entries with it."""
    try:
        config = json.loads((folder / "config.json").read_text())
        manifest = config[MANIFEST_KEY]["files"]
        weights = manifest[WEIGHTS]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"{folder} has no config.json with a manifest ({type(error).__name__}): it is not a finished "
                            "model of train_accelerate.py, so there is nothing to vouch for its weights; retrain it.") from None
    if not (folder / WEIGHTS).is_file() or file_sha256(folder / WEIGHTS) != weights:
        raise TrainingError(f"{folder / WEIGHTS} is missing or is not the file its run wrote: retrain the model.")
    try:
        model = CatDogClassifier.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as error:
        raise TrainingError(f"Could not read the model in {folder}: {str(error).splitlines()[0]}") from None

    def write(temp: Path) -> None:
        save_openvino(model, temp)
        manifest.update(manifest_of(temp, IR_FILES, weights=weights)["files"])
        (temp / "config.json").write_text(json.dumps(config, indent=2))

    save_atomically(folder, write)
    logger.info("re-exported the OpenVINO engine of %s from %s", folder, WEIGHTS)


def set_ood_threshold(folder: Path, threshold: float) -> None:
    """The score above which a finished model says "neither", in config.json and its manifest alike (so that it is
    vouched for, as training's own was); the engine and every other file are kept."""
    try:
        ModelFiles(str(folder), str(folder), None).config()
    except ModelLoadError as error:
        raise TrainingError(str(error)) from None
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
    parser.add_argument("--ood-threshold", type=_score, default=None, metavar="SCORE",
                        help='set the score above which a picture is "neither" a cat nor a dog (a non-negative number; '
                        "the one training chose is in config.json), and keep the engine")
    args = parse_command(parser, argv)
    try:
        set_ood_threshold(args.folder, args.ood_threshold) if args.ood_threshold is not None else reexport(args.folder)
    except CatdogError as error:
        exit_with_error(error)


if __name__ == "__main__":
    main()
