"""Decode an uploaded or on-disk image into a dataset's image format, safely and within bounds.

Two callers share this module so that they see identical pixels: the dashboard's upload widget (and
the CLI) through :func:`decode_upload` / :func:`load_image_file`, and the ImageFolder loader in
``core.data``, which decodes every training and test file with the same function. Whatever the
models are trained on, an upload of the same file becomes the same array.

The pipeline, in order:

1. bounds before any decoding: byte length (empty, too large), declared pixel count (decompression
   bombs are refused from the header, before a pixel buffer is allocated), and the file's structure
   where a decoder would otherwise work without bound: a JPEG's scans are counted (a "scan bomb"
   of 170,000 progressive scans made libjpeg walk a 36-megapixel image 170,000 times, 11 minutes
   of CPU) and its compressed data must be long enough for the size its header declares; a PNG's
   chunks are counted;
2. only PNG, JPEG, WebP, BMP, GIF and TIFF are opened (``Image.open(formats=...)``), first frame only;
3. EXIF orientation applied;
4. every mode brought to 8-bit L or RGB: palettes, 16/32-bit and float grayscale (band by band, so
   memory stays a small multiple of the 8-bit result; NaN and infinite pixels are refused), CMYK,
   YCbCr, ...; transparency composited onto a background (see :func:`_composite_transparency`);
5. to the dataset's channels, then center-crop to the target aspect and resize
   (:func:`center_crop_resize`);
6. for light-on-dark datasets (Fashion-MNIST, MNIST), inverted if the border shows a light background.

:func:`decode_upload` runs steps 1-6 in a separate worker process with a CPU-time and memory limit
(``core.decode_worker``), so a file that defeats every check above still cannot hold a core or the
server's memory: it costs at most a few seconds and is refused. :func:`decode_in_process` is the
same pipeline without that isolation (what the worker itself runs).

Every failure raises :class:`core.errors.ImageDecodeError` whose message a user can act on; no other
exception type escapes for any byte input (``tests/core/test_images.py`` fuzzes this).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from core.errors import ImageDecodeError, UnreadableFileError
from core.files import human_bytes, printable, read_regular_file

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
"""Pillow format names accepted; anything else is refused even if Pillow could read it."""

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
"""File name suffixes of the supported formats (lower case), e.g. for an upload widget's filter."""

DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000

MAX_JPEG_SCANS = 100
"""Progressive JPEGs with more scans are refused before decoding.

libjpeg's standard progressive script has 10 scans for colour and 6 for grayscale, and encoders that
tune their scans (mozjpeg) stay near that; 100 is ten times the usual. libjpeg walks every block of
the image once per scan, so the cost is scans x pixels: 100 scans of a 36-megapixel image cost about
0.7 s of CPU, where the 170,000 of a 9.5 MB "scan bomb" cost 11 minutes.
"""

