"""The serving engine: one forward pass that gives everything ``predict`` and ``explain`` need.

``ServingGraph`` is the classifier's forward pass with more outputs: the logits, the Grad-CAM heatmap
and the "neither" detector's features. Two engines run it:

- **OpenVINO** (the default). ``export_openvino`` turns the trained fp32 model into an OpenVINO IR
  (``openvino_model.xml`` / ``openvino_model.bin``, as the Hub names OpenVINO files) whose weights are
  int8, one scale per output channel: the head's 100352×1024 Linear (81.4% of the weights at 224 px) and
  every convolution. The training script exports it next to the weights and pushes it, so a Space
  downloads 0.26× the bytes of ``model.safetensors`` and compiles it in a fraction of a second.
  OpenVINO's CPU plugin runs it in bfloat16 where the CPU computes bf16 natively (AVX-512 BF16 or
  AMX), in float32 elsewhere; the big Linear runs straight from its int8 weights.
- **torch**, eager float32 from ``model.safetensors``: ``load_predictor(..., exact=True)``, and the
  fallback where OpenVINO is missing or cannot read the IR.

Parity between the two is tested on all 3,000 mini photos (tests/test_engine.py).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .hardware import native_bf16
from .images import to_float
from .model import FEATURE_NAMES, CatDogClassifier

try:  # in requirements.txt; without it the torch engine serves
    import openvino
except ImportError:  # pragma: no cover - depends on the environment
    openvino = None

__all__ = ["IR_FILES", "EngineOutputs", "NonFiniteWeightError", "OpenVINOEngine", "ServingGraph", "TorchEngine", "compile_openvino",
           "export_openvino", "save_openvino"]

logger = logging.getLogger(__name__)

IR_FILES = ("openvino_model.xml", "openvino_model.bin")


class NonFiniteWeightError(ValueError):
    """The IR holds a NaN or infinite weight: it would answer every picture with NaN."""


@dataclass
class EngineOutputs:
    """What one forward pass gives, for a batch of N pictures."""

    logits: torch.Tensor  # (N,)
    heatmaps: torch.Tensor  # (N, h, w) Grad-CAM for the predicted label, in [0, 1]
    features: dict[str, torch.Tensor]  # the "neither" detector's layers, by FEATURE_NAMES


def _int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output unit (the first dimension): (int8 weight, float scale)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True) / 127).clamp_min(1e-12)
    return (weight / scale).round().clamp(-127, 127).to(torch.int8), scale


class _Int8Conv2d(nn.Module):
    """A Conv2d whose weight is stored in int8 and dequantized where it is used: OpenVINO keeps such a
    weight compressed in the IR and expands it once, at compile time."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        weight, scale = _int8(conv.weight)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)
        self.bias = conv.bias
        self.options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_int8.float() * self.scale, self.bias, **self.options)


class _Int8Linear(nn.Module):
    """A Linear with int8 weights, dequantized in the graph: OpenVINO's CPU plugin runs this pattern as an
    int8 matmul, streaming a quarter of the bytes of the float32 weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = _int8(linear.weight)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale

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
    autograd, so an exported or quantized graph computes it too.
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
        upstream = (features["hidden"] > 0).float() * self.model.head[4].weight * sign  # d(±logit)/d(hidden)
        weights = upstream @ self.pooled.float() / (feature_map.shape[2] * feature_map.shape[3])
        cams = F.relu(torch.einsum("nc,nchw->nhw", weights, feature_map))
        cams = cams / cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return logits, cams, *(features[name] for name in FEATURE_NAMES)


def _outputs(values) -> EngineOutputs:
    logits, heatmaps, *features = values
    return EngineOutputs(logits, heatmaps, dict(zip(FEATURE_NAMES, features)))


class TorchEngine:
    """The eager float32 model: exact, and what serves where OpenVINO cannot."""

    name = "torch-fp32"

    def __init__(self, model: CatDogClassifier) -> None:
        self.graph = ServingGraph(model.eval())

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> EngineOutputs:
        return _outputs(self.graph(pixels))


def export_openvino(model: CatDogClassifier) -> "openvino.Model":
    """The serving graph of a trained fp32 model, int8 weights, as an OpenVINO model (in memory)."""
    if openvino is None:
        raise RuntimeError("OpenVINO is not installed (pip install openvino)")
    size = model.image_size
    graph = ServingGraph(model.eval(), int8_weights=True).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO's PyTorch frontend traces with TorchScript, which torch now marks as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        return openvino.convert_model(graph, example_input=torch.rand(1, 3, size, size), input=[(-1, 3, size, size)])


def save_openvino(model: CatDogClassifier, folder: str | Path) -> None:
    """Write ``openvino_model.xml`` and ``.bin`` for a trained fp32 model into ``folder``."""
    # compress_to_fp16 would not apply: OpenVINO leaves a model with int8 weights as it is.
    openvino.save_model(export_openvino(model), str(Path(folder) / IR_FILES[0]), compress_to_fp16=False)


class OpenVINOEngine:
    """The IR compiled for this CPU: bf16 where it computes bf16 natively, f32 elsewhere.
    Not thread-safe: the predictor calls it from its model thread only."""

    def __init__(self, compiled: "openvino.CompiledModel", precision: str) -> None:
        self.name = f"openvino-{precision}"
        self._request = compiled.create_infer_request()

    def __call__(self, pixels: torch.Tensor) -> EngineOutputs:
        if pixels.dtype == torch.uint8:
            pixels = to_float(pixels)
        results = self._request.infer({0: pixels.float().contiguous().numpy()}, share_outputs=False)
        return _outputs(torch.from_numpy(results[index]) for index in range(len(results)))


def compile_openvino(model: "openvino.Model | str", threads: int) -> OpenVINOEngine:
    """Compile an IR (a path to the .xml, or a model in memory) for this CPU, ``threads`` threads."""
    start = time.perf_counter()
    core = openvino.Core()
    if not isinstance(model, openvino.Model):
        model = core.read_model(str(model))
    _check_constants_finite(model)
    precision = "bf16" if native_bf16() else "f32"
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": threads})
    logger.info("OpenVINO %s compiled the model (%s) in %.2f s", openvino.__version__, precision, time.perf_counter() - start)
    return OpenVINOEngine(compiled, precision)


def _check_constants_finite(model: "openvino.Model") -> None:
    """A NaN or infinite weight in the IR would answer every picture with NaN: refuse it at load."""
    import numpy as np

    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type().is_real():
            if not np.isfinite(op.get_data()).all():
                raise NonFiniteWeightError(f"{IR_FILES[1]} holds a non-finite weight ({op.get_friendly_name()})")
