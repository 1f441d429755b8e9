"""OpenVINO runs the fast path's forward pass, where it is installed (it is in requirements.txt).

The same weights as serving.py's model (bf16-able backbone with folded batch norms, int8 big Linear),
converted once at load time into one OpenVINO model whose outputs are everything a prediction or an
explanation needs: the last feature map, the logits, the hidden layer and the early stages' statistics.
OpenVINO's CPU plugin then runs the convolutions in bf16 where the CPU has AVX-512 BF16 or AMX (fp32
elsewhere) and the Linear straight from its int8 weights: 0.5-0.7x the time of the torch fast path on an
AVX-512 BF16 EPYC (benchmarks/serving_speed.py), with the same answers to within 0.003.

Converting takes a few seconds (torch tracing), so ``Predictor`` does it on a background thread and serves
with torch until it is done; ``CATDOG_OPENVINO=off`` or ``load_predictor(..., openvino="off")`` keeps torch.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .images import to_float
from .model import STAT_STAGES, CatDogClassifier
from .serving import Int8Linear

try:  # optional at import: without it the torch fast path serves, as before
    import openvino
except ImportError:  # pragma: no cover - depends on the environment
    openvino = None

__all__ = ["OpenVINOForward", "try_openvino"]

logger = logging.getLogger(__name__)


class _AllOutputs(nn.Module):
    """The forward pass as OpenVINO sees it: fp32 weights (its bf16 kernels convert them once at compile
    time), and the int8 Linear written as int8 → float × scale, the pattern OpenVINO runs as an int8 matmul."""

    def __init__(self, model: CatDogClassifier) -> None:
        super().__init__()
        big = model.head[1]
        self.model = copy.deepcopy(model, memo={id(tensor): tensor for tensor in big.buffers()})  # int8 stays shared
        self.model.compute_dtype = torch.float32
        self.model.backbone.to(torch.float32, memory_format=torch.contiguous_format)
        self.register_buffer("weight_int8", big.weight_int8)
        self.register_buffer("scales", big.scales.float()[:, None])
        self.register_buffer("bias", big.bias)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map, statistics = self.model.inspect(pixels)
        hidden = F.relu(F.linear(feature_map.flatten(1), self.weight_int8.float() * self.scales, self.bias))
        logits = self.model.classify(hidden)
        return feature_map, logits, hidden, *(statistics[f"stage{index}"] for index in STAT_STAGES)


class OpenVINOForward:
    """``ood._forward``'s contract, computed by OpenVINO: pixels → (feature map, logits, detector features).

    Not thread-safe: the predictor calls it from its model thread only.
    """

    def __init__(self, model: CatDogClassifier, threads: int) -> None:
        if not isinstance(model.head[1], Int8Linear):
            raise ValueError("OpenVINO serves the fast path only (an int8 head)")
        start = time.perf_counter()
        size = model.image_size
        exportable = _AllOutputs(model).eval()
        with torch.no_grad(), warnings.catch_warnings():
            # OpenVINO's PyTorch frontend traces with TorchScript, which torch now marks as deprecated.
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            converted = openvino.convert_model(exportable, example_input=torch.rand(1, 3, size, size),
                                               input=[(-1, 3, size, size)])
        precision = "bf16" if model.compute_dtype == torch.bfloat16 else "f32"
        compiled = openvino.Core().compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
        self._request = compiled.create_infer_request()
        self._weights = exportable  # OpenVINO may read the fp32 constants in place: they live as long as it does
        logger.info("OpenVINO %s compiled the model (%s) in %.1f s", openvino.__version__, precision,
                    time.perf_counter() - start)

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if pixels.dtype == torch.uint8:
            pixels = to_float(pixels)
        outputs = self._request.infer({0: pixels.float().contiguous().numpy()}, share_outputs=False)
        feature_map, logits, hidden, *stages = (torch.from_numpy(outputs[index]) for index in range(len(outputs)))
        features = {"hidden": hidden, **{f"stage{index}": stage for index, stage in zip(STAT_STAGES, stages)}}
        return feature_map, logits, features


def try_openvino(model: CatDogClassifier, threads: int) -> Optional[OpenVINOForward]:
    """An OpenVINOForward, or None (logged) where OpenVINO is missing or cannot take this model."""
    if openvino is None:
        logger.info("OpenVINO is not installed: the torch fast path serves")
        return None
    try:
        return OpenVINOForward(model, threads)
    except Exception as error:  # conversion runs a tracer over arbitrary model code; torch still serves
        logger.warning("OpenVINO could not compile the model, the torch fast path serves: %s",
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
