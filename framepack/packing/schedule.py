"""Packing schedules: patchify kernels, frame groups and their token arithmetic.

FramePack (Zhang & Agrawala, arXiv 2504.12626, section 3) patchifies the most important history
frames with the base (1, 2, 2) kernel and less important ones with larger 3D kernels, so the
context length stays below a geometric bound however long the history grows. Sizes here are in
latent units (pixels / 8); a k1 token covers a 2 x 2 latent patch of one frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "Kernel",
    "K1",
    "K2",
    "K4",
    "K8",
    "Group",
    "PackingSchedule",
    "TAILS",
    "PRESETS",
    "get_schedule",
    "frame_tokens",
]

TAILS = (None, "td", "ta", "tc")
"""Tail options for history frames past the last group: none, delete, time-average, global pool."""

_KERNEL_RE = re.compile(r"k(\d+)(?:x(\d+)x(\d+))?")
_GROUP_RE = re.compile(r"f(\d+)(k\d+(?:x\d+x\d+)?)")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Kernel:
    """A patchify kernel `(t, h, w)` in latent frames and latent pixels; k1 = (1, 2, 2) is the base patch."""

    t: int
    h: int
    w: int

    def __post_init__(self) -> None:
        if min(self.t, self.h, self.w) < 1 or self.h % 2 or self.w % 2:
            raise ValueError(
                f"Kernel ({self.t}, {self.h}, {self.w}) is invalid: t must be >= 1 and h, w even and >= 2."
            )

    @classmethod
    def parse(cls, text: str) -> Kernel:
        """Read `"kN"` as `(N, 2N, 2N)` (k1, k2, k4, k8) or an explicit `"k2x4x4"` as `(2, 4, 4)`."""
        m = _KERNEL_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(
                f"Cannot read kernel {text!r}: expected 'kN' (e.g. 'k2') or 'kTxHxW' (e.g. 'k2x4x4')."
            )
        if m.group(2) is None:
            n = int(m.group(1))
            if n < 1:
                raise ValueError(f"Kernel {text!r} is invalid: N in 'kN' must be >= 1.")
            return cls(n, 2 * n, 2 * n)
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    @property
    def _cubic(self) -> bool:
        return self.h == self.w == 2 * self.t

    @property
    def name(self) -> str:
        """`"kN"` for `(N, 2N, 2N)` kernels, else `"k{t}x{h}x{w}"`; round-trips through `parse`."""
        return f"k{self.t}" if self._cubic else f"k{self.t}x{self.h}x{self.w}"

    @property
    def pool(self) -> tuple[int, int, int]:
        """The kernel divided by the base patch: the RoPE pooling window, (2, 2, 2) for k2."""
        return (self.t, self.h // 2, self.w // 2)

    @property
    def compression(self) -> int:
        """Token reduction relative to k1: 8 for k2, 64 for k4."""
        return self.t * self.h * self.w // 4

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Tokens for `frames` latent frames of `height x width` latents (replicate-padded up to the kernel)."""
        if frames < 0 or height < 1 or width < 1:
            raise ValueError(f"Cannot count tokens for {frames} frames of {height}x{width} latents.")
        if frames == 0:
            return 0
        return _ceil_div(frames, self.t) * _ceil_div(height, self.h) * _ceil_div(width, self.w)

    def projection_name(self) -> str:
        """Name of this kernel's input projection: `proj` (k1), `proj_2x` (k2), `proj_4x` (k4), ..."""
        if self == K1:
            return "proj"
        return f"proj_{self.t}x" if self._cubic else f"proj_{self.t}x{self.h}x{self.w}"


K1 = Kernel(1, 2, 2)
K2 = Kernel(2, 4, 4)
K4 = Kernel(4, 8, 8)
K8 = Kernel(8, 16, 16)


