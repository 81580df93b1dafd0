"""The app's look beyond Streamlit's theme: a favicon drawn here, and a few layout rules.

The favicon is an image made with PIL, served by Streamlit itself: a ``:material/...:`` page icon
would be fetched from a font CDN by the browser and fail offline. The CSS rules only size and clip
elements the dashboard keys itself (``st-key-*`` classes), so a Streamlit upgrade cannot turn them
against its own widgets.
"""

from __future__ import annotations

import streamlit as st
from PIL import Image, ImageDraw


def _favicon() -> Image.Image:
    """A magnifying glass over a grid of pixels, in the theme's blue."""
    size = 64
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    blue = (37, 99, 235, 255)
    for i in range(3):
        for j in range(3):
            shade = (191, 219, 254, 255) if (i + j) % 2 else (96, 165, 250, 255)
            draw.rectangle((14 + 10 * i, 14 + 10 * j, 23 + 10 * i, 23 + 10 * j), fill=shade)
    draw.ellipse((6, 6, 46, 46), outline=blue, width=6)
    draw.line((40, 40, 58, 58), fill=blue, width=9)
    return image


FAVICON = _favicon()

_CSS = """
<style>
/* Tile captions: the same number of lines in every tile of a grid, each kept on one line
   (clipped with an ellipsis, never wrapped inside a value), so the buttons line up. */
div[class*="st-key-tilecap_"] .tilecap {
  font-size: 0.74rem; line-height: 1.3; color: rgba(49, 51, 63, 0.75);
}
div[class*="st-key-tilecap_"] .tilecap div {
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
}
/* A tile's button: compact, so its label fits a thumbnail's width at 1280 px. */
div[class*="st-key-tilebtn_"] button {
  padding: 0.2rem 0.3rem; min-height: 2rem; font-size: 0.8rem;
}
/* The explained image's title and the models' names: smaller, never broken inside a word. */
div.st-key-explain_title h3 {
  font-size: 1.3rem; overflow-wrap: normal; word-break: normal;
}
div.st-key-explain_title h3 code { white-space: nowrap; font-size: 0.9em; }
div[class*="st-key-explain_model_"] h3, div[class*="st-key-explain_pending_"] h3 { font-size: 1.3rem; }
</style>
"""


def apply_style() -> None:
    """Add the app's CSS (style-only HTML takes no space on the page)."""
    st.html(_CSS)
