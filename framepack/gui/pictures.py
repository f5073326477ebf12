"""Small pictures of a job for the page: thumbnails, readable latent previews, PNG data URIs.

Pure functions of uint8 RGB arrays (no Gradio, no torch). The step preview of a run is the
latent-to-RGB map at latent resolution (`framepack.pipeline.decode.latent_preview`): 8 times
smaller than the video and, on models whose VAE the map was not made for, dark. `readable` scales
it to the frame size and stretches a dark one's contrast so the shapes show.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["THUMBNAIL_SIZE", "thumbnail", "stretch_contrast", "resize_frames", "readable", "png_data_uri"]

THUMBNAIL_SIZE = 96  # the longer side of a thumbnail, in pixels

# A picture whose bright end (99th percentile) is under this is stretched; a flatter one
# (under `_FLAT` levels from its dark to its bright end) has no shape to show and is left alone.
_DARK = 192
_FLAT = 8


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape[-1:] != (3,):
        raise ValueError(f"expected uint8 RGB pixels (..., 3), got {image.dtype} {image.shape}.")
    return image


def resize_frames(frames: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(T, h, w, 3) or (h, w, 3) uint8 -> the same at `size` (height, width), bilinear (antialiased
    when shrinking) or nearest."""
    frames = _rgb(frames)
    height, width = size
    if frames.shape[-3:-1] == (height, width):
        return frames
    method = Image.NEAREST if nearest else Image.BILINEAR
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = [np.asarray(Image.fromarray(f).resize((width, height), method)) for f in flat]
    return np.stack(out).reshape(*frames.shape[:-3], height, width, 3)


def stretch_contrast(frames: np.ndarray) -> np.ndarray:
    """Uint8 pixels, dark ones brightened: when the bright end (99th percentile of every channel
    value) is under 192, the values from the 1st to the 99th percentile are spread over 0..255, one
    gain for all frames and channels (hues and the brightness between frames keep their order).
    Bright or flat pictures come back unchanged."""
    frames = _rgb(frames)
    lo, hi = np.percentile(frames, (1, 99))
    if hi >= _DARK or hi - lo < _FLAT:
        return frames
    scaled = (frames.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def readable(preview: np.ndarray, frame_size: tuple[int, int] | None = None) -> np.ndarray:
    """A (T, h, w, 3) latent preview as a person can read it: contrast stretched when dark, and
    scaled (bilinear) to `frame_size` (height, width), the video's, when given."""
    frames = stretch_contrast(preview)
    return frames if frame_size is None else resize_frames(frames, frame_size)


def thumbnail(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """(h, w, 3) uint8 -> a copy scaled (bilinear) so that its longer side is `size` pixels."""
    image = _rgb(image)
    h, w = image.shape[:2]
    k = size / max(h, w)
    return np.array(resize_frames(image, (max(1, round(h * k)), max(1, round(w * k)))))


def png_data_uri(image: np.ndarray) -> str:
    """(h, w, 3) uint8 -> `data:image/png;base64,...`, for an `<img src>` (only base64 characters)."""
    buffer = io.BytesIO()
    Image.fromarray(_rgb(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