def frame_tokens(height: int, width: int) -> int:
    """`L_f`: k1 tokens of one latent frame (480x832 pixels = 60x104 latents -> 1560)."""
    return K1.tokens(1, height, width)


@dataclass(frozen=True)
class Group:
    """`frames` consecutive history latents patchified with one `kernel`."""

    frames: int
    kernel: Kernel

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"A packing group needs at least one frame, got {self.frames}.")


@dataclass(frozen=True)
class PackingSchedule:
    """Which history latents are packed with which kernel (paper section 3.1).

    `groups` go from most to least important: group 0 holds `history[0]`, the frame nearest to the
    generated window. `generate` is the window size `ws`; `anchors` counts the clean k1 frames kept
    outside the history (the start frame). `tail` handles history past the groups: `None`/`"td"`
    drop it, `"ta"` averages it over time into one frame patchified with the last group's kernel,
    `"tc"` global-average-pools it into a single token.
    """

    groups: tuple[Group, ...]
    generate: int
    tail: str | None = None
    anchors: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("A packing schedule needs at least one group.")
        if self.generate < 1:
            raise ValueError(f"A packing schedule must generate at least one frame, got {self.generate}.")
        if self.tail not in TAILS:
            raise ValueError(f"Unknown tail option {self.tail!r}: use None, 'td', 'ta' or 'tc'.")
        if self.anchors < 0:
            raise ValueError(f"The number of anchor frames cannot be negative, got {self.anchors}.")

    @classmethod
    def parse(cls, name: str) -> PackingSchedule:
        """Read a preset or a paper name such as `"f16k4f2k2f1k1_g9"` (least important group first).

        Suffixes after the groups: `_g{ws}` (required), a tail `_td`/`_ta`/`_tc`, and `_a{n}` for
        a number of anchors other than 1.
        """
        text = name.strip()
        if text in PRESETS:
            return PRESETS[text]
        head, *suffixes = text.split("_")
        groups, pos = [], 0
        while pos < len(head):
            m = _GROUP_RE.match(head, pos)
            if m is None:
                raise _bad(name, f"cannot read {head[pos:]!r} as groups like 'f16k4'")
            try:
                groups.append(Group(int(m.group(1)), Kernel.parse(m.group(2))))
            except ValueError as e:
                raise _bad(name, f"group {m.group(0)!r} is invalid ({str(e).rstrip('.')})") from None
            pos = m.end()
        if not groups:
            raise _bad(name, "it has no frame groups")
        generate, tail, anchors = None, None, None
        for part in suffixes:
            if re.fullmatch(r"g\d+", part) and generate is None:
                generate = int(part[1:])
            elif part in ("td", "ta", "tc") and tail is None:
                tail = part
            elif re.fullmatch(r"a\d+", part) and anchors is None:
                anchors = int(part[1:])
            else:
                raise _bad(name, f"the suffix {part!r} is unknown or repeated")
        if generate is None:
            raise _bad(name, "the window size suffix '_gN' is missing")
        return cls(tuple(reversed(groups)), generate, tail, 1 if anchors is None else anchors)

    @property
    def name(self) -> str:
        """Canonical paper-style name (least important group first); `parse(name)` gives it back."""
        out = "".join(f"f{g.frames}{g.kernel.name}" for g in reversed(self.groups)) + f"_g{self.generate}"
        if self.tail is not None:
            out += f"_{self.tail}"
        if self.anchors != 1:
            out += f"_a{self.anchors}"
        return out

    @property
    def history_frames(self) -> int:
        """History latents the groups hold."""
        return sum(g.frames for g in self.groups)

    @property
    def kernels(self) -> tuple[Kernel, ...]:
        """Distinct kernels of the groups, in order of first use; each needs its own projection."""
        return tuple(dict.fromkeys(g.kernel for g in self.groups))

    def frames_present(self, history: int | None = None) -> list[int]:
        """Frames in each group when `history` latents exist (None: every slot full)."""
        n = self.history_frames if history is None else history
        if n < 0:
            raise ValueError(f"History length cannot be negative, got {n}.")
        out = []
        for g in self.groups:
            out.append(min(g.frames, n))
            n -= out[-1]
        return out

    def group_tokens(self, height: int, width: int, history: int | None = None) -> list[int]:
        """Tokens per group for `height x width` latents and `history` latents available.

        `history=None` means every slot is full (the release zero-fills a short history, so it
        always feeds this many). A partly filled group counts only the frames present. With a
        `"ta"`/`"tc"` tail and `history > history_frames`, one extra entry holds the tail tokens.
        """
        out = [
            g.kernel.tokens(f, height, width)
            for g, f in zip(self.groups, self.frames_present(history), strict=True)
        ]
        if history is not None and history > self.history_frames:
            if self.tail == "ta":
                out.append(self.groups[-1].kernel.tokens(1, height, width))
            elif self.tail == "tc":
                out.append(1)
        return out

    def context_length(
        self, height: int, width: int, history: int | None = None, include_noisy: bool = True
    ) -> int:
        """Image-stream tokens of one section: anchors, packed history and (optionally) the noisy window."""
        lf = frame_tokens(height, width)
        total = self.anchors * lf + sum(self.group_tokens(height, width, history))
        return total + (self.generate * lf if include_noisy else 0)

    def bound(self, height: int, width: int, lam: float = 2.0) -> float:
        """The paper's geometric bound `(S + A + lam / (lam - 1)) * L_f` with S = generate, A = anchors.

        It holds for any history length when the history costs at most `lam / (lam - 1)` frames'
        worth of k1 tokens. The ceil of odd sizes can break it at tiny sizes (e.g. 2x2 latents,
        where a k4 token costs as much as a k1 one); it holds when `height` and `width` are
        multiples of every kernel, and for the presets at every 640-bucket size.
        """
        if lam <= 1:
            raise ValueError(f"The compression ratio lambda must be > 1, got {lam}.")
        return (self.generate + self.anchors + lam / (lam - 1)) * frame_tokens(height, width)


