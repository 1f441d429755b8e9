"""The cat-vs-dog classifier: a timm backbone with the project's fixed head.

Every architecture choice is a plain, typed ``__init__`` argument. ``PyTorchModelHubMixin``
stores those arguments in config.json next to model.safetensors, so that file alone rebuilds
the model for training, serving and benchmarks alike.

    model = CatDogClassifier(pretrained=False)          # the spec model, no network needed
    model.save_pretrained("out")                        # config.json + model.safetensors
    model = CatDogClassifier.from_pretrained("out")     # or "user/repo", revision="..."
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

__all__ = ["CatDogClassifier", "DEFAULT_LABELS"]

DEFAULT_LABELS = ("cat", "dog")  # the order of microsoft/cats_vs_dogs: cat=0, dog=1

logger = logging.getLogger(__name__)


class CatDogClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="catdog",
    tags=["image-classification", "timm", "pytorch", "cats-vs-dogs"],
    license="mit",
    pipeline_tag="image-classification",
    repo_url="https://github.com/catdog-project/catdog",
):
    """ResNet features → Flatten → Linear(hidden_size) + ReLU → Dropout → Linear(1).

    Input: RGB images scaled to [0, 1], shape (N, 3, image_size, image_size). The backbone's
    own mean/std normalisation happens inside ``forward``, so callers never need it.
    Output: one logit per image; ``sigmoid(logit)`` is the probability of ``labels[1]``.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        image_size: int = 224,
        hidden_size: int = 1024,
        dropout: float = 0.2,
        labels: tuple[str, ...] = DEFAULT_LABELS,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        labels = tuple(labels)
        assert len(labels) == 2, f"a binary classifier needs exactly two labels, got {labels}"
        self.backbone_name = backbone
        self.image_size = image_size
        self.labels = labels

        # No classifier and no pooling: the spec's head flattens the whole feature map.
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, global_pool="")
        cfg = self.backbone.pretrained_cfg
        # Non-persistent: they come from timm's config for this backbone, not from the weights file.
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

        # Measure the feature map instead of assuming a stride: any backbone or size works.
        # Eval mode, so the probe leaves batch-norm statistics untouched and works at any size.
        self.backbone.eval()
        with torch.no_grad():
            channels, height, width = self.backbone(torch.zeros(1, 3, image_size, image_size)).shape[1:]
        self.backbone.train()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map (N, 3, H, W) images in [0, 1] to (N,) logits for ``labels[1]``."""
        pixels = (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)
        return self.head(self.backbone(pixels)).squeeze(-1)

    def load_backbone_weights(self, path: Union[str, Path]) -> None:
        """Load ImageNet weights for the backbone from a local timm checkpoint (.pth or .safetensors).

        For machines without Hub access; the classifier keys of the checkpoint are ignored.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained-weights: no such file: {path}")
        state = timm.models.load_state_dict(str(path))
        backbone_keys = set(self.backbone.state_dict())
        ignored = [k for k in state if k not in backbone_keys]
        try:
            missing, _ = self.backbone.load_state_dict({k: v for k, v in state.items() if k in backbone_keys}, strict=False)
        except RuntimeError as error:  # shapes that do not match
            raise ValueError(f"{path} is not a {self.backbone_name} checkpoint: {str(error).splitlines()[1].strip()}") from None
        if missing:
            raise ValueError(
                f"{path} is not a {self.backbone_name} checkpoint: {len(missing)} backbone weights are missing "
                f"(for example {missing[0]})"
            )
        logger.info("loaded backbone weights from %s (ignored %d other keys)", path, len(ignored))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, strict: bool = True, **kwargs) -> "CatDogClassifier":
        # Saved weights replace the backbone's anyway: never download ImageNet weights here.
        kwargs["pretrained"] = False
        # The mixin defaults to strict=False; mismatched weights must fail loudly instead.
        return super()._from_pretrained(model_id=model_id, strict=True, **kwargs)

    @property
    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the backbone and the head."""
        return {
            "backbone": sum(p.numel() for p in self.backbone.parameters()),
            "head": sum(p.numel() for p in self.head.parameters()),
        }

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}, image_size={self.image_size}, labels={self.labels}"

