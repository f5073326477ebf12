"""The demo world: procedural clips of one coloured shape moving as its caption says.

A tiny, fully known video distribution to train and evaluate on without any download. Every clip
shows one solid shape (circle, square, triangle) of one colour on a plain background of another
colour, doing one thing: moving left/right/up/down, growing or shrinking. Captions follow the
grammar::

    a <colour> <shape> moves <left|right|up|down> [on a <colour> background]
    a <colour> <shape> <grows|shrinks>             [on a <colour> background]

Geometry is in units of the frame side (a `Scene` renders at any size); frames are anti-aliased
by 4x4 supersampling and box-downsampling, computed in numpy, so a scene renders bit-identically
on every machine. Scenes come from a seed (`sample_scene`) or from a caption (`scene_from_caption`);
`measure` reads the shape back out of frames (centroid, area, colour) for evaluation.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from framepack.io import write_bytes_atomic, write_mp4

__all__ = [
    "COLOURS",
    "DEFAULT_FRAMES",
    "DIRECTIONS",
    "FPS",
    "MOTIONS",
    "SHAPES",
    "CAPTIONS",
    "Scene",
    "caption_for",
    "classify_motion",
    "first_frame",
    "measure",
    "nearest_colour",
    "render",
    "sample_scene",
    "scene_from_caption",
    "write_dataset",
]

Frames = npt.NDArray[np.uint8]

# Pairwise at least ~107 apart in RGB, so a shape always stands out from its background; no
# colour starts with a vowel, so "a <colour>" stays grammatical.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (130, 50, 170),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# motion -> (caption phrase, unit direction (dx, dy) of the centre, sign of the size change)
MOTIONS: dict[str, tuple[str, tuple[int, int], int]] = {
    "left": ("moves left", (-1, 0), 0),
    "right": ("moves right", (1, 0), 0),
    "up": ("moves up", (0, -1), 0),
    "down": ("moves down", (0, 1), 0),
    "grows": ("grows", (0, 0), 1),
    "shrinks": ("shrinks", (0, 0), -1),
}
DIRECTIONS = ("left", "right", "up", "down")  # the motions that move the centre
FPS = 30
DEFAULT_FRAMES = 73  # two sections of the default window (9 latents): 4 * 19 - 3 pixel frames
MAX_SIZE = 128  # frames are at most 128x128

SUPERSAMPLE = 4
MARGIN = 0.04  # free space kept between the shape and the frame's edge (fraction of the side)
MIN_HALF, MAX_HALF = 0.1, 0.18  # half-size (circle radius) at the start, fraction of the side
GROWN_HALF = 0.3  # largest half-size a growing shape reaches
TRAVEL = (0.3, 0.55)  # distance a moving centre covers over the clip, fraction of the side
# `start="centre"`: the centre starts in this square and moves this far, so where a shape starts
# says nothing about where it goes (every direction fits) and only the caption tells.
CENTRE_START = (0.38, 0.62)
CENTRE_TRAVEL = (0.15, 0.3)
# `start="free"`: the centre starts anywhere the shape fits (as a newcomer's drawing might), redrawn
# only if it has less than `FREE_ROOM` to move its way, and moves `CENTRE_TRAVEL` (less if the edge
# comes first): the position says next to nothing about the direction.
FREE_ROOM = 0.1
STARTS = ("anywhere", "centre", "free")
# `write_dataset(captions=...)`: the caption with its background phrase, without it, or either,
# drawn per clip from its seed (`caption_for`).
CAPTIONS = ("full", "plain", "mixed")


@dataclass(frozen=True)
class Scene:
    """One clip of the demo world. Lengths are fractions of the frame side; time is in frames.

    `x`, `y` are the shape's centre (centroid) at frame 0 (x to the right, y down), `size` its
    half-size: the circle's radius, half the square's side, half the triangle's base (the
    triangle points up, apex `size` above the centre, base `size / 2` below it). `speed` is how
    far per frame the centre moves (left/right/up/down) or the half-size changes (grows/shrinks).
    """

    shape: str
    colour: str
    background: str
    motion: str
    x: float = 0.5
    y: float = 0.5
    size: float = 0.12
    speed: float = 0.005

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("background", self.background, tuple(COLOURS)),
            ("motion", self.motion, tuple(MOTIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"scene {field} {value!r} is not one of {', '.join(allowed)}.")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would be invisible.")
        for field in ("x", "y", "size", "speed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"scene {field} must be a finite number, got {value!r}.")
        if not 0 < self.size <= 0.5 or self.speed < 0:
            raise ValueError(f"scene size must be in (0, 0.5] and speed >= 0, got {self.size}, {self.speed}.")

    @property
    def caption(self) -> str:
        """`a <colour> <shape> <motion phrase> on a <background> background`."""
        return f"{self.plain_caption} on a {self.background} background"

    @property
    def plain_caption(self) -> str:
        """`a <colour> <shape> <motion phrase>`: the caption without its background phrase."""
        return f"a {self.colour} {self.shape} {MOTIONS[self.motion][0]}"

    def path(self, frames: int) -> npt.NDArray[np.float64]:
        """(frames, 3) centre x, y and half-size per frame; the shape stops at the frame's edge."""
        _, (dx, dy), grow = MOTIONS[self.motion]
        t = np.arange(frames, dtype=np.float64)
        half = np.clip(self.size + grow * self.speed * t, 0.02, 0.5)
        x = np.clip(self.x + dx * self.speed * t, half, 1 - half)
        y = np.clip(self.y + dy * self.speed * t, half, 1 - half)
        room = np.minimum.reduce([x, 1 - x, y, 1 - y])  # a growing shape stops at the nearest edge
        return np.stack([x, y, np.minimum(half, room)], axis=1)  # (T, 3)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {value}.")
    return int(value)