def _bad(name: str, why: str) -> ValueError:
    presets = ", ".join(sorted(PRESETS))
    return ValueError(
        f"Cannot read packing schedule {name!r}: {why}; use a preset ({presets}) "
        "or a paper name such as 'f16k4f2k2f1k1_g9'."
    )


_RELEASED = PackingSchedule((Group(1, K1), Group(2, K2), Group(16, K4)), generate=9)

PRESETS: dict[str, PackingSchedule] = {
    # The released models: start anchor + 1 k1 + 2 k2 + 16 k4, window 9. The inverted (I2V) and
    # F1 (forward) models pack the same groups; only the time layout differs (see layout.py).
    "inverted": _RELEASED,
    "framepack-i2v": _RELEASED,
    "forward": _RELEASED,
    "framepack-f1": _RELEASED,
    # Each coarser level holds 4x the frames of the previous one and costs half as many tokens:
    # 1 + 1/2 + 1/4 + 1/8 L_f over 85 latents, then the rest of the history in one pooled token.
    "geometric": PackingSchedule(
        (Group(1, K1), Group(4, K2), Group(16, K4), Group(64, K8)), generate=9, tail="tc"
    ),
    # The smallest context: one clean k1 history frame.
    "minimal": PackingSchedule((Group(1, K1),), generate=9),
}


def get_schedule(name_or_schedule: str | PackingSchedule) -> PackingSchedule:
    """A preset name, a paper name such as `"f16k4f2k2f1k1_g9"`, or a schedule passed through."""
    if isinstance(name_or_schedule, PackingSchedule):
        return name_or_schedule
    if not isinstance(name_or_schedule, str):
        raise ValueError(f"A packing schedule is a name or a PackingSchedule, got {type(name_or_schedule)}.")
    return PackingSchedule.parse(name_or_schedule)
