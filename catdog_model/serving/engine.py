"""The serving engine: an OpenVINO IR run with numpy alone (no torch). One pass gives the logits, the Grad-CAM heatmaps
and the "neither" detector's features."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import openvino

from ..config import FEATURE_NAMES, OUTPUT_NAMES
from ..hardware import native_bf16

__all__ = ["EngineOutputs", "OpenVINOEngine", "compile_openvino"]

logger = logging.getLogger(__name__)


@dataclass
class EngineOutputs:
    """What one forward pass gives, for a batch of N pictures (numpy arrays)."""

    logits: np.ndarray  # (N,)
    heatmaps: np.ndarray  # (N, h, w) Grad-CAM for the predicted label, in [0, 1]
    features: dict[str, np.ndarray]  # the "neither" detector's layers, by FEATURE_NAMES

    @classmethod
    def from_named(cls, named: dict[str, np.ndarray]) -> EngineOutputs:
        """From the serving graph's outputs by their names (OUTPUT_NAMES)."""
        return cls(named["logits"], named["heatmaps"], {name: named[name] for name in FEATURE_NAMES})


class OpenVINOEngine:
    """pixels (N, 3, S, S) float32 in [0, 1] → EngineOutputs. Not thread-safe: the predictor calls it under its lock."""

    def __init__(self, compiled: "openvino.CompiledModel", precision: str) -> None:
        self.name = f"openvino-{precision}"
        self._request = compiled.create_infer_request()
        self._outputs = {name: compiled.output(name) for name in OUTPUT_NAMES}

    def __call__(self, pixels: np.ndarray) -> EngineOutputs:
        results = self._request.infer({0: np.ascontiguousarray(pixels, dtype=np.float32)}, share_outputs=False)
        return EngineOutputs.from_named({name: results[output] for name, output in self._outputs.items()})


def compile_openvino(model: "openvino.Model | str | Path", threads: int, int8: bool = False) -> OpenVINOEngine:
    """Compile an IR (its .xml, or a model in memory) for this CPU on ``threads`` threads: in bf16 where the CPU
    computes it natively, else f32; ``int8``: the quantized IR, its float layers in f32."""
    start = time.perf_counter()
    precision = "int8" if int8 else "bf16" if native_bf16() else "f32"
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = openvino.Core().compile_model(model if isinstance(model, openvino.Model) else str(model), "CPU",
                                             {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                              "INFERENCE_NUM_THREADS": threads})
    logger.info("OpenVINO %s compiled the model (%s) in %.2f s", openvino.__version__.split("-")[0], precision,
                time.perf_counter() - start)
    return OpenVINOEngine(compiled, precision)