def _draw(rng: random.Random, names: list[str] | tuple[str, ...]) -> str:
    return names[math.floor(rng.random() * len(names))]


def _background(u: float, colour: str) -> str:
    """The background picked by the uniform number `u` among the colours other than `colour`."""
    others = [c for c in COLOURS if c != colour]
    return others[math.floor(u * len(others))]


def _names(rng: random.Random) -> tuple[str, str, float, str]:
    """Shape, colour, the background's uniform draw and motion: always four draws."""
    return _draw(rng, SHAPES), _draw(rng, list(COLOURS)), rng.random(), _draw(rng, list(MOTIONS))


def _geometry(
    rng: random.Random, motion: str, frames: int, start: str = "anywhere"
) -> tuple[float, float, float, float]:
    """Start x, y, half-size and speed such that the whole path stays inside the frame.

    `start="centre"` moves the centre `CENTRE_TRAVEL` from a start in the `CENTRE_START` square
    (a large shape may reach the edge and stop there, as `Scene.path` does).
    """
    _, (dx, dy), grow = MOTIONS[motion]
    steps = max(frames - 1, 1)
    small = rng.uniform(MIN_HALF, MAX_HALF)
    if start == "centre" and not grow:
        x, y = rng.uniform(*CENTRE_START), rng.uniform(*CENTRE_START)
        return x, y, small, rng.uniform(*CENTRE_TRAVEL) / steps
    if start == "free" and not grow:
        lo, hi = small + MARGIN, 1 - small - MARGIN
        travel = rng.uniform(*CENTRE_TRAVEL)
        while True:  # room ahead: between the centre and where the margin begins
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            ahead = {(-1, 0): x - lo, (1, 0): hi - x, (0, -1): y - lo, (0, 1): hi - y}[(dx, dy)]
            if ahead >= FREE_ROOM:
                return x, y, small, min(travel, ahead) / steps
    if grow:  # between `small` and `big`, centred where the big shape fits
        big = rng.uniform(small + 0.08, GROWN_HALF)
        lo, hi = big + MARGIN, 1 - big - MARGIN
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        return x, y, (small if grow > 0 else big), (big - small) / steps
    lo, hi = small + MARGIN, 1 - small - MARGIN
    travel = rng.uniform(TRAVEL[0], min(TRAVEL[1], hi - lo))
    along = rng.uniform(lo, hi - travel)  # where the centre starts along the direction of motion
    across = rng.uniform(lo, hi)
    if dx:
        x, y = (along if dx > 0 else 1 - along), across
    else:
        x, y = across, (along if dy > 0 else 1 - along)
    return x, y, small, travel / steps


