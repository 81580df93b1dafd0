"""Image helpers for the dashboard: crisp upscaling, signed heatmap overlays, tile grids.

Pure numpy (and PIL to encode PNGs) except :func:`tile_grid`, which renders with Streamlit.
Nothing here calls core.
"""

from __future__ import annotations

import base64
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


def signed_overlay(base: np.ndarray, values: np.ndarray, size: int = 224) -> Overlay:
    """Draw (H, W, C) signed values over an (H, W, C) uint8 image: red positive, blue negative.

    Channels are summed (a pixel's total effect); colour opacity is proportional to |value| up to
    the 99th percentile of |value|, so one extreme pixel does not wash out the rest.
    """
    base = np.asarray(base, dtype=np.float64)
    gray = base.mean(axis=2) if base.ndim == 3 else base
    signed = np.asarray(values, dtype=np.float64)
    signed = signed.sum(axis=2) if signed.ndim == 3 else signed
    magnitude = np.abs(signed)
    scale = float(np.percentile(magnitude, 99)) if magnitude.size else 0.0
    if not np.isfinite(scale) or scale <= 0:
        scale = float(magnitude.max()) if magnitude.size and magnitude.max() > 0 else 1.0
    strength = np.clip(magnitude / scale, 0.0, 1.0)[..., None]
    # Dimmed grayscale underneath, so colour reads clearly on white-on-black garments too.
    under = np.repeat((0.35 + 0.45 * gray / 255.0)[..., None] * 255.0, 3, axis=2)
    red = np.array([220.0, 38.0, 38.0])
    blue = np.array([37.0, 99.0, 235.0])
    colour = np.where(signed[..., None] >= 0, red, blue)
    mixed = under * (1 - 0.85 * strength) + colour * (0.85 * strength)
    return Overlay(upscale(mixed.round().astype(np.uint8), size), scale)


@dataclass(frozen=True)
class Tile:
    """One image in a grid, with a caption and the arguments its button passes back."""

    image: np.ndarray
    caption: str
    button_key: str
    button_args: tuple[Any, ...] = ()
    help: str | None = None


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

    Images are shown ``size`` pixels wide. The button calls ``on_click(*tile.button_args)`` (a callback, so state changes before the
    rerun draws anything). The tile whose ``button_key`` is ``selected_key`` gets a primary button.
    """
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        cells = st.columns(columns, gap="small")
        for cell, tile in zip(cells, row, strict=False):
            with cell:
                st.image(upscale(tile.image, size), caption=tile.caption, width=size)
                st.button(
                    button_label,
                    key=tile.button_key,
                    on_click=on_click,
                    args=tile.button_args,
                    help=tile.help,
                    type="primary" if tile.button_key == selected_key else "secondary",
                )


def png_data_url(image: np.ndarray, size: int = THUMBNAIL_PX) -> str:
    """An (H, W, C) uint8 image as a ``data:image/png;base64,...`` URL, enlarged like
    :func:`upscale`, for ``st.column_config.ImageColumn`` (table cells take URLs, not arrays)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(upscale(image, size))).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
