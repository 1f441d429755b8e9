"""Where the model looked: Grad-CAM heatmaps, drawn for people.

The serving engine computes each picture's Grad-CAM map inside its forward pass (export.py, in closed
form from the head's weights); these functions turn that small map back into the picture's shape and
draw it over the picture in "jet" colours.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["overlay_heatmap", "resize_heatmap"]


def resize_heatmap(heatmap: np.ndarray, width: int, height: int, longest: int) -> np.ndarray:
    """A (h, w) map stretched back to the picture's aspect ratio, its longest side ``longest`` pixels (bilinear)."""
    scale = longest / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(size, Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.45, longest: int = 384) -> Image.Image:
    """The picture, scaled so that its longest side is ``longest``, with the heatmap in "jet" colours over it."""
    from matplotlib import colormaps  # only the app and the report draw

    scale = longest / max(image.size)
    picture = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(colours).resize(picture.size, Image.BILINEAR)
    return Image.blend(picture.convert("RGB"), heat, opacity)