def _check_start(start: object) -> str:
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}.")
    return str(start)


def caption_for(scene: Scene, seed: int, captions: str = "full") -> str:
    """The caption a clip of `scene` (drawn from `seed`) gets: `scene.caption` ("full"),
    `scene.plain_caption` ("plain"), or either with even odds ("mixed"), drawn from the seed alone
    (not from the scene's own draws, so the choice says nothing about the scene)."""
    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {', '.join(CAPTIONS)}, got {captions!r}.")
    if captions == "mixed":
        captions = "plain" if random.Random(f"caption:{seed}").random() < 0.5 else "full"
    return scene.plain_caption if captions == "plain" else scene.caption


def sample_scene(seed: int, frames: int = DEFAULT_FRAMES, start: str = "anywhere") -> Scene:
    """A random scene, the same for the same seed, whose shape stays inside the frame for `frames`.

    `start="anywhere"` places the shape wherever its whole path fits (so a shape moving right
    tends to start on the left); `start="centre"` starts it near the middle, whatever its motion;
    `start="free"` anywhere, whatever its motion, with at least `FREE_ROOM` to move its way.
    """
    seed = _check_int("seed", seed, low=-(2**63))
    frames = _check_int("frames", frames, low=1)
    start = _check_start(start)
    rng = random.Random(seed)
    shape, colour, u, motion = _names(rng)
    return Scene(shape, colour, _background(u, colour), motion, *_geometry(rng, motion, frames, start))


_CAPTION = re.compile(
    r"an? (?P<colour>\w+) (?P<shape>\w+) (?:moves (?P<dir>\w+)|(?P<size>grows|shrinks))"
    r"(?: on an? (?P<background>\w+) background)?"
)


def scene_from_caption(caption: str, seed: int = 0, frames: int = DEFAULT_FRAMES) -> Scene:
    """The scene a caption describes; what it leaves open (position, size, speed, and the
    background if not named) comes from `seed`. `scene_from_caption(s.caption, seed, frames)`
    gives back `sample_scene(seed, frames)` for `s = sample_scene(seed, frames)`.

    Case, repeated spaces and a final full stop are ignored; anything else outside the grammar
    (module docstring) is a ValueError.
    """
    if not isinstance(caption, str):
        raise ValueError(f"a caption is a string, got {type(caption).__name__}.")
    text = " ".join(caption.lower().split()).rstrip(".").strip()
    match = _CAPTION.fullmatch(text)
    grammar = "'a <colour> <shape> moves <left|right|up|down>' or 'a <colour> <shape> <grows|shrinks>'"
    if match is None:
        raise ValueError(f"caption {caption!r} does not follow {grammar} [on a <colour> background].")
    motion = match["dir"] or match["size"]
    colour, background = match["colour"], match["background"]
    for what, value, allowed in (
        ("colour", colour, tuple(COLOURS)),
        ("shape", match["shape"], SHAPES),
        ("direction", motion, DIRECTIONS if match["dir"] else ("grows", "shrinks")),
        ("colour", background or colour, tuple(COLOURS)),
    ):
        if value not in allowed:
            raise ValueError(f"caption {caption!r} names {what} {value!r}; known: {', '.join(allowed)}.")
    if background == colour:
        raise ValueError(f"caption {caption!r} puts a {colour} shape on a {colour} background.")
    rng = random.Random(_check_int("seed", seed, low=-(2**63)))
    _, _, u, _ = _names(rng)  # the same draws as `sample_scene`, so the geometry matches
    frames = _check_int("frames", frames, low=1)
    background = background or _background(u, colour)
    return Scene(match["shape"], colour, background, motion, *_geometry(rng, motion, frames))


