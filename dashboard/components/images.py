"""Image helpers for the dashboard: crisp upscaling, signed heatmap overlays, tile grids.

Pure numpy (and PIL to encode PNGs) except :func:`tile_grid`, which renders with Streamlit.
Nothing here calls core.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image

#: Display size of a thumbnail, in pixels (28-pixel images become 3x, nearest neighbour).
THUMBNAIL_PX = 84


def upscale(image: np.ndarray, size: int = THUMBNAIL_PX) -> np.ndarray:
    """An (H, W, C) uint8 image enlarged by an integer factor with nearest neighbour.

    The browser would smooth a small image it stretches; pixels stay visible as pixels this way,
    which is what the models see. Grayscale comes back as (H', W'), RGB as (H', W', 3).
    """
    image = np.asarray(image)
    factor = max(1, int(size) // max(image.shape[0], image.shape[1]))
    if factor > 1:
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return image


@dataclass(frozen=True)
class Overlay:
    """A signed heatmap drawn over an image.

    Attributes:
        image: (H', W', 3) uint8 RGB.
        scale: the |value| that maps to full colour (values are clipped there).
    """

    image: np.ndarray
    scale: float


def channel_sum(values: np.ndarray) -> np.ndarray:
    """(H, W, C) signed per-pixel values summed over channels (a pixel's total effect): (H, W)."""
    signed = np.asarray(values, dtype=np.float64)
    return signed.sum(axis=2) if signed.ndim == 3 else signed


_RED = np.array([220.0, 38.0, 38.0])
_BLUE = np.array([37.0, 99.0, 235.0])


def signed_overlay(
    base: np.ndarray, values: np.ndarray, size: int = 224, *, scale: float | None = None
) -> Overlay:
    """Draw (H, W, C) signed values over an (H, W, C) uint8 image: red positive, blue negative.

    Channels are summed (a pixel's total effect); colour opacity grows linearly from 0 at a value
    of zero to full at ``|value| = scale`` (values beyond are clipped there). Without ``scale``,
    the 99th percentile of |value| is used, so one extreme pixel does not wash out the rest.
    """
    base = np.asarray(base, dtype=np.float64)
    gray = base.mean(axis=2) if base.ndim == 3 else base
    signed = channel_sum(values)
    magnitude = np.abs(signed)
    if scale is None or not np.isfinite(scale) or scale <= 0:
        scale = float(np.percentile(magnitude, 99)) if magnitude.size else 0.0
        if not np.isfinite(scale) or scale <= 0:
            scale = float(magnitude.max()) if magnitude.size and magnitude.max() > 0 else 1.0
    strength = np.clip(magnitude / scale, 0.0, 1.0)[..., None]
    # Dimmed grayscale underneath, so colour reads clearly on white-on-black garments too.
    under = np.repeat((0.35 + 0.45 * gray / 255.0)[..., None] * 255.0, 3, axis=2)
    colour = np.where(signed[..., None] >= 0, _RED, _BLUE)
    mixed = under * (1 - 0.85 * strength) + colour * (0.85 * strength)
    return Overlay(upscale(mixed.round().astype(np.uint8), size), float(scale))


def colour_bar(width: int = 224, height: int = 14) -> np.ndarray:
    """The overlay's colour scale as an (height, width, 3) uint8 strip: full blue (−scale) at the
    left, no colour (0) in the middle, full red (+scale) at the right, over mid grey."""
    position = np.linspace(-1.0, 1.0, int(width))
    strength = np.abs(position)[None, :, None]
    colour = np.where(position[None, :, None] >= 0, _RED, _BLUE)
    under = np.full((1, int(width), 3), 0.55 * 255.0)
    mixed = under * (1 - 0.85 * strength) + colour * (0.85 * strength)
    return np.repeat(mixed.round().astype(np.uint8), int(height), axis=0)


@dataclass(frozen=True)
class Tile:
    """One image in a grid, with a caption and the arguments its button passes back.

    Attributes:
        caption: the caption's lines; each is shown on one line (clipped, never wrapped), so
            every tile of a grid has the same height and its buttons line up.
    """

    image: np.ndarray
    caption: tuple[str, ...]
    button_key: str
    button_args: tuple[Any, ...] = ()
    help: str | None = None


def caption_html(lines: Sequence[str]) -> str:
    """A tile caption's lines as HTML (escaped), one block per line."""
    # An empty line still takes its height, so padded captions line up.
    inner = "".join(f"<div>{html.escape(str(line)) or '&nbsp;'}</div>" for line in lines)
    return f'<div class="tilecap">{inner}</div>'


def tile_grid(
    tiles: Sequence[Tile],
    *,
    columns: int,
    button_label: str,
    on_click: Callable[..., None],
    selected_key: str | None = None,
    size: int = THUMBNAIL_PX,
) -> None:
    """Render tiles in rows of ``columns``, each image with its caption and a keyed button.

    Images are shown ``size`` pixels wide, captions with as many lines as the longest. The button
    calls ``on_click(*tile.button_args)`` (a callback, so state changes before the rerun draws
    anything). The tile whose ``button_key`` is ``selected_key`` gets a primary button.
    """
    lines = max((len(tile.caption) for tile in tiles), default=0)
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        cells = st.columns(columns, gap="small")
        for cell, tile in zip(cells, row, strict=False):
            with cell:
                st.image(upscale(tile.image, size), width=size)
                padded = (*tile.caption, *([""] * (lines - len(tile.caption))))
                with st.container(key=f"tilecap_{tile.button_key}"):
                    st.html(caption_html(padded))
                with st.container(key=f"tilebtn_{tile.button_key}"):
                    st.button(
                        button_label,
                        key=tile.button_key,
                        on_click=on_click,
                        args=tile.button_args,
                        help=tile.help,
                        type="primary" if tile.button_key == selected_key else "secondary",
                        width="stretch",
                    )


def png_data_url(image: np.ndarray, size: int = THUMBNAIL_PX) -> str:
    """An (H, W, C) uint8 image as a ``data:image/png;base64,...`` URL, enlarged like
    :func:`upscale`, for ``st.column_config.ImageColumn`` (table cells take URLs, not arrays)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(upscale(image, size))).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
