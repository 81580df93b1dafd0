"""Decoding an uploaded file into a dataset's image format: an image or a message, never an error.

The file name is shown, never trusted; the bytes are read with a bound; the decoder sniffs the
content (core.images), so a name's suffix decides nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO

import numpy as np

from core.errors import ImageDecodeError
from core.images import DEFAULT_MAX_BYTES, SUPPORTED_EXTENSIONS, decode_upload

#: Upload limit in MiB for the upload widget; equal to core.images' byte limit (and config.toml).
MAX_UPLOAD_MB = DEFAULT_MAX_BYTES // 2**20
#: File-name suffixes the upload widget offers (the decoder sniffs content, not names).
UPLOAD_TYPES: tuple[str, ...] = tuple(sorted(ext.lstrip(".") for ext in SUPPORTED_EXTENSIONS))


@dataclass(frozen=True, eq=False)
class Upload:
    """An uploaded image, decoded into a dataset's format.

    Attributes:
        name: the file name as uploaded (display only; never used as a path).
        image: (H, W, C) uint8, exactly what the models see.
        notes: what decoding did, e.g. "inverted to light-on-dark".
        digest: sha256 of the decoded pixels and shape: the content key for shared caches.
        image_format: ((H, W, C), light_on_dark) it was decoded for.
        description: the original file, e.g. "PNG, 640×480, RGB".
    """

    name: str
    image: np.ndarray
    notes: tuple[str, ...]
    digest: str
    image_format: tuple[tuple[int, int, int], bool]
    description: str


@dataclass(frozen=True)
class UploadOutcome:
    """Either an :class:`Upload` or a message for the user (never both)."""

    upload: Upload | None = None
    error: str | None = None


def _image_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(f"{image.shape}:{image.dtype.str}\0".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def decode_uploaded_file(
    name: str,
    data: bytes | IO[bytes],
    *,
    image_shape: tuple[int, int, int],
    light_on_dark: bool,
) -> UploadOutcome:
    """Decode an uploaded file for a dataset; a bad file gives a message, never an exception.

    Reads at most one byte more than the limit, so an oversized stream is refused unread.

    Args:
        name: the uploaded file's name (shown, never opened).
        data: the bytes, or a binary file object (e.g. Streamlit's UploadedFile).
        image_shape: (H, W, C) of the dataset's images.
        light_on_dark: the dataset's convention (see core.images).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        if getattr(data, "seekable", lambda: False)():
            data.seek(0)
        raw = data.read(DEFAULT_MAX_BYTES + 1)
    try:
        decoded = decode_upload(raw, target_shape=image_shape, light_on_dark=light_on_dark)
    except ImageDecodeError as exc:
        return UploadOutcome(error=f"{as_code(_display_name(name))} could not be used: {exc}")
    image = np.asarray(decoded.image)
    width, height = decoded.original_size
    return UploadOutcome(
        upload=Upload(
            name=_display_name(name),
            image=image,
            notes=tuple(decoded.notes),
            digest=_image_digest(image),
            image_format=(tuple(int(v) for v in image.shape), bool(light_on_dark)),  # type: ignore[arg-type]
            description=f"{decoded.format}, {width}×{height}, {decoded.original_mode}",
        )
    )


def _display_name(name: str) -> str:
    # Only the last path component, printable, bounded: the name is shown, never trusted.
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in base)[:80]
    return cleaned or "upload"


def as_code(text: str) -> str:
    """``text`` as a Markdown code span, so a file name like "[x](http://…)" or "$x$" is shown
    literally rather than rendered as a link or LaTeX. ``text`` must not contain backticks."""
    return f"`{text}`"
