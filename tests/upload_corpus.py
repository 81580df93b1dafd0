"""A corpus of hostile and awkward uploads, built in code at test time (no binary files in git).

Reused beyond ``tests/core/test_images.py``: the dashboard's browser tests upload ``case.data`` under
``case.filename``, load tests replay it. Each case says how to decode it (``target_shape``,
``light_on_dark``; by default the bundled demo's 28×28×1 light-on-dark format), whether decoding must
succeed ("ok") or raise ``ImageDecodeError`` ("error"), and optionally a ``check`` on the result.

Usage::

    for case in build_upload_corpus():
        ...decode_upload(case.data, **case.decode_kwargs)...
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from core.images import DEFAULT_MAX_BYTES, DecodedImage

DEMO_SHAPE = (28, 28, 1)


@dataclass(frozen=True)
class UploadCase:
    """One upload: its bytes, a file name, how to decode it and what must happen."""

    name: str
    filename: str
    data: bytes
    expect: Literal["ok", "error"]
    check: Callable[[DecodedImage], None] | None = None
    target_shape: tuple[int, int, int] = DEMO_SHAPE
    light_on_dark: bool = True
    # For "error" cases: a few words the user-facing message must contain (lower case).
    message_contains: str | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def decode_kwargs(self) -> dict[str, Any]:
        return {"target_shape": self.target_shape, "light_on_dark": self.light_on_dark}


# --- encoders -----------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    """Bytes of ``img`` saved in ``fmt`` by Pillow."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_declaring_size(width: int, height: int) -> bytes:
    """A valid-looking grayscale PNG whose IHDR declares width×height, with a tiny IDAT.

    The IDAT holds a few rows of zeros only, so the file is ~100 bytes however large the declared
    image: the shape of a decompression bomb, to be refused from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def garment_photo(background: int, garment: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A (96, 72, 3) uint8 'product photo': a T-shirt silhouette on a plain, slightly noisy backdrop."""
    rng = np.random.default_rng(seed)
    h, w = 96, 72
    img = np.full((h, w, 3), background, dtype=np.float64)
    body = np.zeros((h, w), dtype=bool)
    body[30:85, 20:52] = True  # torso
    body[30:45, 8:64] = True  # sleeves
    img[body] = garment
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _quadrant_marker(size: int = 40) -> np.ndarray:
    """(size, size, 3) black image with a white block in the top-left quadrant only."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[4 : size // 2 - 4, 4 : size // 2 - 4] = 255
    return img


# --- checks -------------------------------------------------------------------------------------


def _quadrant_means(image: np.ndarray) -> dict[str, float]:
    h, w = image.shape[:2]
    gray = image.astype(np.float64).mean(axis=2)
    return {
        "top_left": gray[: h // 2, : w // 2].mean(),
        "top_right": gray[: h // 2, w // 2 :].mean(),
        "bottom_left": gray[h // 2 :, : w // 2].mean(),
        "bottom_right": gray[h // 2 :, w // 2 :].mean(),
    }


def _check_rotated_marker(decoded: DecodedImage) -> None:
    # Stored with the marker top-left and EXIF orientation 6 ("rotate 90° clockwise to display"),
    # so the displayed image has it top-right.
    means = _quadrant_means(decoded.image)
    brightest = max(means, key=means.__getitem__)
    assert brightest == "top_right", means
    assert any("EXIF rotation" in note for note in decoded.notes), decoded.notes


def _check_first_frame(decoded: DecodedImage) -> None:
    # Frame 0 is white everywhere except a black border; later frames are black.
    assert decoded.image[8:20, 8:20].mean() > 200, decoded.image[..., 0]
    assert any("first frame" in note for note in decoded.notes), decoded.notes


def _check_16bit_scaled(decoded: DecodedImage) -> None:
    # A full-range 16-bit ramp must land on the full 8-bit range, not clip to white.
    row = decoded.image[14, :, 0].astype(int)
    assert row[0] < 20 and row[-1] > 235, row
    assert np.all(np.diff(row) >= 0), row
    assert any("16-bit" in note for note in decoded.notes), decoded.notes


def _check_inverted(decoded: DecodedImage) -> None:
    gray = decoded.image[..., 0].astype(float)
    assert any("inverted" in note for note in decoded.notes), decoded.notes
    assert gray[:2].mean() < 60, "background should now be dark"
    assert gray[12:20, 10:18].mean() > 150, "the dark garment should now be light"


def _check_not_inverted(decoded: DecodedImage) -> None:
    gray = decoded.image[..., 0].astype(float)
    assert not any("inverted" in note for note in decoded.notes), decoded.notes
    assert gray[:2].mean() < 60
    assert gray[12:20, 10:18].mean() > 150


def _check_transparent_background_dark(decoded: DecodedImage) -> None:
    # Light-on-dark target: whatever the object's colour, the transparent surround ends up black.
    assert decoded.image[:3, :3].mean() < 30, decoded.image[..., 0]
    assert decoded.image[10:18, 10:18].mean() > 100, decoded.image[..., 0]


def _check_shape_only(decoded: DecodedImage) -> None:
    assert decoded.image.dtype == np.uint8


def _check_cmyk(decoded: DecodedImage) -> None:
    assert "converted CMYK to RGB" in decoded.notes, decoded.notes
    assert decoded.original_mode == "CMYK"


def _check_rgb_colour_kept(decoded: DecodedImage) -> None:
    # Pure red stays red when the target has three channels.
    r, g, b = decoded.image[14, 14].astype(int)
    assert r > 200 and g < 40 and b < 40, (r, g, b)


# --- the corpus -----------------------------------------------------------------------------------


def build_upload_corpus() -> list[UploadCase]:
    """All cases, in a stable order. Built fresh on every call (~0.1 s; the oversized one is 10 MB)."""
    rng = np.random.default_rng(1234)
    noise_rgb = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    dark_garment = Image.fromarray(garment_photo(background=235, garment=(25, 35, 90)))
    light_garment = Image.fromarray(garment_photo(background=10, garment=(225, 220, 210)))
    png_noise = encode(noise_rgb, "PNG")
    jpeg_noise = encode(noise_rgb, "JPEG", quality=90)

    # Animated GIF: frame 0 white with a black border (so it is not inverted), frames 1-2 black.
    first = np.zeros((32, 32), dtype=np.uint8)
    first[4:28, 4:28] = 255
    frames = [Image.fromarray(first)] + [Image.fromarray(np.zeros((32, 32), np.uint8))] * 2
    animated_gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)

    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))

    # Palette image: index 0 transparent, index 1 a mid-grey object.
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 128, 128, 128] + [0] * (256 - 2) * 3)
    palette.paste(1, (8, 8, 24, 24))
    palette_png = encode(palette, "PNG", transparency=0)

    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 10:30] = (40, 60, 160, 255)  # an opaque dark-blue object, transparent around it
    rgba_png = encode(Image.fromarray(rgba, "RGBA"), "PNG")

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_jpeg = encode(Image.fromarray(_quadrant_marker()), "JPEG", quality=95, exif=exif)

    red = Image.new("RGB", (30, 30), (255, 0, 0))

    return [
        # --- must be refused, with a useful message ---
        UploadCase("zero_bytes", "empty.png", b"", "error", message_contains="empty"),
        UploadCase("random_bytes_named_png", "photo.png", rng.bytes(4096), "error"),
        UploadCase(
            "truncated_png", "cut.png", png_noise[: len(png_noise) // 2], "error", tags=("damaged",)
        ),
        UploadCase(
            "truncated_jpeg",
            "cut.jpg",
            jpeg_noise[: len(jpeg_noise) // 2],
            "error",
            message_contains="truncated",
            tags=("damaged",),
        ),
        UploadCase(
            "png_bomb_100000x100000",
            "bomb.png",
            png_declaring_size(100_000, 100_000),
            "error",
            tags=("bomb",),
        ),
        UploadCase(
            "png_declares_8000x8000",
            "big.png",
            png_declaring_size(8000, 8000),
            "error",
            message_contains="megapixel",
            tags=("bomb",),
        ),
        UploadCase(
            "oversized_file",
            "huge.png",
            b"\x89PNG\r\n\x1a\n" + bytes(DEFAULT_MAX_BYTES),
            "error",
            message_contains="limit",
        ),
        UploadCase(
            "svg",
            "drawing.svg",
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
            b'height="10"><rect width="10" height="10"/></svg>',
            "error",
            message_contains="svg",
        ),
        UploadCase(
            "html",
            "page.html",
            b"<!DOCTYPE html><html><body><img src='x.png'></body></html>",
            "error",
            message_contains="html",
        ),
        UploadCase(
            "plain_text",
            "notes.txt",
            b"just some notes\nnot an image\n",
            "error",
            message_contains="text",
        ),
        UploadCase(
            "heic_header",
            "IMG_0001.HEIC",
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
            "error",
            message_contains="heic",
        ),
        UploadCase("ico_unsupported", "favicon.ico", encode(red, "ICO"), "error"),
        UploadCase("pdf", "scan.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "error"),
        # --- must decode ---
        UploadCase(
            "animated_gif_first_frame", "anim.gif", animated_gif, "ok", check=_check_first_frame
        ),
        UploadCase(
            "png_16bit_gray",
            "depth16.png",
            encode(Image.fromarray(ramp16), "PNG"),
            "ok",
            check=_check_16bit_scaled,
            light_on_dark=False,
        ),
        UploadCase(
            "palette_png_transparency",
            "palette.png",
            palette_png,
            "ok",
            check=_check_transparent_background_dark,
        ),
        UploadCase(
            "cmyk_jpeg",
            "print.jpg",
            encode(Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG"),
            "ok",
            check=_check_cmyk,
            target_shape=(28, 28, 3),
            light_on_dark=False,
        ),
        UploadCase(
            "exif_rotated_jpeg", "rotated.jpg", rotated_jpeg, "ok", check=_check_rotated_marker
        ),
        UploadCase(
            "one_pixel",
            "dot.png",
            encode(Image.new("L", (1, 1), 200), "PNG"),
            "ok",
            check=_check_shape_only,
        ),
        UploadCase(
            "elongated_4000x3",
            "strip.png",
            encode(Image.fromarray(rng.integers(0, 256, (3, 4000), dtype=np.uint8)), "PNG"),
            "ok",
            check=_check_shape_only,
        ),
        UploadCase(
            "grayscale_png",
            "gray.png",
            encode(Image.fromarray(garment_photo(10, (220, 220, 220))[..., 0]), "PNG"),
            "ok",
            check=_check_not_inverted,
        ),
        UploadCase(
            "rgba_png", "cutout.png", rgba_png, "ok", check=_check_transparent_background_dark
        ),
        UploadCase(
            "webp",
            "photo.webp",
            encode(dark_garment, "WEBP", quality=90),
            "ok",
            check=_check_inverted,
        ),
        UploadCase("bmp", "photo.bmp", encode(dark_garment, "BMP"), "ok", check=_check_inverted),
        UploadCase("tiff", "photo.tiff", encode(dark_garment, "TIFF"), "ok", check=_check_inverted),
        UploadCase(
            "light_background_garment",
            "shop_photo.jpg",
            encode(dark_garment, "JPEG", quality=90),
            "ok",
            check=_check_inverted,
        ),
        UploadCase(
            "dark_background_garment",
            "night_photo.jpg",
            encode(light_garment, "JPEG", quality=90),
            "ok",
            check=_check_not_inverted,
        ),
        UploadCase(
            "rgb_target_keeps_colour",
            "red.png",
            encode(red, "PNG"),
            "ok",
            check=_check_rgb_colour_kept,
            target_shape=(28, 28, 3),
            light_on_dark=False,
        ),
        UploadCase(
            "jpeg_with_trailing_garbage",
            "trailing.jpg",
            encode(dark_garment, "JPEG", quality=90) + rng.bytes(300),
            "ok",
            check=_check_inverted,
        ),
    ]
