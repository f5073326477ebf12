"""Text-to-video with the image-to-video weights: the start frame is a plain neutral frame.

FramePack's released models are image-to-video models: every section is anchored to a clean start
latent. Without a start image we give them the VAE encoding of a plain frame (mid-grey unless a
colour is chosen) as that anchor, and its SigLIP features as the image condition. The model then
has to invent the scene from the prompt alone, which it was not trained for: expect lower quality
than with a start image, and a video whose first frame is the plain one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_COLOUR", "DEFAULT_ASPECT", "parse_colour", "neutral_frame"]

DEFAULT_COLOUR = "#808080"  # mid-grey: 0 after the VAE's [-1, 1] scaling, give or take 1/255
DEFAULT_ASPECT = (9, 16)  # (h, w): the 640 bucket closest to it is 480x832, the paper's size


def parse_colour(text: str | None) -> tuple[int, int, int]:
    """An RGB triple from a CSS-style colour (`#808080`, `grey`, `rgb(10,20,30)`) or `R,G,B`."""
    from PIL import ImageColor

    text = DEFAULT_COLOUR if text is None else str(text).strip()
    parts = text.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
        rgb = tuple(int(p) for p in parts)
        if all(0 <= v <= 255 for v in rgb):
            return rgb  # type: ignore[return-value]
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        raise ValueError(
            f"the text-to-video colour {text!r} is not a colour such as #808080, grey or 128,128,128."
        ) from None
    return rgb[:3]


def neutral_frame(colour: str | None, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A plain `(H, W, 3)` uint8 frame of `colour`, in the default aspect when no size is given.

    The size only sets the aspect (and the exact size when both sides are given); the caller fits
    it to a resolution bucket like any start image.
    """
    h, w = (height, width) if height and width else (DEFAULT_ASPECT[0] * 64, DEFAULT_ASPECT[1] * 64)
    return np.full((h, w, 3), parse_colour(colour), dtype=np.uint8)
