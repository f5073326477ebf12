"""framepack.training.world: the procedural demo world (scenes, captions, rendering, measuring)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack.io import read_video
from framepack.training.world import (
    COLOURS,
    DIRECTIONS,
    MARGIN,
    MOTIONS,
    SHAPES,
    Scene,
    classify_motion,
    first_frame,
    measure,
    nearest_colour,
    render,
    sample_scene,
    scene_from_caption,
    write_dataset,
)

seeds = st.integers(min_value=0, max_value=2**32)
lengths = st.integers(min_value=9, max_value=80)


def test_palette_is_distinct():
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert math.dist(a, b) > 100
    assert len(SHAPES) == 3 and set(DIRECTIONS) <= set(MOTIONS)


def test_sampling_and_rendering_are_deterministic():
    a, b = sample_scene(7, 20), sample_scene(7, 20)
    assert a == b
    assert np.array_equal(render(a, 20, 48), render(b, 20, 48))
    assert len({sample_scene(s, 20) for s in range(20)}) == 20
    frames = render(a, 20, 48)
    assert frames.shape == (20, 48, 48, 3) and frames.dtype == np.uint8
    assert np.array_equal(first_frame(a, 48), frames[0])


def test_every_name_and_motion_gets_sampled():
    scenes = [sample_scene(s, 30) for s in range(300)]
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.background for s in scenes} == set(COLOURS)
    assert {s.motion for s in scenes} == set(MOTIONS)


@settings(max_examples=60, deadline=None)
@given(seeds, lengths)
def test_caption_round_trip(seed, frames):
    scene = sample_scene(seed, frames)
    assert scene.colour != scene.background
    assert scene.caption.startswith(f"a {scene.colour} {scene.shape} ")
    assert scene_from_caption(scene.caption, seed, frames) == scene
    # Without the background the caption still parses, and the seed picks a different colour.
    short = scene.caption.split(" on a ")[0]
    other = scene_from_caption(short.upper() + ".", seed + 1, frames)
    assert (other.colour, other.shape, other.motion) == (scene.colour, scene.shape, scene.motion)
    assert other.background != other.colour


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a red circle",
        "a red circle moves sideways",
        "a red circle moves grows",
        "a red hexagon moves left",
        "a mauve circle moves left",
        "a red circle moves left on a red background",
        "a red circle moves left on a plaid background",
        "the red circle moves left quickly",
    ],
)
def test_bad_captions_are_refused(caption):
    with pytest.raises(ValueError):
        scene_from_caption(caption, 0)


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="invisible"):
        Scene("circle", "red", "red", "left")
    with pytest.raises(ValueError, match="shape"):
        Scene("star", "red", "blue", "left")
    with pytest.raises(ValueError):
        render(Scene("circle", "red", "blue", "left"), 4, size=256)


@settings(max_examples=40, deadline=None)
@given(seeds, lengths)
def test_shape_stays_inside_the_frame(seed, frames):
    scene = sample_scene(seed, frames)
    x, y, half = scene.path(frames).T
    room = np.minimum.reduce([x, 1 - x, y, 1 - y]) - half
    assert room.min() >= MARGIN - 1e-9
    clip = render(scene, frames, 32)
    border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)
    assert (border == np.array(COLOURS[scene.background], dtype=np.uint8)).all()


def test_centre_starts_say_nothing_about_the_direction():
    from framepack.training.world import CENTRE_START

    scenes = [sample_scene(s, 145, start="centre") for s in range(400)]
    moving = [s for s in scenes if s.motion in ("left", "right", "up", "down")]
    assert all(
        CENTRE_START[0] <= s.x <= CENTRE_START[1] and CENTRE_START[0] <= s.y <= CENTRE_START[1]
        for s in moving
    )
    for motion in ("left", "right", "up", "down"):  # every direction starts all over the centre square
        xs = [s.x for s in moving if s.motion == motion]
        assert len(xs) > 30 and 0.45 < np.mean(xs) < 0.55
    for scene in moving[:20]:  # still a visible motion the right way, never leaving the frame
        m = measure(render(scene, 145, 32))
        assert classify_motion(m) == scene.motion and (m["area"] > 0).all()
    with pytest.raises(ValueError, match="start"):
        sample_scene(0, 20, start="middle")
    with pytest.raises(ValueError, match="start"):
        write_dataset(".", 1, start="edge", progress=False)


@settings(max_examples=40, deadline=None)
@given(seeds, st.integers(min_value=20, max_value=60), st.sampled_from([32, 64]))
def test_caption_motion_is_visible(seed, frames, size):
    scene = sample_scene(seed, frames)
    m = measure(render(scene, frames, size))
    assert classify_motion(m) == scene.motion
    (x0, y0), (x1, y1) = m["centroid"][0], m["centroid"][-1]
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(scene.motion, (0, 0))
    if dx or dy:  # the centroid moves at least a fifth of the frame the right way; the area holds
        assert (x1 - x0) * dx + (y1 - y0) * dy > 0.2
        assert abs((x1 - x0) * dy) + abs((y1 - y0) * dx) < 0.02
        assert m["area"].max() / m["area"].min() < 1.35
    else:
        assert (m["area"][-1] > m["area"][0]) == (scene.motion == "grows")
    assert {nearest_colour(c) for c in m["colour"]} == {scene.colour}
    assert {nearest_colour(c) for c in m["background"]} == {scene.background}


def test_measure_is_exact_on_an_aligned_square():
    scene = Scene("square", "white", "black", "right", x=0.5, y=0.25, size=0.125, speed=0.0)
    m = measure(render(scene, 2, 64))
    np.testing.assert_allclose(m["centroid"], [[0.5, 0.25]] * 2)
    np.testing.assert_allclose(m["area"], [0.0625] * 2)
    np.testing.assert_allclose(m["colour"][0], COLOURS["white"])
    empty = measure(np.zeros((1, 16, 16, 3), np.uint8))
    assert empty["area"][0] == 0 and np.isnan(empty["centroid"]).all()
    assert classify_motion(empty) is None


def test_anti_aliased_edges():
    scene = Scene("circle", "white", "black", "left", x=0.5, y=0.5, size=0.3, speed=0.0)
    values = np.unique(render(scene, 1, 32)[0, :, :, 0])
    assert len(values) > 5  # partial coverage on the edge, not a hard 2-colour stencil


def test_write_dataset_round_trip(tmp_path):
    paths = write_dataset(tmp_path / "a", 2, frames=24, size=48, seed=3, progress=False)
    again = write_dataset(tmp_path / "b", 2, frames=24, size=48, seed=3, progress=False)
    assert [p.name for p in paths] == ["clip_00000.mp4", "clip_00001.mp4"]
    manifest = (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 2
    for i, (path, other) in enumerate(zip(paths, again, strict=True)):
        scene = sample_scene(3 + i, 24)
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption == scene.caption == other.with_suffix(".txt").read_text().strip()
        frames, fps, meta = read_video(path)
        assert frames.shape == (24, 48, 48, 3) and fps == 30 and meta["caption"] == caption
        assert np.array_equal(frames, read_video(other)[0])
        assert np.abs(frames.astype(int) - render(scene, 24, 48)).mean() < 3  # H.264 at crf 16
        assert classify_motion(measure(frames)) == scene.motion


def test_free_starts_say_next_to_nothing_about_the_direction():
    from framepack.training.world import FREE_ROOM

    scenes = [sample_scene(s, 145, start="free") for s in range(400)]
    moving = [s for s in scenes if s.motion in ("left", "right", "up", "down")]
    assert sample_scene(7, 145, start="free") == scenes[7]  # the same seed, the same scene
    for motion in ("left", "right", "up", "down"):  # starts spread over the frame, off centre too
        xs = [s.x for s in moving if s.motion == motion]
        ys = [s.y for s in moving if s.motion == motion]
        assert len(xs) > 30 and np.ptp(xs) > 0.5 and np.ptp(ys) > 0.5
        along = np.array(xs if motion in ("left", "right") else ys)  # about as often in either half
        assert 0.3 < np.mean(along < 0.5) < 0.7
    for scene in moving[:20]:  # a visible motion the right way, never leaving the frame
        x, y, half = scene.path(145).T
        assert np.hypot(x[-1] - x[0], y[-1] - y[0]) >= FREE_ROOM - 1e-9
        m = measure(render(scene, 145, 32))
        assert classify_motion(m) == scene.motion and (m["area"] > 0).all()


def test_captions_with_and_without_the_background(tmp_path):
    from framepack.training.world import caption_for

    scene = sample_scene(11)
    assert scene.caption == f"{scene.plain_caption} on a {scene.background} background"
    assert scene_from_caption(scene.plain_caption, 11).motion == scene.motion
    assert caption_for(scene, 11) == scene.caption and caption_for(scene, 11, "plain") == scene.plain_caption
    mixed = [caption_for(sample_scene(s), s, "mixed") for s in range(200)]
    assert mixed == [caption_for(sample_scene(s), s, "mixed") for s in range(200)]  # from the seed alone
    plain = sum(not c.endswith(" background") for c in mixed)
    assert 70 < plain < 130
    with pytest.raises(ValueError, match="captions"):
        caption_for(scene, 11, "short")
    with pytest.raises(ValueError, match="captions"):
        write_dataset(tmp_path, 1, captions="short", progress=False)
    write_dataset(tmp_path, 4, frames=8, size=16, seed=5, captions="mixed", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [d["caption"] for d in lines] == [
        caption_for(sample_scene(5 + i, 8), 5 + i, "mixed") for i in range(4)
    ]
