"""Decode an uploaded or on-disk image into a dataset's image format, safely and within bounds.

Two callers share this module so that they see identical pixels: the dashboard's upload widget (and
the CLI) through :func:`decode_upload` / :func:`load_image_file`, and the ImageFolder loader in
``core.data``, which decodes every training and test file with the same function. Whatever the
models are trained on, an upload of the same file becomes the same array.

The pipeline, in order:

1. bounds before any decoding: byte length (empty, too large), declared pixel count (decompression
   bombs are refused from the header, before a pixel buffer is allocated);
2. only PNG, JPEG, WebP, BMP, GIF and TIFF are opened (``Image.open(formats=...)``), first frame only;
3. EXIF orientation applied;
4. every mode brought to 8-bit L or RGB: palettes, 16/32-bit and float grayscale, CMYK, YCbCr, ...;
   transparency composited onto a background (see :func:`_composite_transparency` for which);
5. to the dataset's channels, then center-crop to the target aspect and resize
   (:func:`center_crop_resize`);
6. for light-on-dark datasets (Fashion-MNIST, MNIST), inverted if the border shows a light background.

Every failure raises :class:`core.errors.ImageDecodeError` whose message a user can act on; no other
exception type escapes for any byte input (``tests/core/test_images.py`` fuzzes this).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from core.errors import ImageDecodeError

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
"""Pillow format names accepted; anything else is refused even if Pillow could read it."""

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
"""File name suffixes of the supported formats (lower case), e.g. for an upload widget's filter."""

DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000

# Pillow opens multi-picture JPEGs (most phone and many camera photos) as "MPO"; they are JPEGs and
# their first picture is the photo.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_FORMATS_FOR_PEOPLE = "PNG, JPEG, WebP, BMP, GIF or TIFF"

# Modes whose samples are wider than 8 bits; Pillow's own convert("L") clips them instead of
# scaling, which turns a typical 16-bit image white.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
GRAYSCALE_MODES: frozenset[str] = frozenset({"1", "L", "LA", "La"} | _HIGH_BIT_DEPTH_MODES)
"""Pillow modes that carry no colour; the ImageFolder loader keeps one channel if all files are."""

