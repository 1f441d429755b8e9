"""The cat-vs-dog classifier: a timm backbone with the project's fixed head. ``PyTorchModelHubMixin`` stores the
typed ``__init__`` arguments in config.json next to model.safetensors, so that file alone rebuilds the model.

    model = CatDogClassifier(pretrained=False)          # the project's model, no network needed
    model.save_pretrained("out")                        # config.json + model.safetensors
    model = CatDogClassifier.from_pretrained("out")     # or "user/repo", revision="..."
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .config import DEFAULTS, HIDDEN, HUB_METADATA, STAGE_FEATURES, STAT_STAGES, check_config

__all__ = ["CatDogClassifier"]

# The fixed head flattens the whole feature map, so its size grows with the square of the image size:
# 224 px gives 0.1 billion weights (400 MB); 1 billion (4 GB in fp32) is far past any sensible size.
MAX_HEAD_PARAMETERS = 1_000_000_000


def _close_names(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"


class CatDogClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    **HUB_METADATA,
    repo_url="https://github.com/catdog-project/catdog",
    model_card_template=(Path(__file__).parent / "model_card.md").read_text(),  # the one card: training fills it in
):
    """ResNet features → Flatten → Linear(hidden_size) + ReLU → Dropout → Linear(1): one logit per (N, 3, S, S)
    image in [0, 1], normalised inside ``forward``; ``probability(logit)`` is the calibrated P(``labels[1]``)."""

    def __init__(
        self,
        backbone: str = DEFAULTS["backbone"],
        image_size: int = DEFAULTS["image_size"],
        hidden_size: int = DEFAULTS["hidden_size"],
        dropout: float = DEFAULTS["dropout"],
        labels: tuple[str, ...] = DEFAULTS["labels"],
        pretrained: bool = False,
        temperature: float = DEFAULTS["temperature"],
        ood_threshold: float | None = DEFAULTS["ood_threshold"],
    ) -> None:
        super().__init__()
        checked = check_config(dict(backbone=backbone, image_size=image_size, hidden_size=hidden_size, dropout=dropout,
                                    labels=labels, temperature=temperature, ood_threshold=ood_threshold))
        # "hf-hub:user/repo" names a backbone whose architecture timm reads from the Hub: it cannot be checked here.
        if not str(backbone).startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(backbone):
            raise ValueError(f"timm has no model named {backbone!r}{_close_names(backbone)}")
        self.backbone_name = backbone
        self.image_size = image_size
        self.labels = checked["labels"]
        self.temperature = checked["temperature"]  # see config.py, as for the threshold
        self.ood_threshold = checked["ood_threshold"]

        # No classifier and no pooling: the fixed head flattens the whole feature map.
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, global_pool="")
        # Non-persistent: they come from timm's config for this backbone, not from the weights file.
        for name in ("mean", "std"):
            self.register_buffer(name, torch.tensor(self.backbone.pretrained_cfg[name]).view(1, 3, 1, 1), persistent=False)

        # Measure the feature map instead of assuming a stride: any backbone or size works.
        # Eval mode, so the probe leaves batch-norm statistics untouched and works at any size.
        self.backbone.eval()
        try:
            with torch.no_grad():
                channels, height, width = self.backbone(torch.zeros(1, 3, image_size, image_size)).shape[1:]
        except RuntimeError as error:
            raise ValueError(f"{backbone} cannot take {image_size}×{image_size} images: {str(error).splitlines()[0]}") from None
        self.backbone.train()
        head_parameters = channels * height * width * hidden_size
        if head_parameters > MAX_HEAD_PARAMETERS:
            raise ValueError(
                f"image_size {image_size} gives {backbone} a {height}×{width}×{channels} feature map, so the flattened head "
                f"would hold {head_parameters / 1e9:.1f} billion weights (limit {MAX_HEAD_PARAMETERS / 1e9:.0f}); use a smaller image size."
            )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map (N, 3, H, W) images in [0, 1] (or uint8 in 0..255) to (N,) logits for ``labels[1]``."""
        return self.classify(self.hidden(self.feature_map(pixels)))

    # The forward pass in named steps, for the "neither" detector and Grad-CAM (training/export.py).
    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype == torch.uint8:  # model_input's pixels: converted here, on the device, as serving does
            pixels = pixels.to(torch.float32).div(255)
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, (N, C, h, w), from images in [0, 1]."""
        return self.backbone(self._normalise(pixels))

    def inspect(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One backbone pass: the last feature map, and each early stage's per-channel mean and spread (textures and
        colours set noise, flat colour and text apart from a photo where later layers cannot)."""
        final, stages = self.backbone.forward_intermediates(self._normalise(pixels), indices=list(STAT_STAGES))
        statistics = {
            STAGE_FEATURES[index]: torch.cat([stage.float().mean(dim=(2, 3)), stage.float().std(dim=(2, 3), correction=0)], dim=1)
            for index, stage in zip(STAT_STAGES, stages)
        }
        return self.backbone.forward_head(final).float(), statistics

    def hidden(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The head's hidden layer after its ReLU, (N, hidden_size)."""
        return self.head[:3](feature_map)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """Dropout and the last Linear: the (N,) logits."""
        return self.head[3:](hidden).squeeze(-1)

    def forward_with_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(last feature map, logits, {name in FEATURE_NAMES: features}) from one pass: what the "neither" detector and
        Grad-CAM read."""
        feature_map, features = self.inspect(pixels)
        features[HIDDEN] = self.hidden(feature_map)
        return feature_map, self.classify(features[HIDDEN]), features

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated P(``labels[1]``): sigmoid(logit / temperature)."""
        return torch.sigmoid(logits.float() / self.temperature)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, strict: bool = True, **kwargs) -> CatDogClassifier:
        # Saved weights replace the backbone's anyway: never download ImageNet weights here.
        kwargs["pretrained"] = False
        # The mixin defaults to strict=False; mismatched weights must fail loudly instead.
        return super()._from_pretrained(model_id=model_id, strict=True, **kwargs)

    def generate_model_card(self, *args, **kwargs):
        """The mixin's card from model_card.md with this model's architecture; a finished run adds its results
        (training/card.py)."""
        architecture = dict(backbone=self.backbone_name, image_size=self.image_size, labels=self.labels,
                            hidden_size=self.head[1].out_features, dropout=self.head[3].p, model_name="catdog",
                            repo_id="user/repo", trained="trained")
        return super().generate_model_card(*args, **{**architecture, **kwargs})
