"""Section plans (orders, paddings, histories, keyframes) and timed prompts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack.packing import PackingSchedule, forward_layout, get_schedule, inverted_layout
from framepack.pipeline import (
    ORDERS,
    TimedPrompt,
    frames_for,
    inverted_paddings,
    parse_timed_prompt,
    plan_sections,
    sections_for,
)

# Latent sizes (pixels / 8) of some 640 buckets, where the schedules' geometric bound holds.
LATENT_BUCKETS = [(52, 120), (60, 104), (80, 80), (104, 60)]


def r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


def rows(plan):
    return [(s.position, s.blank, s.layout.noisy) for s in plan.sections]


def histories(plan):
    return [(s.anchors_from, s.history()) for s in plan.sections]


def plan_for(n: int, order: str, **kw):
    return plan_sections(n, order=order, end_image=order == "anti-drifting", **kw)


# ---------------------------------------------------------------- lengths


@pytest.mark.parametrize(
    "seconds, window, sections, frames",
    [
        (1, 9, 1, 37),
        (0.01, 9, 1, 37),
        (3, 9, 2, 73),  # 2.5 rounds to even, as the release's round() does
        (5, 9, 4, 145),
        (5.0, 5, 8, 161),  # 7.5 -> 8
        (60, 9, 50, 1801),
        (3600, 9, 3000, 108001),
    ],
)
def test_sections_and_frames(seconds, window, sections, frames):
    assert sections_for(seconds, window) == sections
    assert frames_for(sections, window) == frames
    plan = plan_sections(seconds=seconds, window=window)
    assert len(plan.sections) == sections
    assert plan.frames() == frames and plan.total_latents == window * sections + 1
    assert plan.duration == pytest.approx((frames - 1) / 30)


@pytest.mark.parametrize("seconds", [0, -1, math.nan, math.inf, -math.inf, 3600.5, "5", None, True])
def test_sections_for_rejects_bad_lengths(seconds):
    with pytest.raises(ValueError, match="seconds"):
        sections_for(seconds)


@pytest.mark.parametrize("kw", [{"window": 0}, {"fps": 0}, {"window": 2.5}])
def test_sections_for_rejects_bad_window_or_fps(kw):
    with pytest.raises(ValueError, match="must be an integer"):
        sections_for(5, **kw)


def test_frames_for_rejects_bad_counts():
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="sections"):
            frames_for(bad)


@pytest.mark.parametrize(
    "n, paddings",
    [
        (1, [0]),
        (2, [1, 0]),
        (3, [2, 1, 0]),
        (4, [3, 2, 1, 0]),
        (5, [3, 2, 2, 1, 0]),
        (6, [3, 2, 2, 2, 1, 0]),
        (7, [3, 2, 2, 2, 2, 1, 0]),
        (8, [3, 2, 2, 2, 2, 2, 1, 0]),
    ],
)
def test_inverted_paddings(n, paddings):
    assert inverted_paddings(n) == paddings


# ---------------------------------------------------------------- exact plans


INVERTED = {
    1: [(0, 0, r(1, 10))],
    2: [(9, 9, r(10, 19)), (0, 0, r(1, 10))],
    3: [(18, 18, r(19, 28)), (9, 9, r(10, 19)), (0, 0, r(1, 10))],
    5: [
        (36, 27, r(28, 37)),
        (27, 18, r(19, 28)),
        (18, 18, r(19, 28)),
        (9, 9, r(10, 19)),
        (0, 0, r(1, 10)),
    ],
}
FORWARD = {n: [(9 * k, 0, r(20, 29)) for k in range(n)] for n in (1, 2, 3, 5)}
ANTI = {
    1: [(0, 0, r(1, 10))],
    2: [(9, 9, r(10, 19)), (0, 0, r(1, 10))],
    3: [(18, 18, r(19, 28)), (0, 0, r(1, 10)), (9, 0, r(1, 10))],
    5: [(36, 27, r(28, 37)), (0, 0, r(1, 10)), (27, 18, r(19, 28)), (18, 9, r(10, 19)), (9, 0, r(1, 10))],
}


@pytest.mark.parametrize(
    "order, table", [("inverted", INVERTED), ("forward", FORWARD), ("anti-drifting", ANTI)]
)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exact_rows(order, table, n):
    assert rows(plan_for(n, order)) == table[n]


def test_exact_histories_inverted():
    assert histories(plan_sections(3)) == [((0,), ()), ((0,), r(19, 28)), ((0,), r(10, 28))]
    # With an end image the end latent (bank number 28 = right after the video) closes every history.
    plan = plan_sections(3, end_image=True)
    assert plan.end_ref == 28
    assert histories(plan) == [((0,), (28,)), ((0,), r(19, 29)), ((0,), r(10, 29))]


def test_exact_histories_forward():
    plan = plan_sections(3, order="forward")
    assert plan.packing_order == "forward"
    assert histories(plan) == [((0,), (0,)), ((0,), r(0, 10)), ((0,), r(0, 19))]


def test_exact_histories_anti_drifting():
    plan = plan_sections(5, order="anti-drifting", end_image=True)
    assert plan.packing_order == "inverted"
    assert [s.position // 9 for s in plan.sections] == [4, 0, 3, 2, 1]
    assert histories(plan) == [
        ((0,), (46,)),  # next to the end image, anchored to the start across 3 windows
        ((0,), ()),  # next to the start image; its right neighbour is not known yet
        ((9,), r(37, 47)),  # gap sections: last latent of slot 0 on the left, the future on the right
        ((9,), r(28, 47)),
        ((9,), r(19, 47)),
    ]
    # S <= 2: the anti-drifting plan is the inverted one.
    for n in (1, 2):
        a, b = plan_sections(n, order="anti-drifting", end_image=True), plan_sections(n, end_image=True)
        assert a.sections == b.sections


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", range(1, 9))
def test_structure(order, n):
    plan = plan_for(n, order)
    sched = get_schedule("inverted")
    assert plan.order == order and plan.window == 9 and plan.total_latents == 9 * n + 1
    assert [s.number for s in plan.sections] == list(range(n))
    assert [s.is_last for s in plan.sections] == [False] * (n - 1) + [True]
    for s in plan.sections:
        assert s.blank == s.layout.blank and s.blank % 9 == 0
        assert s.window == range(1 + s.position, 10 + s.position)
        expected = forward_layout(sched) if order == "forward" else inverted_layout(sched, s.blank)
        assert s.layout == expected
    if order == "inverted":
        assert [s.blank // 9 for s in plan.sections] == inverted_paddings(n)
        assert [s.position for s in plan.sections] == [9 * k for k in reversed(range(n))]
    if order == "anti-drifting":
        assert [s.position // 9 for s in plan.by_position()] == list(range(n))
        assert plan.sections[0].position == 9 * (n - 1)  # next to the end image first
        if n > 1:
            assert plan.sections[1].position == 0  # then next to the start image


# ---------------------------------------------------------------- properties


@st.composite
def plans(draw):
    order = draw(st.sampled_from(ORDERS))
    n = draw(st.integers(1, 200))
    window = draw(st.sampled_from([1, 2, 5, 9, 16]))
    name = draw(st.sampled_from(["inverted", "geometric", "minimal", "f16k4f2k2f1k1_g9_ta"]))
    end = order == "anti-drifting" or (order == "inverted" and draw(st.booleans()))
    if not name.startswith("f"):
        schedule = name
    else:  # an explicit schedule must already generate `window` latents
        base = get_schedule(name)
        schedule = PackingSchedule(base.groups, window, base.tail, base.anchors)
    return plan_sections(n, order=order, window=window, schedule=schedule, end_image=end)


@settings(max_examples=60, deadline=None)
@given(plans())
def test_every_latent_generated_once(plan):
    generated = sorted(i for s in plan.sections for i in s.window)
    assert generated == list(range(1, plan.total_latents))


@settings(max_examples=60, deadline=None)
@given(plans(), st.sampled_from(LATENT_BUCKETS))
def test_context_length_is_constant_and_bounded(plan, hw):
    sched = plan.schedule
    full = sched.context_length(*hw)  # the release zero-fills a short history: every slot present
    assert full <= sched.bound(*hw)
    sizes = set()
    for s in plan.sections:
        lay = s.layout
        sizes.add(len(lay.start) + len(lay.noisy) + sum(map(len, lay.groups)) + len(lay.tail))
        assert len(lay.noisy) == plan.window and len(s.anchors_from) == len(lay.start)
        assert sched.context_length(*hw, history=len(s.history())) <= sched.bound(*hw)
    assert sizes == {
        sched.anchors + sched.generate + sched.history_frames + len(plan.sections[0].layout.tail)
    }


@settings(max_examples=60, deadline=None)
@given(plans())
def test_context_is_known_and_placed_in_time(plan):
    known = {0} | ({plan.end_ref} if plan.end_image else set())
    end = plan.total_latents
    for s in plan.sections:
        assert set(s.anchors_from) | set(s.history()) <= known
        first, last = s.window[0], s.window[-1]
        if plan.order == "forward":
            assert s.history() == tuple(range(0, first))  # everything so far, in time order
        elif s.history() and s.history()[0] != plan.end_ref:
            # history is the contiguous future right after the window, nearest first
            assert s.history()[: end - 1 - last] == tuple(range(last + 1, end))
        if plan.order == "inverted" and s.number > 0:
            assert last + 1 in known  # adjacent to the already-generated future
        if plan.order == "anti-drifting" and s.number >= 2:
            (anchor,) = s.anchors_from
            assert anchor == plan.window and anchor in known  # clean on the left
            assert s.blank <= first - 1 - anchor  # never further than the true distance
            assert s.history()[0] == (last + 1 if last + 1 < end else plan.end_ref)  # clean on the right
        if plan.order == "anti-drifting" and s.is_last and len(plan.sections) > 1:
            assert s.blank == 0 and s.anchors_from == (first - 1,)  # adjacent on both sides
        known |= set(s.window)


@settings(max_examples=60, deadline=None)
@given(plans())
def test_forward_sections_follow_each_other(plan):
    if plan.order == "forward":
        assert [s.position for s in plan.sections] == [k * plan.window for k in range(len(plan.sections))]
    else:
        assert plan.sections[0].position == plan.window * (len(plan.sections) - 1)


# ---------------------------------------------------------------- keyframes


def test_keyframes_inverted_take_the_post_slot():
    # 4 sections of 9 = 4.8 s. 1.0 s -> pixel frame 30 -> latent 8 (slot 0); 3.0 s -> latent 23 (slot 2).
    plan = plan_sections(4, keyframes=(3.0, 1.0))
    assert plan.keyframe_latents == (23, 8) and plan.keyframe_refs == (37, 38)
    by_slot = {s.position // 9: s for s in plan.sections}
    assert [by_slot[k].keyframe for k in range(4)] == [1, None, 0, None]
    assert by_slot[2].history() == (37, *range(29, 37))  # keyframe replaces history[0] (latent 28)
    assert by_slot[0].history() == (38, *range(11, 37))
    assert by_slot[3].history() == () and by_slot[1].history() == tuple(range(19, 37))


def test_keyframes_with_end_image_and_anti_drifting():
    plan = plan_sections(4, end_image=True, keyframes=(2.0,))  # latent 15, slot 1
    assert plan.end_ref == 37 and plan.keyframe_refs == (38,)
    (s,) = [s for s in plan.sections if s.keyframe == 0]
    assert s.position == 9 and s.history() == (38, *range(20, 38))
    plan = plan_sections(4, order="anti-drifting", end_image=True, keyframes=(0.1,))  # latent 1, slot 0
    (s,) = [s for s in plan.sections if s.keyframe == 0]
    assert s.number == 1 and s.history() == (38,)  # an empty history gains the keyframe


def test_keyframes_forward_take_the_anchor():
    plan = plan_sections(4, order="forward", keyframes=(4.8,))  # the last frame: latent 36, slot 3
    assert plan.keyframe_latents == (36,)
    assert [s.anchors_from for s in plan.sections] == [(0,), (0,), (0,), (37,)]
    assert plan.sections[3].history() == tuple(range(28))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"keyframes": (0.0,)}, "at the start, where the start image is"),
        ({"keyframes": (-1.0,)}, "outside the video"),
        ({"keyframes": (5.0,)}, "outside the video"),  # 5 s was asked, 4.8 s is planned
        ({"keyframes": (math.nan,)}, "finite"),
        ({"keyframes": ("1",)}, "finite"),
        ({"keyframes": (1.0, 1.1)}, "same section"),
        ({"keyframes": (4.5,), "end_image": True}, "end image"),
        ({"keyframes": (1.0,), "order": "forward", "schedule": "f1k1_g9_a0"}, "anchor"),
    ],
)
def test_keyframe_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_sections(seconds=5, **kw)


# ---------------------------------------------------------------- timed prompts


def test_parse_timed_prompt():
    assert parse_timed_prompt("  a cat walks ", 5) == [TimedPrompt(0.0, 5.0, "a cat walks")]
    text = "[3s: the cat sits]\n[0s-3s: a cat walks]  [4.5: it: sleeps]"
    assert parse_timed_prompt(text, 6) == [
        TimedPrompt(0.0, 3.0, "a cat walks"),
        TimedPrompt(3.0, 4.5, "the cat sits"),
        TimedPrompt(4.5, 6.0, "it: sleeps"),
    ]
    assert parse_timed_prompt("[0-1.5s: a][2 s - 3 s: b]", 3) == [
        TimedPrompt(0, 1.5, "a"),
        TimedPrompt(2, 3, "b"),
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("[0s-3s:   ]", "empty"),
        ("[0s-3s a cat]", "Cannot read"),
        ("[0s: a cat", "not closed"),
        ("[0s: a [cat]", "not closed"),
        ("a cat [3s: sits]", "outside brackets"),
        ("[0s: a] then [3s: b]", "outside brackets"),
        ("[x: a cat]", "Cannot read"),
        ("[-1s: a cat]", "Cannot read"),
        ("a cat]", "outside brackets"),
        ("[3s-1s: a]", "not after its start"),
        ("[0s-4s: a] [3s: b]", "overlap"),
        ("[2s: a] [2s: b]", "start at 2 s"),
        ("[0s-6s: a]", "outside the 5 s video"),
        ("[5s: a]", "outside the 5 s video"),
    ],
)
def test_parse_timed_prompt_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_timed_prompt(text, 5)


@pytest.mark.parametrize("duration", [0, -1, math.nan, math.inf])
def test_parse_timed_prompt_rejects_bad_durations(duration):
    with pytest.raises(ValueError, match="duration"):
        parse_timed_prompt("a cat", duration)


def test_prompt_assignment():
    # 5 sections of 9 at 30 fps: windows start at 0, 1.2, 2.4, 3.6 and 4.8 s.
    prompts = parse_timed_prompt("[0s-3s: a cat walks] [3s: the cat sits]", 6)
    for order in ORDERS:
        plan = plan_for(5, order, prompts=prompts)
        assert [s.prompt_index for s in plan.by_position()] == [0, 0, 0, 1, 1]
    # A boundary exactly at a window start belongs to the later prompt; unused prompts are fine.
    prompts = parse_timed_prompt("[0s: a] [1.2s: b] [1.3s: c] [2.4s: d]", 6)
    assert [s.prompt_index for s in plan_sections(5, prompts=prompts).by_position()] == [0, 1, 3, 3, 3]
    # Without prompts every section uses prompt 0.
    assert {s.prompt_index for s in plan_sections(5).sections} == {0}


def test_prompt_assignment_errors():
    with pytest.raises(ValueError, match="No prompt covers 0 s"):
        plan_sections(5, prompts=[TimedPrompt(1.0, 6.0, "late")])
    with pytest.raises(ValueError, match="overlap"):
        plan_sections(5, prompts=[TimedPrompt(0.0, 3.0, "a"), TimedPrompt(2.0, 6.0, "b")])
    with pytest.raises(ValueError, match="empty"):
        TimedPrompt(0.0, 1.0, " ")


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((), {}, "either"),
        ((4,), {"seconds": 5}, "either"),
        ((0,), {}, "sections must be"),
        ((True,), {}, "sections must be"),
        ((3001,), {}, "sections must be"),
        ((4,), {"order": "backward"}, "Unknown section order"),
        ((4,), {"order": "anti-drifting"}, "end image"),
        ((4,), {"order": "forward", "end_image": True}, "end-frame"),
        ((4,), {"window": 5, "schedule": "f16k4f2k2f1k1_g9"}, "window is 5"),
        ((4,), {"schedule": "f1k1_g9_a2"}, "at most one anchor"),
        ((4,), {"window": 0}, "window must be"),
    ],
)
def test_argument_errors(args, kw, match):
    with pytest.raises(ValueError, match=match):
        plan_sections(*args, **kw)


def test_preset_follows_the_window():
    plan = plan_sections(3, window=5)
    assert plan.schedule.generate == 5 and plan.schedule.groups == get_schedule("inverted").groups
    assert [s.layout.noisy for s in plan.sections] == [r(11, 16), r(6, 11), r(1, 6)]
