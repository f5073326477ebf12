"""Input images: resolution buckets, robust loading, resize-to-cover and centre-crop.

FRAMEPACK.md section 6: at the 640 setting the buckets are (416, 960) ... (608, 640) and their
transposes; an image goes to the bucket minimising |h*bw - w*bh| (the closest aspect ratio, with
no division; ties go to the later bucket, as in the release), is resized to cover it (Lanczos) and
centre-cropped to it exactly, the crop box rounded as the release's float box is (half to even).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from framepack.io.errors import InputError, InputWarning

# (h, w) at the 640 setting, landscape half; `buckets` adds the transposes.
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960),
    (448, 864),
    (480, 832),
    (512, 768),
    (544, 704),
    (576, 672),
    (608, 640),
)

MAX_PIXELS = 80_000_000  # larger inputs are refused before decoding
MIN_SIDE = 16
# Formats opened at all (JPEG includes multi-picture MPO). Deliberately short: Pillow's EPS
# plugin, for one, runs Ghostscript.
_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

ImageArray = npt.NDArray[np.uint8]


def _check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer of at least {low}, got {value!r}.")
    return int(value)


def buckets(resolution: int = 640) -> list[tuple[int, int]]:
    """The (h, w) buckets for a resolution setting, ordered by height.

    Other settings scale the 640 shapes by `resolution / 640`, rounding each side to the nearest
    multiple of 16 (halves up), e.g. 320 gives (208, 480) ... (608 -> 304, 640 -> 320). Shapes that
    round onto the same bucket (only at the smallest settings) are listed once.
    `resolution` must be a multiple of 16 from 64 to 2048.
    """
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, np.integer))
        or resolution % 16
        or not 64 <= resolution <= 2048
    ):
        raise InputError(f"Resolution must be a multiple of 16 from 64 to 2048, got {resolution!r}.")
    shapes = [*BUCKETS_640, *((w, h) for h, w in reversed(BUCKETS_640))]
    out: list[tuple[int, int]] = []
    for h, w in shapes:
        # round(side * resolution / 640 / 16) * 16 in integers, halves up.
        bucket = tuple(max(16, (side * resolution + 640 * 8) // (640 * 16) * 16) for side in (h, w))
        if bucket not in out:
            out.append(bucket)  # type: ignore[arg-type]
    return out


def pick_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    """The bucket (h, w) minimising |height*w - width*h|; ties go to the LAST in `buckets`.

    That is the release's rule (it keeps a candidate whose distance is <= the best so far), so a
    square image at 640 becomes 640 tall x 608 wide.
    """
    height, width = _check_int("height", height), _check_int("width", width)
    candidates = buckets(resolution)
    return min(reversed(candidates), key=lambda b: abs(height * b[1] - width * b[0]))


def _check_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise InputError(f"Image {path} is {w}x{h}, over the {MAX_PIXELS // 1_000_000} megapixel limit.")
    if min(w, h) < MIN_SIDE:
        raise InputError(f"Image {path} is {w}x{h}, smaller than {MIN_SIDE}x{MIN_SIDE}.")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).rstrip(".")
    return text or type(exc).__name__


def _oriented(img: Image.Image) -> Image.Image:
    """Decode the (first) frame and apply its EXIF orientation."""
    img.load()  # decoding errors (truncation) surface here, not in the orientation step
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block only costs the orientation, not the image
        return img


def _to_rgb(path: Path, img: Image.Image) -> ImageArray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB; transparency is composited onto white."""
    mode = img.mode
    if mode.startswith("I"):  # "I;16*" (16-bit PNG/TIFF) and "I": taken as 16-bit samples
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":  # float samples, taken as 0..1
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            rgba = img.convert("RGBA")
            if rgba.getextrema()[3][0] < 255:
                warnings.warn(
                    InputWarning(f"Image {path} is partly transparent; it is put on white."), stacklevel=2
                )
            img = Image.alpha_composite(white, rgba)
        rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise InputError(f"Image {path} has pixel mode {mode}, which cannot be converted to RGB.") from exc
    assert rgb.ndim == 3 and rgb.shape[2] == 3, rgb.shape
    return rgb


