"""The one preprocessing path: every image mode, orientation, and every kind of bad file."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from catdog_model import ImageError, open_image, to_rgb
from catdog_model.images import model_input


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _roundtrip(image: Image.Image, fmt: str = "PNG", **kwargs) -> Image.Image:
    return open_image(_encode(image, fmt, **kwargs))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGB", (8, 6), (10, 200, 30)), (10, 200, 30)),
        (lambda: Image.new("L", (8, 6), 77), (77, 77, 77)),
        (lambda: Image.new("1", (8, 6), 1), (255, 255, 255)),
        (lambda: Image.new("RGB", (8, 6), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE), (200, 10, 10)),
        (lambda: Image.new("LA", (8, 6), (40, 255)), (40, 40, 40)),
        (lambda: Image.new("RGBA", (8, 6), (0, 0, 255, 255)), (0, 0, 255)),
        (lambda: Image.new("RGBA", (8, 6), (0, 0, 0, 0)), (255, 255, 255)),  # transparent → white, not black
        (lambda: Image.new("RGBA", (8, 6), (0, 0, 0, 128)), (127, 127, 127)),  # half over white
        (lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), (255, 0, 0)),
    ],
    ids=["RGB", "L", "1", "P", "LA", "RGBA", "RGBA-transparent", "RGBA-half", "CMYK"],
)
def test_modes_become_the_right_rgb(make, expected):
    fmt = "JPEG" if make().mode == "CMYK" else "PNG"
    image = to_rgb(_roundtrip(make(), fmt) if fmt == "PNG" else make())
    assert image.mode == "RGB" and image.size == (8, 6)
    assert np.abs(np.asarray(image).astype(int) - expected).max() <= 2


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert to_rgb(_roundtrip(image)).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped():
    array = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    image = _roundtrip(Image.fromarray(array))  # PNG keeps the 16 bits
    assert image.mode.startswith("I")
    assert [p[0] for p in np.asarray(to_rgb(image))[0]] == [0, 128, 255, 4]


def test_animation_uses_the_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = open_image(data)
    assert image.n_frames == 2
    image.seek(1)  # even if a caller moved on, the first frame is used
    red, green, blue = to_rgb(image).getpixel((3, 3))
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = to_rgb(open_image(_encode(image, "JPEG", exif=exif, quality=95)))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[0] < 50  # white now on top


def test_webp_and_tiny_images():
    assert to_rgb(_roundtrip(Image.new("RGB", (9, 9), (0, 255, 0)), "WEBP", lossless=True)).getpixel((4, 4)) == (0, 255, 0)
    assert model_input(_roundtrip(Image.new("RGB", (1, 1), (255, 0, 0))), 32).shape == (3, 32, 32)


def test_model_input_is_the_whole_picture_squared_as_uint8_channels_first():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    pixels = model_input(image, 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.uint8
    assert (pixels[0] == 255).all() and not pixels[1:].any()


@pytest.mark.parametrize("values", [[np.inf, 0.2, 0.8], [np.nan, 0.2, 0.8], [-np.inf, 0.2, 0.8]], ids=["inf", "nan", "-inf"])
def test_float_pictures_are_scaled_from_their_finite_values(values):
    array = np.tile(np.linspace(0.2, 0.8, 64, dtype=np.float32), (64, 1))
    array[0, :3] = values
    grey = np.asarray(to_rgb(Image.fromarray(array, mode="F")))[..., 0]
    assert grey[1:].min() == 0 and grey[1:].max() == 255  # the finite range stretched, not a black picture


def test_int32_with_large_negatives_and_pictures_with_no_usable_pixel():
    array = np.tile(np.arange(-2**30, 2**30, 2**24, dtype=np.int32), (64, 1))
    grey = np.asarray(to_rgb(Image.fromarray(array, mode="I")))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 32
    with pytest.raises(ImageError, match="no usable pixels"):
        to_rgb(Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F"))


def test_an_icon_container_is_refused_before_it_is_decoded():
    icon = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(icon, "ICO", sizes=[(16, 16), (64, 64)])
    with pytest.raises(ImageError, match="not an image that can be read"):
        open_image(icon.getvalue())


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is a text file, not a picture", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not an image"),
        # Each raised its decoder's own exception (ValueError, SyntaxError, ...) instead of an ImageError:
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 5) + b"IHDR" + b"\x00" * 9, "not an image"),  # truncated IHDR
        (b"P6 this is a text file, not a picture\n", "not an image"),
        (b"qoif" + struct.pack(">II", 64, 64) + b"\x03\x00" + b"\x80", "not an image"),  # not a format served
    ],
    ids=["empty", "text", "garbage-png", "truncated-ihdr", "text-as-ppm", "broken-qoi"],
)
def test_bad_files_are_refused_clearly(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


def test_truncated_image_is_refused():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="damaged or truncated"):
        open_image(data[: len(data) // 2])


def test_a_lazily_opened_truncated_image_given_to_the_predictor_path_is_an_image_error():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)), "JPEG")
    lazy = Image.open(io.BytesIO(data[:2000]))  # as a user's script opens it: not decoded yet
    with pytest.raises(ImageError, match="damaged or truncated"):
        model_input(lazy, 32)


def test_an_in_memory_premultiplied_la_image_is_read():
    image = Image.new("La", (10, 6), 0)
    assert model_input(image, 8).shape == (3, 8, 8)


def test_a_broken_exif_keeps_the_picture_unturned_with_a_log_line(monkeypatch, caplog):
    from PIL import ImageOps

    def broken(image):
        raise SyntaxError("not a TIFF IFD")  # what a malformed tag makes Pillow's EXIF parser raise

    exif = Image.Exif()
    exif[0x0112] = 6
    photo = open_image(_encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes()))
    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with caplog.at_level("WARNING", logger="catdog_model.images"):
        upright = to_rgb(photo)
    assert upright.size == (40, 20) and "broken EXIF orientation" in caplog.text


def test_pixel_bomb_is_refused_from_the_header():
    # 20000×20000 one-bit PNG: a few kilobytes on disk, 1.2 GB once decoded to RGB.
    data = _encode(Image.new("1", (20_000, 20_000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageError, match="too large"):
        open_image(data)


def test_files_on_disk(tmp_path):
    path = tmp_path / "cat.png"
    Image.new("RGB", (5, 5)).save(path)
    assert open_image(path).size == (5, 5)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        open_image(tmp_path / "empty.jpg")


def test_pixel_limit_below_pillows_own():
    data = _encode(Image.new("1", (5_000, 5_000)), "PNG")  # 25 MP: Pillow would decode it
    assert open_image(data).size == (5_000, 5_000)
    with pytest.raises(ImageError, match="too large \\(5000×5000 pixels\\)"):
        open_image(data, max_pixels=1_000_000)


def test_the_default_limit_is_40_megapixels_read_from_the_header():
    assert open_image(_encode(Image.new("1", (8_000, 5_000)), "PNG")).size == (8_000, 5_000)
    with pytest.raises(ImageError, match="too large \\(8000×5001 pixels\\); the limit is 40 megapixels"):
        open_image(_encode(Image.new("1", (8_000, 5_001)), "PNG"))


def _smooth_photo(width: int, height: int) -> Image.Image:
    """A photo-like gradient with some grain: what DCT-scaled decoding is meant for."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = 127 + 100 * np.stack([np.sin(x / 40), np.cos(y / 30), np.sin((x + y) / 60)], -1)
    grain = np.random.default_rng(0).integers(-12, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_input(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_smooth_photo(2400, 1800), "JPEG", quality=92, exif=exif)
    full, draft = open_image(data), open_image(data, draft_size=224)
    assert full.size == (2400, 1800) and draft.size == (300, 225)  # 1/8 scale: the smallest with both sides ≥ 224
    difference = np.abs(model_input(full, 224).astype(int) - model_input(draft, 224).astype(int))
    assert difference.max() <= 4 and difference.mean() <= 1
    assert model_input(draft, 224).shape == (3, 224, 224)


def test_draft_leaves_small_jpegs_and_other_formats_alone():
    small = _encode(_smooth_photo(400, 300), "JPEG")
    assert open_image(small, draft_size=224).size == (400, 300)
    png = _encode(_smooth_photo(2400, 1800), "PNG")
    assert open_image(png, draft_size=224).size == (2400, 1800)
