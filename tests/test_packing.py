"""Packing schedules, token arithmetic, the geometric bound, section layouts and pooled RoPE."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack.packing import (
    K1,
    K2,
    K4,
    K8,
    PRESETS,
    Group,
    Kernel,
    PackingSchedule,
    forward_layout,
    frame_tokens,
    gather_history,
    gather_tail,
    get_schedule,
    inverted_layout,
    pooled_rope_tables,
    rope_tables,
)

# The 640 resolution buckets (pixels) divided by the VAE's 8x, and their transposes.
BUCKETS = [(52, 120), (56, 108), (60, 104), (64, 96), (68, 88), (72, 84), (76, 80)]
LATENT_BUCKETS = BUCKETS + [(w, h) for h, w in BUCKETS]
DIVISIBLE = [(16, 16), (32, 48), (80, 80), (64, 112), (128, 16)]
RELEASED = "f16k4f2k2f1k1_g9"
FAR = (50, 100, 333, 1000, 4567, 10000)


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    "text, kernel, name, pool, compression, proj",
    [
        ("k1", (1, 2, 2), "k1", (1, 1, 1), 1, "proj"),
        ("k2", (2, 4, 4), "k2", (2, 2, 2), 8, "proj_2x"),
        ("k4", (4, 8, 8), "k4", (4, 4, 4), 64, "proj_4x"),
        ("k8", (8, 16, 16), "k8", (8, 8, 8), 512, "proj_8x"),
        ("k3", (3, 6, 6), "k3", (3, 3, 3), 27, "proj_3x"),
        ("k2x4x4", (2, 4, 4), "k2", (2, 2, 2), 8, "proj_2x"),
        ("k1x2x2", (1, 2, 2), "k1", (1, 1, 1), 1, "proj"),
        ("k1x4x4", (1, 4, 4), "k1x4x4", (1, 2, 2), 4, "proj_1x4x4"),
        ("k2x4x8", (2, 4, 8), "k2x4x8", (2, 2, 4), 16, "proj_2x4x8"),
    ],
)
def test_kernel_parse(text, kernel, name, pool, compression, proj):
    k = Kernel.parse(text)
    assert (k.t, k.h, k.w) == kernel
    assert k.name == name and Kernel.parse(k.name) == k
    assert k.pool == pool
    assert k.compression == compression
    assert k.projection_name() == proj


def test_kernel_constants():
    assert (K1, K2, K4, K8) == tuple(Kernel.parse(f"k{n}") for n in (1, 2, 4, 8))


@pytest.mark.parametrize(
    "text", ["", "k", "k0", "kk2", "2", "k2x4", "k2x3x4", "k2x4x5", "k0x2x2", "k1x0x2", "K-1"]
)
def test_kernel_parse_rejects(text):
    with pytest.raises(ValueError, match="[Kk]ernel"):
        Kernel.parse(text)


def test_kernel_constructor_validates():
    with pytest.raises(ValueError):
        Kernel(1, 3, 2)
    with pytest.raises(ValueError):
        Kernel(0, 2, 2)


@settings(max_examples=60, deadline=None)
@given(
    kernel=st.sampled_from([K1, K2, K4, Kernel(1, 4, 4), Kernel(2, 4, 8), Kernel(3, 2, 6)]),
    frames=st.integers(0, 9),
    height=st.integers(1, 19),
    width=st.integers(1, 19),
)
def test_kernel_tokens_count_patches(kernel, frames, height, width):
    patches = {
        (f // kernel.t, y // kernel.h, x // kernel.w)
        for f, y, x in itertools.product(range(frames), range(height), range(width))
    }
    assert kernel.tokens(frames, height, width) == len(patches)


# ---------------------------------------------------------------- schedules


def test_released_schedule_parses():
    s = PackingSchedule.parse(RELEASED)
    assert s.groups == (Group(1, K1), Group(2, K2), Group(16, K4))
    assert (s.generate, s.tail, s.anchors) == (9, None, 1)
    assert (
        s == PRESETS["inverted"] == PRESETS["framepack-i2v"] == PRESETS["forward"] == PRESETS["framepack-f1"]
    )
    assert s.history_frames == 19
    assert s.kernels == (K1, K2, K4)
    assert s.name == RELEASED


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_names_round_trip(preset):
    s = get_schedule(preset)
    assert PackingSchedule.parse(s.name) == s
    assert get_schedule(s) is s


@pytest.mark.parametrize("tail", ["td", "ta", "tc"])
def test_tails_parse(tail):
    s = PackingSchedule.parse(f"{RELEASED}_{tail}")
    assert s.tail == tail and s.groups == PRESETS["inverted"].groups
    assert s.name == f"{RELEASED}_{tail}"


def test_explicit_kernels_and_anchors_parse():
    s = PackingSchedule.parse("f4k2x4x8f2k1x4x4f1k1_g5_tc_a2")
    assert s.groups == (Group(1, K1), Group(2, Kernel(1, 4, 4)), Group(4, Kernel(2, 4, 8)))
    assert (s.generate, s.tail, s.anchors) == (5, "tc", 2)
    assert PackingSchedule.parse(s.name) == s
    assert PackingSchedule.parse(f"{RELEASED}_a0").anchors == 0


@pytest.mark.parametrize(
    "name, part",
    [
        ("f16q4f2k2_g9", "f16q4f2k2"),
        ("f16k4", "_gN"),
        ("f16k4_g9_tx", "tx"),
        ("f16k4_g9_g9", "g9"),
        ("f16k4_g9_", "''"),
        ("f0k1_g9", "f0k1"),
        ("f1k2x3x4_g9", "f1k2x3x4"),
        ("_g9", "no frame groups"),
        ("vanilla", "vanilla"),
    ],
)
def test_bad_schedule_names(name, part):
    with pytest.raises(ValueError) as err:
        get_schedule(name)
    message = str(err.value)
    assert part in message and "inverted" in message and "geometric" in message


def test_schedule_constructor_validates():
    with pytest.raises(ValueError):
        PackingSchedule((), 9)
    with pytest.raises(ValueError):
        PackingSchedule((Group(1, K1),), 0)
    with pytest.raises(ValueError):
        PackingSchedule((Group(1, K1),), 9, tail="tx")
    with pytest.raises(ValueError):
        Group(0, K1)


# ---------------------------------------------------------------- token arithmetic


def test_released_tokens_at_480x832():
    s = get_schedule("inverted")
    assert frame_tokens(60, 104) == 1560
    assert K2.tokens(2, 60, 104) == 390  # 1 * 15 * 26
    assert K4.tokens(16, 60, 104) == 416  # 4 * ceil(7.5) * 13
    assert s.group_tokens(60, 104) == [1560, 390, 416]
    assert s.context_length(60, 104) == 1560 * (9 + 1 + 1) + 390 + 416 == 17966
    assert s.context_length(60, 104, include_noisy=False) == 17966 - 9 * 1560
    assert s.bound(60, 104) == (9 + 1 + 2) * 1560


def test_released_tokens_at_640x640():
    s = get_schedule("forward")
    assert s.group_tokens(80, 80) == [1600, 400, 400]
    assert s.context_length(80, 80) == 1600 * 11 + 800 == 18400
    assert s.bound(80, 80) == 19200


def test_partial_history_counts_frames_present():
    s = get_schedule("inverted")
    assert s.frames_present(0) == [0, 0, 0]
    assert s.frames_present(5) == [1, 2, 2]
    assert s.frames_present(100) == [1, 2, 16]
    expected = {0: 15600, 1: 17160, 2: 17550, 3: 17550, 4: 17654, 7: 17654, 8: 17758, 19: 17966, 500: 17966}
    for n, length in expected.items():
        assert s.context_length(60, 104, history=n) == length


def test_tail_tokens():
    ta = get_schedule(f"{RELEASED}_ta")
    assert ta.group_tokens(60, 104, history=19) == [1560, 390, 416]
    assert ta.group_tokens(60, 104, history=20) == [1560, 390, 416, 104]  # one k4 frame
    assert ta.group_tokens(60, 104, history=9999) == [1560, 390, 416, 104]
    tc = get_schedule(f"{RELEASED}_tc")
    assert tc.group_tokens(60, 104, history=20) == [1560, 390, 416, 1]
    td = get_schedule(f"{RELEASED}_td")
    assert td.group_tokens(60, 104, history=20) == [1560, 390, 416]
    geo = get_schedule("geometric")
    assert geo.group_tokens(60, 104, history=86) == [1560, 780, 416, 224, 1]  # k8: 8 * 4 * 7
    assert geo.context_length(60, 104, history=86) == 1560 * 10 + 2981


def test_bound_can_fail_below_the_divisibility_assumption():
    # At 2x2 latents every kernel rounds up to a whole token per time block: 1 + 1 + 4 > 2 frames.
    s = get_schedule("inverted")
    assert s.context_length(2, 2) > s.bound(2, 2)
    # A schedule exactly at the bound when 8 divides the size overflows at 60x104 (ceil(60 / 8) = 8).
    tight = get_schedule("f64k4f1k1_g9")
    assert tight.context_length(64, 104) == tight.bound(64, 104)
    assert tight.context_length(60, 104) > tight.bound(60, 104)


def _check_bounded(s: PackingSchedule, height: int, width: int) -> None:
    """context_length(n) <= bound for all n, non-decreasing in n, constant once the groups are full."""
    bound = s.bound(height, width)
    settle = s.history_frames + (1 if s.tail in ("ta", "tc") else 0)
    near = [s.context_length(height, width, history=n) for n in range(s.history_frames + 3)]
    far = [s.context_length(height, width, history=n) for n in FAR if n > s.history_frames + 2]
    lengths = near + far
    assert max(lengths) <= bound
    assert all(a <= b for a, b in itertools.pairwise(lengths))
    assert set(near[settle:] + far) == {near[settle]}
    assert s.context_length(height, width) == near[s.history_frames]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("height, width", LATENT_BUCKETS + DIVISIBLE)
def test_presets_within_bound(preset, height, width):
    _check_bounded(get_schedule(preset), height, width)


POOL = sorted([K1, Kernel(1, 4, 4), K2, Kernel(2, 4, 8), K4, K8], key=lambda k: k.compression)


@st.composite
def geometric_cases(draw):
    """A latent size divisible by every kernel and a schedule whose history costs <= 2 L_f."""
    height, width = 16 * draw(st.integers(1, 8)), 16 * draw(st.integers(1, 8))
    lf = height * width // 4
    kernels = sorted(draw(st.sets(st.sampled_from(POOL), min_size=1, max_size=4)), key=POOL.index)
    tail = draw(st.sampled_from([None, "td", "ta", "tc"]))
    block = [Fraction(4, k.h * k.w) for k in kernels]  # L_f units per t frames of each kernel
    budget = Fraction(2) - {"ta": block[-1], "tc": Fraction(1, lf)}.get(tail, 0)
    groups = []
    for i, k in enumerate(kernels):
        room = budget - sum(block[i + 1 :])  # leave one block for every later group
        blocks = draw(st.integers(1, min(int(room / block[i]), 6)))
        frames = draw(st.integers((blocks - 1) * k.t + 1, blocks * k.t))
        groups.append(Group(frames, k))
        budget -= blocks * block[i]
    s = PackingSchedule(tuple(groups), draw(st.integers(1, 12)), tail, draw(st.integers(0, 2)))
    return s, height, width


@settings(max_examples=150, deadline=None)
@given(geometric_cases())
def test_generated_schedules_within_bound(case):
    s, height, width = case
    assert PackingSchedule.parse(s.name) == s
    lf = frame_tokens(height, width)
    exact = sum(-(-g.frames // g.kernel.t) * Fraction(4 * lf, g.kernel.h * g.kernel.w) for g in s.groups)
    assert sum(s.group_tokens(height, width)) == exact
    _check_bounded(s, height, width)


# ---------------------------------------------------------------- layouts


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


@pytest.mark.parametrize(
    "blank, noisy, k1, k2, k4",
    [
        (0, (1, 2, 3, 4, 5, 6, 7, 8, 9), (10,), (11, 12), _r(13, 29)),
        (9, (10, 11, 12, 13, 14, 15, 16, 17, 18), (19,), (20, 21), _r(22, 38)),
        (27, (28, 29, 30, 31, 32, 33, 34, 35, 36), (37,), (38, 39), _r(40, 56)),
    ],
)
def test_inverted_layout(blank, noisy, k1, k2, k4):
    lay = inverted_layout(get_schedule("inverted"), blank)
    assert lay.start == (0,) and lay.noisy == noisy and lay.groups == (k1, k2, k4)
    assert lay.blank == blank and lay.tail == ()
    assert lay.clean_k1() == (0, k1[0])
    assert len(k4) == 16 and k4[-1] == 1 + blank + 9 + 1 + 2 + 16 - 1
    _assert_uses_axis_once(lay, blank_from=1)


def test_forward_layout():
    lay = forward_layout(get_schedule("forward"))
    assert lay.start == (0,)
    assert lay.groups == ((19,), (17, 18), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16))
    assert lay.noisy == (20, 21, 22, 23, 24, 25, 26, 27, 28)
    assert lay.clean_k1() == (0, 19) and lay.blank == 0 and lay.length == 29
    _assert_uses_axis_once(lay, blank_from=1)


def test_layouts_with_tail_and_anchors():
    s = get_schedule("f4k2f1k1_g3_ta_a2")
    inv = inverted_layout(s, 3)
    assert (inv.start, inv.noisy, inv.groups, inv.tail) == ((0, 1), (5, 6, 7), ((8,), (9, 10, 11, 12)), (13,))
    _assert_uses_axis_once(inv, blank_from=2)
    fwd = forward_layout(s)
    assert (fwd.start, fwd.tail, fwd.groups, fwd.noisy) == ((0, 1), (2,), ((7,), (3, 4, 5, 6)), (8, 9, 10))
    _assert_uses_axis_once(fwd, blank_from=2)


def _assert_uses_axis_once(lay, blank_from: int) -> None:
    used = list(lay.start) + list(range(blank_from, blank_from + lay.blank)) + list(lay.noisy)
    used += [i for g in lay.groups for i in g] + list(lay.tail)
    assert sorted(used) == list(range(lay.length))


def _history(frames: int) -> torch.Tensor:
    """(2, 3, T, 4, 5) latents whose frame i holds the value i + 1 (so zero padding stands out)."""
    values = torch.arange(1, frames + 1, dtype=torch.float32)
    return values.view(1, 1, frames, 1, 1).expand(2, 3, frames, 4, 5).clone()


def _frame_values(x: torch.Tensor) -> list[int]:
    assert x.shape[:2] == (2, 3) and x.shape[3:] == (4, 5)
    return [int(v) for v in x[0, 0, :, 0, 0]]


@pytest.mark.parametrize(
    "frames, k1, k2, k4",
    [
        (0, [0], [0, 0], [0] * 16),
        (2, [1], [2, 0], [0] * 16),
        (5, [1], [2, 3], [4, 5] + [0] * 14),
        (30, [1], [2, 3], list(range(4, 20))),
    ],
)
def test_gather_history_inverted(frames, k1, k2, k4):
    got = gather_history(_history(frames), get_schedule("inverted"), "inverted")
    assert [_frame_values(x) for x in got] == [k1, k2, k4]


@pytest.mark.parametrize(
    "frames, k1, k2, k4",
    [
        (0, [0], [0, 0], [0] * 16),
        (2, [2], [0, 1], [0] * 16),
        (5, [5], [3, 4], [0] * 14 + [1, 2]),
        (30, [30], [28, 29], list(range(12, 28))),
    ],
)
def test_gather_history_forward(frames, k1, k2, k4):
    got = gather_history(_history(frames), get_schedule("forward"), "forward")
    assert [_frame_values(x) for x in got] == [k1, k2, k4]


def test_gather_history_mirrors_release_slices():
    torch.manual_seed(0)
    h = torch.randn(1, 16, 25, 6, 8)
    k1, k2, k4 = gather_history(h, get_schedule("inverted"), "inverted")
    assert torch.equal(k1, h[:, :, :1]) and torch.equal(k2, h[:, :, 1:3]) and torch.equal(k4, h[:, :, 3:19])
    f1 = gather_history(h, get_schedule("forward"), "forward")
    r4, r2, r1 = h[:, :, -19:].split([16, 2, 1], dim=2)
    assert all(torch.equal(a, b) for a, b in zip(f1, [r1, r2, r4], strict=True))


def test_gather_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        gather_history(_history(3), get_schedule("inverted"), "sideways")
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        gather_history(torch.zeros(3, 4, 5), get_schedule("inverted"), "forward")


def test_gather_tail():
    h = _history(7)  # groups hold 3 frames; the tail is the other 4
    ta = get_schedule("f2k2f1k1_g9_ta")
    assert gather_tail(_history(3), ta, "inverted") is None
    assert gather_tail(h, get_schedule("f2k2f1k1_g9_td"), "inverted") is None
    inv = gather_tail(h, ta, "inverted")
    assert inv.shape == (2, 3, 1, 4, 5) and torch.all(inv == (4 + 5 + 6 + 7) / 4)
    fwd = gather_tail(h, ta, "forward")
    assert torch.all(fwd == (1 + 2 + 3 + 4) / 4)
    h[:, :, :, 0, 0] += 20.0  # space matters for tc only
    tc = gather_tail(h, get_schedule("f2k2f1k1_g9_tc"), "forward")
    assert tc.shape == (2, 3, 1, 1, 1) and torch.allclose(tc, torch.full_like(tc, 2.5 + 1.0))


# ---------------------------------------------------------------- rope


def test_pooled_rope_identity_pool():
    idx = torch.tensor([0, 3, 4])
    for a, b in zip(pooled_rope_tables(idx, 3, 5, (1, 1, 1)), rope_tables(idx, 3, 5), strict=True):
        assert torch.equal(a, b)


def test_pooled_rope_is_mean_of_k1_tables():
    idx = torch.tensor([[5, 6, 7], [0, 2, 9]])  # (B, T)
    t, h, w = 3, 3, 5
    k1 = [x.view(2, t, h, w, -1) for x in rope_tables(idx, h, w)]
    k2 = pooled_rope_tables(idx, h, w, K2.pool)
    assert k2[0].shape == (2, 2 * 2 * 3, 16 + 56 + 56)
    for full, pooled in zip(k1, k2, strict=True):
        assert torch.allclose(pooled[:, 0], full[:, 0:2, 0:2, 0:2].mean(dim=(1, 2, 3)), atol=1e-6)
        # Token (1, 0, 2): time block 1 holds frame 2 twice, width block 2 holds column 4 twice.
        edge = full[:, 2, 0:2, 4].mean(dim=1)
        assert torch.allclose(pooled[:, 1 * 6 + 0 * 3 + 2], edge, atol=1e-6)


def test_rope_tables_per_batch_row():
    idx = torch.tensor([[0, 1], [4, 9]])
    for pool in [(1, 1, 1), K2.pool]:
        cos, sin = pooled_rope_tables(idx, 2, 4, pool)
        assert not torch.allclose(cos[0], cos[1]) and not torch.allclose(sin[0], sin[1])
        for row in range(2):
            c1, s1 = pooled_rope_tables(idx[row], 2, 4, pool)
            assert torch.equal(cos[row], c1[0]) and torch.equal(sin[row], s1[0])


def test_pack_command_reports_the_tail_token(capsys):
    """`framepack pack`: every history length's count agrees with the summary line (the geometric
    preset's pooled tail token appears once the history outgrows its 85 slots)."""
    from framepack.cli.main import main

    assert main(["pack", "geometric", "--size", "640x640", "--history", "85", "86", "10000"]) == 0
    out = capsys.readouterr().out.splitlines()
    counts = [int(line.split("context ")[1].split()[0]) for line in out if line.startswith("history")]
    assert counts[1] == counts[2] == counts[0] + 1
    assert out[-1].startswith(
        f"slots full (85 latents): {counts[0]} tokens; any longer history: {counts[2]} tokens"
    )
    assert main(["pack", "nonsense"]) == 2