# Light-background detection for light-on-dark datasets, on the 0..255 luminance of the resized
# image. A border at least this light is a light background whatever the centre holds ...
_LIGHT_BORDER = 160
# ... a border at most this light is a dark one; in between, the border must be lighter than the
# centre (a dark garment on a mid-grey backdrop is still a light background for our purpose).
_DARK_BORDER = 96


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An image brought into a dataset's format, and what was done to get there.

    Attributes:
        image: (H, W, C) uint8, read-only: exactly the pixels the models see.
        original_size: (width, height) of the decoded frame before any change, as Pillow reports it.
        original_mode: Pillow mode of the file, e.g. "RGB", "P", "I;16", "CMYK".
        format: "PNG", "JPEG", "WEBP", "BMP", "GIF" or "TIFF".
        notes: what was done, in order, e.g. "EXIF rotation applied", "inverted to light-on-dark".
    """

    image: np.ndarray
    original_size: tuple[int, int]
    original_mode: str
    format: str
    notes: tuple[str, ...]


def center_crop_resize(img: Image.Image, height: int, width: int) -> Image.Image:
    """Center-crop ``img`` to the aspect ratio of (height, width), then resize to exactly that.

    Cropping instead of padding keeps the object's scale comparable across images of different
    aspect; the crop box is passed to ``resize`` in sub-pixel coordinates, so no rounding shifts the
    centre. Shrinking uses LANCZOS (Pillow widens the kernel with the scale factor, which is the
    antialiasing); enlarging uses BILINEAR, which does not ring around edges of tiny inputs.

    Args:
        img: an 8-bit "L" or "RGB" image of any size.
        height: target height in pixels.
        width: target width in pixels.

    Returns:
        A new image of size (width, height) in the same mode.
    """
    src_w, src_h = img.size
    target_aspect = width / height
    if src_w / src_h > target_aspect:
        crop_w = src_h * target_aspect
        left = (src_w - crop_w) / 2
        box = (left, 0.0, left + crop_w, float(src_h))
    else:
        crop_h = src_w / target_aspect
        top = (src_h - crop_h) / 2
        box = (0.0, top, float(src_w), top + crop_h)
    shrinking = (box[2] - box[0]) > width or (box[3] - box[1]) > height
    if shrinking:
        # reducing_gap=3 first box-reduces by an integer factor when the image is >= 3x the target:
        # far faster on camera photos and, per Pillow's docs, indistinguishable from a full LANCZOS.
        return img.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return img.resize((width, height), Image.Resampling.BILINEAR, box=box)


def decode_upload(
    data: bytes,
    *,
    target_shape: tuple[int, int, int],
    light_on_dark: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode the bytes of an image file into a dataset's image format.

    Args:
        data: the file's bytes (bytes, bytearray or memoryview).
        target_shape: (H, W, C) of the dataset's images, C = 1 (grayscale) or 3 (RGB).
        light_on_dark: True for datasets of light objects on a black background (Fashion-MNIST,
            MNIST): transparency is handled accordingly and a light background is inverted.
        max_bytes: refuse larger files before decoding.
        max_pixels: refuse images whose header declares more pixels (width x height).

    Returns:
        The decoded image, (H, W, C) uint8, with notes on what was done.

    Raises:
        ImageDecodeError: for every input that cannot be turned into an image, with a message a
            user can act on.
        ValueError: if ``target_shape`` itself is invalid (a programming error, not an input one).
    """
    height, width, channels = _check_target_shape(target_shape)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(
            f"Expected the bytes of an image file, got {type(data).__name__}. "
            f"Choose a {_FORMATS_FOR_PEOPLE} image."
        )
    data = bytes(data)
    if len(data) == 0:
        raise ImageDecodeError(
            f"The file is empty (0 bytes). Choose a {_FORMATS_FOR_PEOPLE} image."
        )
    if len(data) > max_bytes:
        raise ImageDecodeError(
            f"The file is {_human_bytes(len(data))}, more than the {_human_bytes(max_bytes)} limit. "
            "Choose a smaller image, or save this one at a lower resolution or as JPEG."
        )
    notes: list[str] = []
    try:
        return _decode(
            data,
            height=height,
            width=width,
            channels=channels,
            light_on_dark=light_on_dark,
            max_pixels=max_pixels,
            notes=notes,
        )
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (header-declared size above ~179 megapixels, or a warning turned into
        # an error by the caller's warning filters); our max_pixels check usually fires first.
        raise ImageDecodeError(
            "The image declares an enormous size (a 'decompression bomb') and was refused "
            f"unread. Choose an image of at most {max_pixels / 1e6:.0f} megapixels."
        ) from exc
    except Exception as exc:
        # Pillow's decoders signal damaged input with many exception types (OSError, SyntaxError,
        # ValueError, struct.error, IndexError, EOFError, MemoryError, ...); to a user they all
        # mean "this file is damaged", and the contract is that only ImageDecodeError escapes.
        raise ImageDecodeError(_describe_decode_failure(exc)) from exc


def load_image_file(
    path: str | PathLike[str],
    *,
    target_shape: tuple[int, int, int],
    light_on_dark: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Read an image file from disk and decode it exactly as :func:`decode_upload` would.

    Args:
        path: the image file.
        target_shape: (H, W, C) of the dataset's images.
        light_on_dark: as in :func:`decode_upload`.
        max_bytes: refuse larger files (at most this many bytes are read).
        max_pixels: refuse images declaring more pixels.

    Returns:
        The decoded image, (H, W, C) uint8.

    Raises:
        ImageDecodeError: the file cannot be read or decoded; the message names the file.
    """
    file_path = Path(path)
    data = read_bounded(file_path, max_bytes)
    try:
        return decode_upload(
            data,
            target_shape=target_shape,
            light_on_dark=light_on_dark,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
        )
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{file_path}: {exc}") from exc


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` bytes of a file, refusing larger files without reading them whole.

    Args:
        path: the file.
        max_bytes: the size limit.

    Returns:
        The file's bytes.

    Raises:
        ImageDecodeError: missing, unreadable, a directory, or larger than ``max_bytes``.
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageDecodeError(f"No file at {path}. Check the path.") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path} is a directory, not an image file.") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path} could not be read: {exc.strerror or exc}.") from exc
    if len(data) > max_bytes:
        raise ImageDecodeError(
            f"{path} is larger than the {_human_bytes(max_bytes)} limit. "
            "Use a smaller image, or save it at a lower resolution or as JPEG."
        )
    return data


# --- the pipeline -------------------------------------------------------------------------------


def _decode(
    data: bytes,
    *,
    height: int,
    width: int,
    channels: int,
    light_on_dark: bool,
    max_pixels: int,
    notes: list[str],
) -> DecodedImage:
    img, fmt = _open_supported(data, max_pixels)
    original_size = img.size
    original_mode = img.mode
    _note_extra_frames(img, fmt, notes)
    _draft_large_jpeg(img, height, width, notes)
    # load() is where pixels are decoded; truncated or corrupt data fails here. Pillow only lets
    # truncated files through if ImageFile.LOAD_TRUNCATED_IMAGES is set, which we never do.
    img.load()
    img = _apply_exif_orientation(img, notes)
    img = _to_8bit(img, notes)
    if img.mode in ("RGBA", "LA"):
        img = _composite_transparency(img, light_on_dark, notes)

    if channels == 1 and img.mode != "L":
        img = img.convert("L")
        notes.append("converted colour to grayscale")
    elif channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
        notes.append("grayscale copied to three channels")

    if img.size != (width, height):
        src_w, src_h = img.size
        cropped = "center-cropped and " if src_w * height != src_h * width else ""
        notes.append(f"{cropped}resized from {src_w}×{src_h} to {width}×{height}")
        img = center_crop_resize(img, height, width)

    pixels = np.asarray(img, dtype=np.uint8).reshape(height, width, channels).copy()
    if light_on_dark and _has_light_background(pixels):
        pixels = 255 - pixels
        notes.append("inverted to light-on-dark (the background was light)")
    pixels.setflags(write=False)
    return DecodedImage(
        image=pixels,
        original_size=(int(original_size[0]), int(original_size[1])),
        original_mode=original_mode,
        format=fmt,
        notes=tuple(notes),
    )


def _open_supported(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Open (header only) with the supported formats, and refuse oversized declarations."""
    try:
        img = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except UnidentifiedImageError:
        raise ImageDecodeError(_describe_unidentified(data)) from None
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
    if fmt not in SUPPORTED_FORMATS:
        raise ImageDecodeError(
            f"Images in {img.format or 'this'} format are not supported. "
            f"Choose a {_FORMATS_FOR_PEOPLE} image."
        )
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"The image declares a size of {w}×{h} pixels, which is empty.")
    # Checked on the header's declared size, before load() allocates anything.
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"The image is {w}×{h} pixels ({w * h / 1e6:,.0f} megapixels), more than the "
            f"{max_pixels / 1e6:,.0f} megapixel limit. Choose a smaller image or scale this one down."
        )
    return img, fmt