# Marker segments (APPn, DQT, DHT, COM, ...) before a JPEG's end; real files have a few dozen, a
# colour profile split over APP2 segments a few hundred. 2.5 million empty COM segments in 10 MB cost
# Pillow 4 s of parsing and 230 MB; past this many the file is refused unread.
_MAX_JPEG_SEGMENTS = 2_000
# PNG chunks; a 64 MB file of libpng's 8 KB IDAT chunks has 8,000. 870,000 empty chunks in 10 MB cost
# Pillow 4.7 s of parsing.
_MAX_PNG_CHUNKS = 100_000
# Rows of a high-bit-depth image are converted this many pixels at a time: the float64 temporaries
# then stay at a few MB however large the image.
_BAND_PIXELS = 1 << 20

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

    The decoding itself runs in a worker process limited in CPU time and memory (see
    ``core.decode_worker``); where worker processes are not available it runs here.

    Args:
        data: the file's bytes (bytes, bytearray or memoryview).
        target_shape: (H, W, C) of the dataset's images, C = 1 (grayscale) or 3 (RGB).
        light_on_dark: True for datasets of light objects on a black background (Fashion-MNIST,
            MNIST): transparency is handled accordingly and a light background is inverted.
        max_bytes: refuse larger files before decoding.
        max_pixels: refuse images whose header declares more pixels (width x height). The worker's
            CPU and memory allowance grow with it.

    Returns:
        The decoded image, (H, W, C) uint8, with notes on what was done.

    Raises:
        ImageDecodeError: for every input that cannot be turned into an image, with a message a
            user can act on.
        ValueError: if ``target_shape`` itself is invalid (a programming error, not an input one).
    """
    from core import decode_worker

    shape = _check_target_shape(target_shape)
    data = _check_data(data, max_bytes)
    return decode_worker.decode(
        data, target_shape=shape, light_on_dark=bool(light_on_dark), max_pixels=int(max_pixels)
    )


def decode_uploads(
    files: Sequence[bytes],
    *,
    target_shape: tuple[int, int, int],
    light_on_dark: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[DecodedImage | ImageDecodeError]:
    """:func:`decode_upload` for many files at once (a dataset folder): same pixels, same limits.

    The files go to a decoding worker together, each still within its own CPU-time and memory
    budget; batching saves a round trip to the worker per file.

    Returns:
        For each file, in order, its decoded image or the :class:`ImageDecodeError` refusing it.
    """
    from core import decode_worker

    shape = _check_target_shape(target_shape)
    results: list[DecodedImage | ImageDecodeError | None] = []
    checked: list[bytes] = []
    for data in files:
        try:
            checked.append(_check_data(data, max_bytes))
            results.append(None)
        except ImageDecodeError as exc:
            results.append(exc)
    decoded = iter(
        decode_worker.decode_many(
            checked, target_shape=shape, light_on_dark=bool(light_on_dark), max_pixels=max_pixels
        )
    )
    return [result if result is not None else next(decoded) for result in results]


def decode_in_process(
    data: bytes,
    *,
    target_shape: tuple[int, int, int],
    light_on_dark: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """:func:`decode_upload` in this process, without a CPU-time or memory limit.

    What the decoding worker runs. Every check of the pipeline applies; only the hard limits of the
    separate process are missing, so prefer :func:`decode_upload` for anything a user supplied.
    """
    height, width, channels = _check_target_shape(target_shape)
    data = _check_data(data, max_bytes)
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
    roots: Sequence[Path] | None = None,
) -> DecodedImage:
    """Read an image file from disk and decode it exactly as :func:`decode_upload` would.

    Args:
        path: the image file.
        target_shape: (H, W, C) of the dataset's images.
        light_on_dark: as in :func:`decode_upload`.
        max_bytes: refuse larger files (at most this many bytes are read).
        max_pixels: refuse images declaring more pixels.
        roots: if given, resolved directories the file must lie in (see
            :func:`core.files.open_regular_file`).

    Returns:
        The decoded image, (H, W, C) uint8.

    Raises:
        ImageDecodeError: the file cannot be read or decoded; the message names the file.
    """
    shown = printable(path)
    data = read_bounded(Path(path), max_bytes, roots=roots, shown=shown)
    try:
        return decode_upload(
            data,
            target_shape=target_shape,
            light_on_dark=light_on_dark,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
        )
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{shown}: {exc}") from exc


def read_bounded(
    path: Path,
    max_bytes: int,
    *,
    roots: Sequence[Path] | None = None,
    shown: str | None = None,
) -> bytes:
    """Read at most ``max_bytes`` bytes of a regular file, refusing larger files without reading them.

    The file is opened by :func:`core.files.open_regular_file`: a FIFO, device or socket is refused
    without blocking, and with ``roots`` a path leading outside them is refused unread.

    Args:
        path: the file.
        max_bytes: the size limit.
        roots: resolved directories the file must lie in, or ``None``.
        shown: how messages name the file (default: the path, made printable).

    Returns:
        The file's bytes.

    Raises:
        ImageDecodeError: missing, unreadable, not a regular file, outside ``roots``, or larger
            than ``max_bytes``.
    """
    try:
        return read_regular_file(
            path,
            max_bytes,
            roots=roots,
            shown=shown,
            too_large_hint=" Use a smaller image, or save it at a lower resolution or as JPEG.",
        )
    except UnreadableFileError as exc:
        raise ImageDecodeError(str(exc)) from None


# --- the pipeline -------------------------------------------------------------------------------


def _check_data(data: bytes, max_bytes: int) -> bytes:
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
            f"The file is {human_bytes(len(data))}, more than the {human_bytes(max_bytes)} limit. "
            "Choose a smaller image, or save this one at a lower resolution or as JPEG."
        )
    return data


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
    jpeg_end = _check_structure(data)
    img, fmt = _open_supported(data, max_pixels)
    original_size = img.size
    original_mode = img.mode
    _note_extra_frames(img, fmt, notes)
    draft = _draft_large_jpeg(img, height, width, notes)
    # load() is where pixels are decoded; truncated or corrupt data fails here. Pillow only lets
    # truncated files through if ImageFile.LOAD_TRUNCATED_IMAGES is set, which we never do.
    img.load()
    if fmt == "JPEG" and jpeg_end is not None:
        _check_jpeg_complete(img, data, jpeg_end, draft)
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


# --- structure checks: refuse files built to make a decoder work without bound ------------------

# SOFn markers (frame headers); C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
# Bytes that decode to non-zero coefficients where a cut-short JPEG's data is missing (no 0xFF, so
# no marker): see _check_jpeg_complete.
_JPEG_FILLER = (
    hashlib.shake_256(b"influence-explorer/jpeg-filler").digest(4096).replace(b"\xff", b"\x55")
)
# Where a scan's entropy-coded data ends: a 0xFF that is not stuffing (FF 00), a restart marker
# (FF D0-D7, which stays inside the scan) or fill before another 0xFF.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class _JpegFrame:
    marker: int
    width: int
    height: int
    # component id -> number of 8x8 blocks it has (its own, non-interleaved count)
    blocks: dict[int, int]


def _check_structure(data: bytes) -> int | None:
    """Structure checks before opening; returns where a JPEG's first EOI marker starts, if found."""
    if data.startswith(b"\xff\xd8\xff"):
        return _check_jpeg_structure(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png_structure(data)
    return None


def _check_jpeg_structure(data: bytes) -> int | None:
    """Walk a JPEG's marker segments by their lengths, up to its first EOI, before decoding.

    Refuses more than :data:`MAX_JPEG_SCANS` scans or ``_MAX_JPEG_SEGMENTS`` segments, and a scan
    whose compressed data is shorter than the size the header declares allows (a patched size, or
    data cut short before an EOI: libjpeg would fill the rest with grey and call it a success).
    Segments are skipped by their length field, so a JPEG embedded in EXIF (the thumbnail) is not
    mistaken for scans of this one. Anything this walk cannot follow is left to Pillow's decoder,
    which refuses damaged files itself.

    Returns:
        The offset of the first EOI marker (FF D9), or None if the walk did not reach one.
    """
    pos, end = 2, len(data)
    scans = segments = 0
    frame: _JpegFrame | None = None
    # Shortest Huffman code length of each DC / AC table: the fewest bits any block can take.
    dc_min: dict[int, int] = {}
    ac_min: dict[int, int] = {}
    while pos < end and data[pos] == 0xFF:
        while pos < end and data[pos] == 0xFF:
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI: the end of the first picture; an MPO's others are never decoded
            return pos - 2
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > end:
            return None
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            return None
        body = data[pos + 2 : pos + length]
        pos += length
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            raise ImageDecodeError(
                f"The JPEG has more than {_MAX_JPEG_SEGMENTS:,} marker segments; ordinary photos "
                "have a few dozen. It was refused unread, since parsing them all would keep the "
                "server busy. Save the image again from an image editor."
            )
        if marker in _JPEG_SOF and frame is None:
            frame = _parse_jpeg_frame(marker, body)
        elif marker == 0xC4:
            _parse_jpeg_huffman_tables(body, dc_min, ac_min)
        elif marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageDecodeError(
                    f"The JPEG has more than {MAX_JPEG_SCANS} scans (progressive passes); "
                    "ordinary progressive JPEGs have about 10. Each scan makes the decoder go over "
                    "the whole image again, so this file would keep the server busy for minutes "
                    "and was refused. Save the image again (as baseline JPEG or PNG)."
                )
            found = _JPEG_NEXT_MARKER.search(data, pos)
            scan_end = found.start() if found else end
            if frame is not None:
                _check_scan_length(frame, body, scan_end - pos, dc_min, ac_min)
            pos = scan_end
    return None


def _parse_jpeg_frame(marker: int, body: bytes) -> _JpegFrame | None:
    if len(body) < 6:
        return None
    height = int.from_bytes(body[1:3], "big")
    width = int.from_bytes(body[3:5], "big")
    count = body[5]
    if len(body) < 6 + 3 * count or count == 0:
        return None
    sampling = [(body[6 + 3 * i], body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count)]
    h_max = max(h for _, h, _ in sampling)
    v_max = max(v for _, _, v in sampling)
    if h_max == 0 or v_max == 0:
        return None
    blocks = {
        component: math.ceil(math.ceil(width * h / h_max) / 8)
        * math.ceil(math.ceil(height * v / v_max) / 8)
        for component, h, v in sampling
    }
    return _JpegFrame(marker=marker, width=width, height=height, blocks=blocks)


def _parse_jpeg_huffman_tables(body: bytes, dc_min: dict[int, int], ac_min: dict[int, int]) -> None:
    pos = 0
    while pos + 17 <= len(body):
        table_class, table_id = body[pos] >> 4, body[pos] & 15
        counts = body[pos + 1 : pos + 17]
        shortest = next((i + 1 for i, count in enumerate(counts) if count), None)
        if shortest is not None:
            (dc_min if table_class == 0 else ac_min)[table_id] = shortest
        pos += 17 + sum(counts)


def _check_scan_length(
    frame: _JpegFrame, body: bytes, data_bytes: int, dc_min: dict[int, int], ac_min: dict[int, int]
) -> None:
    """Refuse a scan whose entropy-coded data is too short for the blocks it must code.

    A lower bound only, so no valid file is refused: in a sequential Huffman scan every block
    codes a DC difference and at least an end-of-block, each no shorter than its table's shortest
    code; in a progressive one a first DC scan codes a DC difference per block and a DC refinement
    one bit per block. AC scans of progressive files can code thousands of empty blocks in a few
    bits (end-of-band runs), and arithmetic coding has no per-block minimum; they are not bounded.
    A table not defined yet counts as 1 bit (libjpeg's defaults are longer).
    """
    if frame.height == 0 or not body:
        return  # height given by a DNL marker later, which libjpeg refuses anyway
    count = body[0]
    if len(body) < 1 + 2 * count + 3:
        return
    spectral_start, successive_high = body[1 + 2 * count], body[3 + 2 * count] >> 4
    needed_bits = 0
    for i in range(count):
        component, tables = body[1 + 2 * i], body[2 + 2 * i]
        dc_bits = dc_min.get(tables >> 4, 1)
        if frame.marker in (0xC0, 0xC1):
            per_block = dc_bits + ac_min.get(tables & 15, 1)
        elif frame.marker == 0xC2 and spectral_start == 0:
            per_block = dc_bits if successive_high == 0 else 1
        else:
            return
        needed_bits += frame.blocks.get(component, 0) * per_block
    if data_bytes * 8 < needed_bits:
        raise ImageDecodeError(
            f"The JPEG declares {frame.width}×{frame.height} pixels but holds too little image "
            f"data for that ({human_bytes(data_bytes)} where at least "
            f"{human_bytes(math.ceil(needed_bits / 8))} are needed): its size was altered or its "
            "data is cut short, and decoding it would only show grey. Save or download it again."
        )


def _check_jpeg_complete(
    img: Image.Image, data: bytes, eoi: int, draft: tuple[int, int] | None
) -> None:
    """Refuse a JPEG whose image data ends before its last block, which libjpeg shows as grey.

    When the compressed data runs out early (a file cut short, then closed with an EOI marker;
    or a header patched to a larger size), libjpeg warns, leaves the missing blocks' coefficients
    at zero and reports success; Pillow cannot see the warning. Zero coefficients decode to
    exactly 128 in every channel, so only a file whose last pixels are exactly 128 can be
    affected; for those (rare in photos) the file is decoded again with filler bytes before its
    EOI. A complete file never reaches the filler (libjpeg skips bytes after its last block), so
    both decodes agree; a cut-short one decodes the filler into the missing blocks, and they
    differ.
    """
    width, height = img.size
    tail = np.asarray(img.crop((max(0, width - 8), height - 1, width, height)))
    if not np.all(tail == 128):
        return
    padded = Image.open(io.BytesIO(data[:eoi] + _JPEG_FILLER + b"\xff\xd9"), formats=["JPEG"])
    if draft is not None:
        padded.draft(None, draft)
    padded.load()
    if padded.size != img.size or padded.mode != img.mode or padded.tobytes() != img.tobytes():
        raise ImageDecodeError(
            "The JPEG's image data ends before the image does (the file was cut short, or its "
            "size was altered), so part of it would only show as grey. Save or download it again."
        )


def _check_png_structure(data: bytes) -> None:
    """Count a PNG's chunks by their lengths, up to IEND, before Pillow parses each in Python."""
    pos, end, chunks = 8, len(data), 0
    while pos + 8 <= end:
        chunks += 1
        if chunks > _MAX_PNG_CHUNKS:
            raise ImageDecodeError(
                f"The PNG has more than {_MAX_PNG_CHUNKS:,} chunks; ordinary files have a few "
                "dozen to a few thousand. It was refused unread, since parsing them all would keep "
                "the server busy. Save the image again from an image editor."
            )
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")


def _note_extra_frames(img: Image.Image, fmt: str, notes: list[str]) -> None:
    if img.format == "MPO":
        notes.append("first picture of a multi-picture JPEG (MPO)")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        return
    if fmt in ("GIF", "TIFF"):
        # Counting frames walks every one of them: 95,000 chained TIFF pages in 9.7 MB took 100 s
        # of CPU. Whether there is a second is all the note needs (Pillow looks at one more).
        if getattr(img, "is_animated", False):
            notes.append(
                "first frame of an animated GIF"
                if fmt == "GIF"
                else "first page of a multi-page TIFF"
            )
            img.seek(0)
        return
    # PNG (acTL chunk) and WebP (ANIM header) state their frame count; reading it costs nothing.
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1:
        what = {"PNG": "an animated PNG", "WEBP": "an animated WebP"}
        notes.append(f"first frame of {what.get(fmt, 'a multi-frame file')} ({n_frames} frames)")
        img.seek(0)


def _draft_large_jpeg(
    img: Image.Image, height: int, width: int, notes: list[str]
) -> tuple[int, int] | None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale when the target is far smaller.

    DCT-domain scaling is several times faster than decoding full size and then shrinking (a 20 MP
    photo: ~0.1 s instead of ~0.7 s), which matters for ImageFolder datasets of camera photos. The
    scale is chosen so the crop stays at least 3x the target in both directions, the same margin as
    ``reducing_gap=3`` in :func:`center_crop_resize`, so the result is visually the same.

    Returns:
        The size requested from ``draft``, or None if the JPEG is decoded at full size.
    """
    if img.format not in ("JPEG", "MPO"):
        return None
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
        return None
    requested = (math.ceil(src_w * scale), math.ceil(src_h * scale))
    img.draft(None, requested)
    if img.size != (src_w, src_h):
        notes.append(f"JPEG decoded at reduced scale ({img.size[0]}×{img.size[1]}) for speed")
    return requested


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
    """Map 16/32-bit integer or float grayscale onto 0..255 by scaling, not clipping.

    Works band by band (:func:`_bands`) into one uint8 result: converting the whole image at once
    made several full-size int64/float64 copies, 1.4 GB for a 40-megapixel 16-bit PNG of 87 KB.
    The arithmetic per pixel is unchanged, so the result is identical.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        # A 16-bit sample: 65535 / 257 = 255 exactly.
        notes.append("16-bit grayscale scaled to 8 bits")
        return _map_bands(img, lambda values: values / 257.0)
    lo, hi = _extrema(img)
    if mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            notes.append("floating-point grayscale (0..1) scaled to 8 bits")
            return _map_bands(img, lambda values: values * 255.0)
        notes.append("floating-point grayscale stretched to 8 bits")
        return _map_bands(img, lambda values: _stretch(values, lo, hi))
    if lo >= 0 and 255 < hi <= 65535:
        notes.append("16-bit grayscale scaled to 8 bits")
        return _map_bands(img, lambda values: values / 257.0)
    if lo >= 0 and hi <= 255:
        # 32-bit container holding 8-bit values (some TIFF writers); keep them as they are.
        return _map_bands(img, lambda values: values)
    notes.append("32-bit grayscale stretched to 8 bits")
    return _map_bands(img, lambda values: _stretch(values, lo, hi))


def _bands(img: Image.Image) -> Iterator[tuple[int, int, np.ndarray]]:
    """(top, bottom, pixels of rows top..bottom) of about ``_BAND_PIXELS`` pixels each."""
    width, height = img.size
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        yield top, bottom, np.asarray(img.crop((0, top, width, bottom)))


def _extrema(img: Image.Image) -> tuple[float, float]:
    """Smallest and largest sample; NaN or infinite samples are refused."""
    lo, hi = math.inf, -math.inf
    non_finite = 0
    for _, _, values in _bands(img):
        if values.dtype.kind == "f":
            finite = np.isfinite(values)
            if not finite.all():
                non_finite += int(values.size - np.count_nonzero(finite))
                continue
        lo, hi = min(lo, values.min().item()), max(hi, values.max().item())
    if non_finite:
        width, height = img.size
        raise ImageDecodeError(
            f"The image holds {non_finite:,} NaN or infinite pixel values (of {width * height:,}); "
            "they have no brightness that can be shown. Replace them with numbers (e.g. 0) and "
            "save the image again."
        )
    return lo, hi


def _map_bands(img: Image.Image, scale: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    width, height = img.size
    gray = np.empty((height, width), dtype=np.uint8)
    for top, bottom, values in _bands(img):
        scaled = scale(values.astype(np.float64))
        gray[top:bottom] = np.clip(np.rint(scaled), 0, 255)
    return Image.fromarray(gray)


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
    # convert() copies even to the same mode; 160 MB saved on a 40-megapixel RGBA image.
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return rgba.convert("L" if gray_source else "RGB")

    background = (255, 255, 255)
    if light_on_dark:
        # Alpha-weighted mean luminance, summed in integers band by band: the same value as in
        # float64 over the whole image (every partial sum is an integer below 2**53), without two
        # full-size float64 copies (640 MB for 40 megapixels).
        luminance = rgba.convert("L")
        weight = weighted = 0
        for (_, _, lum), (_, _, a) in zip(_bands(luminance), _bands(alpha), strict=True):
            a = a.astype(np.uint64)
            weight += int(a.sum())
            weighted += int((lum.astype(np.uint64) * a).sum())
        object_luminance = weighted / weight if weight > 0 else 0.0
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
