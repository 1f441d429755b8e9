"""The serving graph in torch: exported to the OpenVINO IR at training time, and run eagerly as the exact engine.

``ServingGraph`` is the classifier's forward pass with more outputs: the logits, the Grad-CAM heatmap and
the "neither" detector's features, so that one pass answers both ``predict`` and ``explain``.

- ``export_openvino`` / ``save_openvino`` turn a trained fp32 model into the OpenVINO IR (engine.py), with
  int8 weights, one scale per output channel: the head's 100352×1024 Linear (81.4% of the weights at 224 px)
  and every plain convolution. A Space then downloads 0.28× the bytes of ``model.safetensors``. The
  training script saves it next to the weights; ``load_predictor`` calls it for a model pushed without one.
- ``TorchEngine`` runs the same graph eagerly in float32 from ``model.safetensors``: ``exact=True``, and
  the fallback where OpenVINO is missing or cannot read the IR.

Parity between the two is tested on all 3,000 mini photos (tests/test_engine.py).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import engine
from .engine import IR_FILES, EngineOutputs
from .model import CatDogClassifier
from .ood import FEATURE_NAMES, HIDDEN, feature_sizes

__all__ = ["ServingGraph", "TorchEngine", "export_openvino", "save_openvino"]


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


class ServingGraph(nn.Module):
    """pixels (N, 3, S, S) in [0, 1] → logits, Grad-CAM heatmaps, and the detector's features, in one pass.

    Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) weighs each channel of the last
    feature map by the mean gradient of the predicted label's logit over the map. The head is Linear →
    ReLU → Linear on the flattened map, so that mean is exact in closed form: (w2 ⊙ relu'(hidden)) · W1,
    summed over each channel's positions (``pooled``, computed once) and divided by their number. No
    autograd, so the exported graph computes it too.
    """

    def __init__(self, model: CatDogClassifier, int8_weights: bool = False) -> None:
        super().__init__()
        self.model = _with_int8_weights(model) if int8_weights else model
        first = self.model.head[1].weight.detach().float()
        pooled = first.view(first.shape[0], self.model.backbone.num_features, -1).sum(-1)
        # Stored in float16 in the IR (4 MB at 224 px), expanded at compile time like the int8 weights.
        self.register_buffer("pooled", pooled.half() if int8_weights else pooled, persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map, logits, features = self.model.forward_with_features(pixels)
        sign = torch.where(logits >= 0, 1.0, -1.0)[:, None]
        upstream = (features[HIDDEN] > 0).float() * self.model.head[4].weight * sign  # d(±logit)/d(hidden)
        weights = upstream @ self.pooled.float() / (feature_map.shape[2] * feature_map.shape[3])
        cams = F.relu(torch.einsum("nc,nchw->nhw", weights, feature_map))
        cams = cams / cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return logits, cams, *(features[name] for name in FEATURE_NAMES)


class TorchEngine:
    """The eager float32 model: exact, and what serves where OpenVINO cannot. numpy in, numpy out."""

    name = "torch-fp32"

    def __init__(self, model: CatDogClassifier, threads: int | None = None) -> None:
        self.graph = ServingGraph(model.eval())
        self.image_size = model.image_size
        self.feature_sizes = feature_sizes(model.head[1].out_features,
                                           {index: info["num_chs"] for index, info in enumerate(model.backbone.feature_info)})
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> EngineOutputs:
        values = self.graph(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        return EngineOutputs.from_values(value.numpy() for value in values)


def export_openvino(model: CatDogClassifier) -> "engine.openvino.Model":
    """The serving graph of a trained fp32 model, int8 weights, as an OpenVINO model (in memory)."""
    if engine.openvino is None:
        raise RuntimeError("OpenVINO is not installed (pip install openvino)")
    size = model.image_size
    graph = ServingGraph(model.eval(), int8_weights=True).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO's PyTorch frontend traces with TorchScript, which torch now marks as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        return engine.openvino.convert_model(graph, example_input=torch.rand(1, 3, size, size), input=[(-1, 3, size, size)])


def save_openvino(model: CatDogClassifier, folder: str | Path) -> None:
    """Write ``openvino_model.xml`` and ``.bin`` for a trained fp32 model into ``folder``."""
    # compress_to_fp16 would not apply: OpenVINO leaves a model that has int8 weights as it is.
    engine.openvino.save_model(export_openvino(model), str(Path(folder) / IR_FILES[0]), compress_to_fp16=False)