def _note_extra_frames(img: Image.Image, fmt: str, notes: list[str]) -> None:
    n_frames = getattr(img, "n_frames", 1)
    if img.format == "MPO":
        notes.append("first picture of a multi-picture JPEG (MPO)")
    elif n_frames > 1:
        what = {"GIF": "an animated GIF", "PNG": "an animated PNG", "WEBP": "an animated WebP"}
        described = what.get(
            fmt, f"a {n_frames}-page TIFF" if fmt == "TIFF" else "a multi-frame file"
        )
        notes.append(f"first frame of {described} ({n_frames} frames)")
    # Counting frames may have moved the file position; decode the first frame.
    if n_frames > 1:
        img.seek(0)


def _draft_large_jpeg(img: Image.Image, height: int, width: int, notes: list[str]) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale when the target is far smaller.

    DCT-domain scaling is several times faster than decoding full size and then shrinking (a 20 MP
    photo: ~0.1 s instead of ~0.7 s), which matters for ImageFolder datasets of camera photos. The
    scale is chosen so the crop stays at least 3x the target in both directions, the same margin as
    ``reducing_gap=3`` in :func:`center_crop_resize`, so the result is visually the same.
    """
    if img.format not in ("JPEG", "MPO"):
        return
    src_w, src_h = img.size
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        orientation = 1
    if orientation in (5, 6, 7, 8):
        # The target is given in display orientation; the draft applies to the stored one.
        height, width = width, height
    aspect = width / height
    crop_w, crop_h = (src_h * aspect, src_h) if src_w / src_h > aspect else (src_w, src_w / aspect)
    scale = max(3 * width / crop_w, 3 * height / crop_h)
    if scale > 0.5:
        return
    requested = (math.ceil(src_w * scale), math.ceil(src_h * scale))
    img.draft(None, requested)
    if img.size != (src_w, src_h):
        notes.append(f"JPEG decoded at reduced scale ({img.size[0]}×{img.size[1]}) for speed")


def _apply_exif_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        # A damaged EXIF block should not cost the user a perfectly good image.
        notes.append("EXIF data unreadable; orientation left as stored")
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:
        notes.append("EXIF orientation unreadable; orientation left as stored")
        return img
    notes.append(f"EXIF rotation applied (orientation {orientation})")
    return transposed


def _to_8bit(img: Image.Image, notes: list[str]) -> Image.Image:
    """Bring any mode to 8-bit "L", "RGB", "LA" or "RGBA"."""
    mode = img.mode
    if mode in ("L", "RGB", "LA", "RGBA"):
        return img
    if mode in _HIGH_BIT_DEPTH_MODES:
        return _scale_high_bit_depth(img, notes)
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        # Converting straight to RGBA keeps the palette's transparency; via RGB it would be lost.
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode in ("RGBa", "La"):
        # Premultiplied alpha: un-premultiply so the composite below sees true colours.
        return img.convert("RGBA" if mode == "RGBa" else "LA")
    if mode == "CMYK":
        notes.append("converted CMYK to RGB")
        return img.convert("RGB")
    converted = img.convert("RGB")
    notes.append(f"converted {mode} to RGB")
    return converted


def _scale_high_bit_depth(img: Image.Image, notes: list[str]) -> Image.Image:
    """Map 16/32-bit integer or float grayscale onto 0..255 by scaling, not clipping."""
    mode = img.mode
    values = np.asarray(img)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
            notes.append("floating-point grayscale (0..1) scaled to 8 bits")
        else:
            scaled = _stretch(values, lo, hi)
            notes.append("floating-point grayscale stretched to 8 bits")
    else:
        values = values.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
            # A 16-bit sample: 65535 / 257 = 255 exactly.
            scaled = values / 257.0
            notes.append("16-bit grayscale scaled to 8 bits")
        elif lo >= 0 and hi <= 255:
            # 32-bit container holding 8-bit values (some TIFF writers); keep them as they are.
            scaled = values.astype(np.float64)
        else:
            scaled = _stretch(values.astype(np.float64), lo, hi)
            notes.append("32-bit grayscale stretched to 8 bits")
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L")


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) * (255.0 / (hi - lo))


def _composite_transparency(img: Image.Image, light_on_dark: bool, notes: list[str]) -> Image.Image:
    """Flatten an "RGBA"/"LA" image onto the background the dataset's convention calls for.

    Datasets of photos (light_on_dark=False): white, the backdrop of product shots and documents,
    and what a browser shows behind a transparent image.

    Light-on-dark datasets: the goal is a light object on black, and Fashion-MNIST itself was made
    from product photos on white by negating them. So a dark or coloured object (the usual cutout
    of a garment) goes onto white and the light-background check below then negates it, exactly as
    a photo of the same garment on white would be processed. A light object (a white shirt, or a
    drawing already in the dataset's convention) goes straight onto black: negating it would leave
    a dark object on black that neither a person nor the model can see.
    """
    gray_source = img.mode == "LA"
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    if alpha.min() == 255:
        return rgba.convert("L" if gray_source else "RGB")

    background = (255, 255, 255)
    if light_on_dark:
        luminance = np.asarray(rgba.convert("L"), dtype=np.float64)
        weight = alpha.sum()
        object_luminance = (luminance * alpha).sum() / weight if weight > 0 else 0.0
        if object_luminance >= 128:
            background = (0, 0, 0)
    flattened = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    colour = "black" if background == (0, 0, 0) else "white"
    notes.append(f"transparent areas filled with {colour}")
    return flattened.convert("L" if gray_source else "RGB")


def _has_light_background(pixels: np.ndarray) -> bool:
    """Whether a (H, W, C) uint8 image shows a light background, judged by its border strip."""
    luminance = pixels.astype(np.float64).mean(axis=2)
    h, w = luminance.shape
    strip = max(1, min(h, w) // 10)
    border = np.ones((h, w), dtype=bool)
    border[strip : h - strip, strip : w - strip] = False
    border_mean = float(luminance[border].mean())
    centre = luminance[h // 4 : h - h // 4, w // 4 : w - w // 4]
    centre_mean = float(centre.mean()) if centre.size else border_mean
    if border_mean >= _LIGHT_BORDER:
        return True
    if border_mean <= _DARK_BORDER:
        return False
    return border_mean > centre_mean


# --- messages -----------------------------------------------------------------------------------


def _check_target_shape(target_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        height, width, channels = (int(v) for v in target_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"target_shape must be (height, width, channels), got {target_shape!r}."
        ) from None
    if height < 1 or width < 1 or channels not in (1, 3):
        raise ValueError(
            f"target_shape must be (height, width, channels) with positive sizes and 1 or 3 "
            f"channels, got {target_shape!r}."
        )
    return height, width, channels


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 1024:.0f} KB"
    return f"{n / 2**20:.1f} MB"


def _describe_unidentified(data: bytes) -> str:
    """Say what a file that no supported decoder recognises probably is."""
    head = data[:2048]
    lowered = head.lower()
    stripped = lowered.lstrip(b"\xef\xbb\xbf \t\r\n")
    choose = f"Choose a {_FORMATS_FOR_PEOPLE} image."
    if b"<svg" in lowered:
        return (
            "This is an SVG drawing (vector graphics), not a pixel image. "
            f"Export it as PNG first, or {choose[0].lower()}{choose[1:]}"
        )
    if stripped.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered:
        return (
            "This is a web page (HTML), not an image. Save the image itself "
            f"(right-click it, 'Save image as'). {choose}"
        )
    if head.startswith(b"%PDF"):
        return f"This is a PDF document, not an image. {choose}"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
            return (
                "This is a HEIC/HEIF photo (the iPhone default), which is not supported. "
                "Export it as JPEG (on iPhone: Settings > Camera > Formats > Most Compatible)."
            )
        if brand in (b"avif", b"avis"):
            return f"AVIF images are not supported. {choose}"
        return f"This looks like a video or ISO media file, not an image. {choose}"
    if head.startswith(b"\x00\x00\x01\x00"):
        return f"Icon (.ico) files are not supported. {choose}"
    if head.startswith(b"8BPS"):
        return f"Photoshop (.psd) files are not supported; export a flattened PNG. {choose}"
    if _looks_like_text(head):
        return f"This is a text file, not an image. {choose}"
    return (
        f"This file is not an image that can be read here: it is not a valid {_FORMATS_FOR_PEOPLE} "
        "file, or it is damaged. If it opens elsewhere, save it again as PNG or JPEG."
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may have been cut at the end of the sample.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    if not text:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable / len(text) > 0.95


def _describe_decode_failure(exc: BaseException) -> str:
    detail = f"{type(exc).__name__}: {exc}"
    if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
        return (
            "The image file is incomplete (truncated): the upload or download was probably cut "
            f"off. Save or download it again. (Details: {detail})"
        )
    if isinstance(exc, MemoryError):
        return "The image needs more memory to decode than is available. Choose a smaller image."
    return (
        "The image file is damaged or uses a variant that cannot be read here. "
        f"If it opens elsewhere, save it again as PNG or JPEG. (Details: {detail})"
    )
