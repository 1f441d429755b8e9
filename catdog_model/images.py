"""The one path from any picture to the model's input, for training, evaluation and serving: ``open_image`` checks the
pixel count from the header, ``to_rgb`` fixes orientation and mode, ``model_input`` gives the (3, S, S) uint8 array."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .errors import CatdogError

__all__ = ["ImageError", "MAX_PIXELS", "decode", "model_input", "open_image", "to_rgb"]

# 40 megapixels: larger than any phone photo, small enough to decode on a 2-vCPU Space.
MAX_PIXELS = 40_000_000
# Pictures, not containers: an ICO or ICNS may hold a frame far larger than its header says, decoded unchecked.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG includes a phone's MPO
Image.init()  # every plugin registered, so that each of FORMATS can be asked for by name
ImageSource = Union[str, Path, bytes, BinaryIO]

logger = logging.getLogger(__name__)


class ImageError(CatdogError):
    """A picture that cannot be used, with a message fit to show the user and a title for it."""

    def __init__(self, message: str, title: str = "Cannot read this file") -> None:
        super().__init__(message)
        self.title = title


def open_image(source: ImageSource, max_pixels: int = MAX_PIXELS, draft_size: Optional[int] = None,
               max_megabytes: Optional[float] = None, decode_now: bool = True) -> Image.Image:
    """Open and decode a picture, or ``ImageError`` with a short reason (titled "Too large" over ``max_megabytes`` or
    ``max_pixels``, from the header). With ``draft_size``, a JPEG decodes at 1/2, 1/4 or 1/8 scale while both sides stay
    at least ``draft_size``."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("The file is empty.")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)) and Path(source).is_file():
        megabytes = Path(source).stat().st_size / 2**20
        if megabytes == 0:
            raise ImageError("The file is empty.")
        if max_megabytes and megabytes > max_megabytes:
            raise ImageError(f"The file is {megabytes:.1f} MB; the limit is {max_megabytes:g} MB a picture.", "Too large")
    try:
        image = Image.open(source, formats=FORMATS)
    except FileNotFoundError:
        raise ImageError(f"No such file: {source}") from None
    except Image.DecompressionBombError:  # Pillow's own header check, far above our limit
        raise ImageError(f"The image is too large; the limit is {max_pixels / 1e6:.0f} megapixels.", "Too large") from None
    except Exception:  # each format's parser fails its own way on bad bytes (ValueError, struct.error, IndexError, ...)
        raise ImageError("This file is not an image that can be read (try JPEG, PNG, WebP or GIF).") from None
    # Image.open only reads the header, so this check costs nothing and allocates nothing.
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"The image is too large ({width}×{height} pixels); the limit is {max_pixels / 1e6:.0f} megapixels.", "Too large")
    if decode_now:  # else the caller decodes (``decode``), once it has reserved the memory
        decode(image, draft_size)
    return image


def decode(image: Image.Image, draft_size: Optional[int] = None) -> None:
    """``image.load()``, a decoder's failure as ``ImageError``; with ``draft_size``, a JPEG decodes as ``open_image``
    would, so a lazily opened picture decodes as the app's does."""
    if draft_size and image.format == "JPEG":
        image.draft(image.mode, (draft_size, draft_size))
    try:
        image.load()
    except ValueError as error:
        if "closed image" in str(error):  # Pillow's "Operation on closed image"
            raise ImageError("The image was closed before it could be classified.") from None
        raise ImageError("The image is damaged or truncated and cannot be decoded.") from None
    except Exception:  # OSError ("truncated"), SyntaxError, struct.error, ...: the decoders' own types
        raise ImageError("The image is damaged or truncated and cannot be decoded.") from None


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (I;16*, I, F) scaled into 0..255, not clipped: 16-bit by its fixed range, 32-bit by its
    finite values. In place, in one float32 array."""
    array = np.array(image, dtype=np.float32)  # a copy of its own, to work in
    finite = np.isfinite(array)
    if not finite.any():
        raise ImageError("The image has no usable pixels (every value is NaN or infinite).")
    positive = None if finite.all() else np.isposinf(array)
    if positive is not None:
        array[~finite] = np.nan  # nanmin and nanmax skip them without a copy
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    if positive is not None:
        array[~finite], array[positive] = low, high
    array -= low
    array *= 255 / (high - low) if high > low else 0
    np.clip(array, 0, 255, out=array)
    return Image.fromarray(np.rint(array, out=array).astype(np.uint8), mode="L")


def _upright(image: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says; unturned, with a log line, when the EXIF is broken."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # only then: exif_transpose always copies
            return ImageOps.exif_transpose(image)
    except Exception as error:  # a malformed tag: the pixels are still good
        logger.warning("ignoring the picture's broken EXIF orientation (%s: %s)", type(error).__name__, error)
    return image


def to_rgb(image: Image.Image, draft_size: Optional[int] = None) -> Image.Image:
    """Upright, RGB, first frame (``draft_size``: see ``decode``)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}: open files with catdog_model.open_image first")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"The image has no pixels ({image.width}×{image.height}).")
    decode(image, draft_size)  # an image opened lazily from a truncated file fails here
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = _upright(image)
    mode = image.mode
    if mode in ("P", "PA"):
        # Palette images may carry transparency; RGBA keeps it so it is composited below.
        image = image.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        image = _scale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        # Premultiplied La converts only to LA; the others straight to RGBA. Pasted over white through its own
        # alpha: one RGB copy, where compositing two RGBA pictures took three.
        rgba = image if image.mode == "RGBA" else (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
    return image if image.mode == "RGB" else image.convert("RGB")


def model_input(image: Image.Image, image_size: int) -> np.ndarray:
    """Any PIL image → upright RGB resized without cropping (the whole animal stays in view) to a (3, S, S) uint8 array.
    """
    # reducing_gap: a box reduction first where the picture is 3× the size or more, so that resampling a very long
    # side (a 1×40,000,000 strip) does not allocate filter weights for every source pixel.
    square = to_rgb(image, draft_size=image_size).resize((image_size, image_size), Image.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))