def _coverage(shape: str, x: float, y: float, half: float, size: int) -> npt.NDArray[np.float64]:
    """(size, size) fraction of each pixel the shape covers, from SUPERSAMPLE^2 samples per pixel."""
    n = size * SUPERSAMPLE
    u = (np.arange(n, dtype=np.float64) + 0.5) / n  # sample positions in fractions of the side
    px, py = u[None, :] - x, u[:, None] - y  # (1, n), (n, 1) relative to the centre
    if shape == "circle":
        inside = px**2 + py**2 <= half**2
    elif shape == "square":
        inside = (np.abs(px) <= half) & (np.abs(py) <= half)
    else:  # triangle pointing up, centroid at (x, y): apex (x, y - half), base y + half / 2, 2 * half wide
        inside = (py >= -half) & (py <= half / 2) & (np.abs(px) <= (py + half) / 1.5)
    inside = np.broadcast_to(inside, (n, n))
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))  # box downsample


def render(scene: Scene, frames: int, size: int = 64) -> Frames:
    """`(frames, size, size, 3)` uint8 RGB frames of a scene, anti-aliased, deterministic."""
    if not isinstance(scene, Scene):
        raise ValueError(f"render needs a Scene, got {type(scene).__name__}.")
    frames = _check_int("frames", frames, low=1)
    size = _check_int("size", size, low=8, high=MAX_SIZE)
    fg = np.array(COLOURS[scene.colour], dtype=np.float64)
    bg = np.array(COLOURS[scene.background], dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t, (x, y, half) in enumerate(scene.path(frames)):
        alpha = _coverage(scene.shape, x, y, half, size)[:, :, None]  # (H, W, 1)
        out[t] = np.rint(bg + alpha * (fg - bg)).astype(np.uint8)  # (H, W, 3)
    return out


def first_frame(scene: Scene, size: int = 64) -> npt.NDArray[np.uint8]:
    """The scene's frame 0, `(size, size, 3)` uint8: the start image of an image-to-video run."""
    return render(scene, 1, size)[0]


def write_dataset(
    directory: str | os.PathLike[str],
    count: int,
    frames: int = DEFAULT_FRAMES,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
    start: str = "anywhere",
    captions: str = "full",
) -> list[Path]:
    """Write `count` demo clips `clip_00000.mp4` ... (30 fps) with a caption `clip_00000.txt` beside
    each, and `manifest.jsonl` listing them; clip i is `sample_scene(seed + i, frames, start)`,
    captioned by `caption_for(scene, seed + i, captions)`.

    Returns the video paths. The same arguments give the same frames and captions.
    """
    count = _check_int("count", count, low=1)
    frames = _check_int("frames", frames, low=1)
    size = _check_int("size", size, low=8, high=MAX_SIZE)
    start = _check_start(start)
    caption_for(sample_scene(seed, 1), seed, captions)  # refuses an unknown `captions` up front
    if size % 2:
        raise ValueError(f"size must be even for H.264 video, got {size}.")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i in tqdm(range(count), desc="demo clips", unit="clip", disable=not progress):
        scene = sample_scene(seed + i, frames, start)
        caption = caption_for(scene, seed + i, captions)
        video = folder / f"clip_{i:05d}.mp4"
        write_mp4(render(scene, frames, size), video, fps=FPS, metadata={"caption": caption})
        write_bytes_atomic((caption + "\n").encode("utf-8"), video.with_suffix(".txt"))
        lines.append(json.dumps({"video": video.name, "caption": caption, "seed": seed + i}))
        paths.append(video)
    write_bytes_atomic(("\n".join(lines) + "\n").encode("utf-8"), folder / "manifest.jsonl")
    return paths


# ------------------------------------------------------------------------------------- measuring
BORDER = 2  # pixels of the frame's edge that estimate the background colour
MIN_CONTRAST = 40.0  # RGB distance below which nothing counts as a shape


def measure(frames: Frames) -> dict[str, npt.NDArray[np.float64]]:
    """Find the shape in each frame: pixels far from the background colour (the median of the
    frame's 2-pixel border).

    Returns per-frame arrays: `centroid` (T, 2) x, y as fractions of width and height (x right,
    y down), `area` (T,) fraction of the frame, `colour` (T, 3) mean RGB of the shape's core,
    `background` (T, 3) RGB. Each pixel counts with its coverage, estimated as its distance from
    the background over the frame's largest distance (exact for a rendered frame, whose edges
    blend linearly), so centroid and area are sub-pixel accurate; pixels under a quarter of the
    largest distance, and frames where nothing is `MIN_CONTRAST` away, count as background. The
    colour is averaged over pixels past three quarters of it, away from the blended edge. A frame
    with no shape has NaN centroid and colour and area 0.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[3] != 3 or min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {frames.shape}.")
    t, h, w, _ = frames.shape
    rgb = frames.astype(np.float64)
    b = min(BORDER, h // 4, w // 4) or 1
    ring = np.concatenate(
        [
            rgb[:, :b].reshape(t, -1, 3),
            rgb[:, -b:].reshape(t, -1, 3),
            rgb[:, b:-b, :b].reshape(t, -1, 3),
            rgb[:, b:-b, -b:].reshape(t, -1, 3),
        ],
        axis=1,
    )  # (T, border pixels, 3)
    background = np.median(ring, axis=1)  # (T, 3)
    dist = np.linalg.norm(rgb - background[:, None, None], axis=-1)  # (T, H, W)
    peak = dist.reshape(t, -1).max(axis=1)  # (T,)
    peak = np.where(peak > MIN_CONTRAST, peak, np.inf)[:, None, None]  # (T, 1, 1); inf: no shape
    cover = np.clip(dist / peak, 0, 1) * (dist > 0.25 * peak)  # (T, H, W) coverage estimate
    core = dist >= 0.75 * peak  # (T, H, W)
    area = cover.sum(axis=(1, 2))  # (T,) in pixels
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (cover * xs[None, None, :]).sum(axis=(1, 2)) / area
        cy = (cover * ys[None, :, None]).sum(axis=(1, 2)) / area
        colour = (rgb * core[..., None]).sum(axis=(1, 2)) / core.sum(axis=(1, 2))[:, None]
    return {
        "centroid": np.stack([cx, cy], axis=1),  # (T, 2)
        "area": area / (h * w),  # (T,)
        "colour": colour,  # (T, 3)
        "background": background,  # (T, 3)
    }


def nearest_colour(rgb: npt.ArrayLike) -> str:
    """The name in `COLOURS` closest (RGB distance) to a colour."""
    value = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda name: float(np.linalg.norm(value - np.array(COLOURS[name]))))


def classify_motion(measured: dict, min_shift: float = 0.05, min_growth: float = 1.25) -> str | None:
    """The motion between the first and last frame of `measure`'s result, or None if unclear.

    A centre shift over `min_shift` (fraction of the frame) names the direction of its larger
    component; otherwise an area ratio over `min_growth` (or under its inverse) is grows/shrinks.
    """
    (x0, y0), (x1, y1) = measured["centroid"][0], measured["centroid"][-1]
    a0, a1 = measured["area"][0], measured["area"][-1]
    if not all(np.isfinite([x0, y0, x1, y1])) or a0 <= 0 or a1 <= 0:
        return None
    dx, dy = x1 - x0, y1 - y0
    if max(abs(dx), abs(dy)) > min_shift:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if a1 / a0 > min_growth:
        return "grows"
    if a0 / a1 > min_growth:
        return "shrinks"
    return None
