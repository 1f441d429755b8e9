"""The serving graph in torch: what the OpenVINO export traces, and what ``exact=True`` runs (``TorchEngine``,
eager float32 from model.safetensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import FEATURE_NAMES, HIDDEN, STAGE_FEATURES, WEIGHTS
from .model import CatDogClassifier

__all__ = ["ServingGraph", "TorchEngine"]


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
        return logits, cams, *(features[name] for name in FEATURE_NAMES)


class TorchEngine:
    """The eager float32 model: exact, and what serves where OpenVINO cannot. numpy in, numpy out."""

    name = "torch-fp32"

    def __init__(self, model: CatDogClassifier, threads: int | None = None) -> None:
        self.graph = ServingGraph(model.eval())
        self.image_size = model.image_size
        channels = {index: info["num_chs"] for index, info in enumerate(model.backbone.feature_info)}
        # The detector's layer widths: the hidden layer's units, each stage's channels twice (mean and spread).
        self.feature_sizes = {HIDDEN: model.head[1].out_features,
                              **{name: 2 * channels[index] for index, name in STAGE_FEATURES.items()}}
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> TorchEngine:
        """From a model folder's config.json and model.safetensors, strict; ValueError for NaN weights."""
        model = CatDogClassifier.from_pretrained(str(folder)).eval()
        broken = next((name for name, tensor in model.state_dict().items()
                       if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
        if broken:
            raise ValueError(f"{WEIGHTS} holds non-finite weights ({broken}); retrain the model")
        return cls(model, threads)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        """The graph's outputs in order (logits, heatmaps, the detector's features), as the OpenVINO engine gives them."""
        return tuple(value.numpy() for value in self.graph(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))))