def load_image(path: str | os.PathLike[str]) -> ImageArray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Applies EXIF orientation; composites transparency onto white; converts palette, CMYK,
    grayscale and 16-bit images to 8-bit RGB; takes the first frame of animated files. Refuses,
    with an `InputError` naming the file, anything that is missing, not a file, empty, not a
    PNG/JPEG/GIF/WebP/BMP/TIFF/PPM/AVIF image, truncated or corrupt, smaller than 16x16, or over
    80 megapixels (checked from the header, before decoding).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"Image file {p} does not exist.")
    if not p.is_file():
        raise InputError(f"Image path {p} is not a file.")
    if p.stat().st_size == 0:
        raise InputError(f"Image file {p} is empty.")
    Image.init()  # registers the plugins, so the format filter below sees what this Pillow has
    formats = [f for f in _FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~90 MP and raises DecompressionBombError from ~180 MP; our own
            # limit is lower and checked first, from the header, since `Image.open` is lazy.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p, formats=formats) as img:
                _check_size(p, img.size)
                img.verify()  # checksums (PNG); the image is unusable afterwards, so reopen
            with Image.open(p, formats=formats) as img:
                frames = getattr(img, "n_frames", 1)
                if frames > 1 and img.format != "MPO":  # MPO: a photo plus its preview images
                    warnings.warn(
                        InputWarning(f"Image {p} has {frames} frames; only the first is used."), stacklevel=2
                    )
                return _to_rgb(p, _oriented(img))
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"Image {p} is over the {MAX_PIXELS // 1_000_000} megapixel limit.") from exc
    except UnidentifiedImageError as exc:
        names = "/".join(formats)
        raise InputError(f"File {p} is not a readable image (supported: {names}).") from exc
    except Exception as exc:  # Pillow raises many types for damaged files; all mean the same here
        raise InputError(f"Image file {p} is truncated or corrupt ({_reason(exc)}).") from exc


def _check_image(image: object) -> ImageArray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = (
            f"shape {image.shape} dtype {image.dtype}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise InputError(f"Image arrays must be (H, W, 3) uint8 RGB, got {got}.")
    if min(image.shape[:2]) < 1:
        raise InputError(f"Image array is empty (shape {image.shape}).")
    return image


def crop_start(excess: int) -> int:
    """Where a centre crop starts when the resized side is `excess` pixels too long.

    The release hands PIL the float box `excess / 2`, which PIL rounds half to even: excess 3 starts
    at 2 (not 1), excess 5 at 2, excess 7 at 4; it differs from flooring when excess is 3 mod 4.
    """
    return round(excess / 2)  # Python's round is half to even, as PIL's crop


def fit_to_bucket(image: ImageArray, height: int, width: int) -> ImageArray:
    """Resize `image` (H, W, 3) to cover (height, width) with Lanczos, then centre-crop to it exactly."""
    image = _check_image(image)
    height, width = _check_int("height", height), _check_int("width", width)
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.LANCZOS))
    top, left = crop_start(rh - height), crop_start(rw - width)
    return np.ascontiguousarray(image[top : top + height, left : left + width])  # (height, width, 3)


def prepare_image(
    image: str | os.PathLike[str] | ImageArray,
    resolution: int = 640,
    width: int | None = None,
    height: int | None = None,
) -> ImageArray:
    """Load (or take) an image and fit it to its resolution bucket, or to an explicit size.

    An explicit size needs both `width` and `height`, each a multiple of 16.
    """
    array = _check_image(image) if isinstance(image, np.ndarray) else load_image(image)
    if width is None and height is None:
        height, width = pick_bucket(array.shape[0], array.shape[1], resolution)
    elif width is None or height is None:
        raise InputError("Give both width and height, or neither to use the resolution bucket.")
    else:
        for name, side in (("width", width), ("height", height)):
            if _check_int(name, side, low=16) % 16:
                raise InputError(f"The {name} must be a multiple of 16, got {side}.")
    return fit_to_bucket(array, height, width)
