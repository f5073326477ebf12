"""Per-section cost of a long generation: FramePack's packed history vs all history at k1.

Medium config (fp32), `--size` latents, window 9, the release's inverted order and packing
(`framepack.pipeline.plan_sections`, `framepack.packing.gather_history`, exactly as the
generation loop packs). Each section runs `--steps` model calls on random latents (the cost
does not depend on the values) with (a) our packed history and (b) a full-context baseline that
feeds the start latent plus *every* history latent at k1 (1x2x2 patches). Prints CPU seconds and peak
memory above the section's start (RSS sampled every 5 ms, freed heap trimmed before each section;
ours first, then the baseline) per section, and each curve's
last/first ratio (medians of the first and last `--ends` sections): ours flat, the baseline
growing with the video. The issue's target: ours last/first <= 1.05.

    python bench/sections.py [--sections 12] [--steps 2] [--size 16x16] [--record]
    python bench/sections.py --sections 50 --record        # the full 60 s video (slow: the baseline)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.model import HistoryGroup, PackedTransformer, get_spec  # noqa: E402
from framepack.pipeline.plan import plan_sections  # noqa: E402
from framepack.pipeline.sections import GenerationHistory  # noqa: E402
from framepack.pipeline.settings import GenerationSettings, Prepared  # noqa: E402

HEADING = "## Per-section cost: packed history vs all history at k1 (`bench/sections.py`)"
INTRO = """
Medium config, fp32, the release's inverted order and packing, random latents; the baseline feeds
the start latent and every history latent at k1. Seconds = process CPU time of the section's model
calls (the cores are shared with other jobs, so wall time is noisy); memory = peak RSS above the
section's start. last/first = medians of the last and first `--ends` sections (3 unless the command
says otherwise). Target: ours last/first <= 1.05.

| date | machine | latents, steps | sections | ours s/section first -> last (**ratio**) | baseline s/section first -> last (**ratio**) | ours peak MiB first -> last | baseline peak MiB first -> last | image tokens ours / baseline at the last section | command |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"""


def trim() -> None:
    """Hand freed heap memory back to the OS, so each section's RSS peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every 5 ms."""

    def __enter__(self):
        self.start = self.peak = rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.mib = (self.peak - self.start) / 2**20


def full_groups(section, bank) -> list[HistoryGroup]:
    """The start latent and every history latent, all at k1, after the noisy window in time."""
    layout = section.layout
    history = list(section.history())
    latents = bank[:, :, list(section.anchors_from) + history]
    after = max(layout.noisy) + 1
    indices = [layout.clean_k1()[0], *range(after, after + len(history))]
    return [HistoryGroup(latents, torch.tensor(indices), "k1")]


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2, help="model calls per section")
    parser.add_argument("--size", default="16x16", help="latent height x width")
    parser.add_argument("--ends", type=int, default=3, help="sections averaged at each end")
    parser.add_argument("--no-baseline", action="store_true", help="only our packed history")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    torch.manual_seed(0)
    cfg = get_spec("medium")
    model = PackedTransformer(cfg).eval()
    plan = plan_sections(args.sections, window=9)
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(1, cfg.in_channels, plan.total_latents, h, w, generator=g)
    text = torch.randn(1, 64, cfg.text_embed_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    image = torch.randn(1, 16, cfg.image_proj_dim, generator=g)
    noisy = torch.randn(1, cfg.in_channels, plan.window, h, w, generator=g)
    # The generation loop's own packing (`GenerationHistory.pack`) over the random bank.
    prepared = Prepared(
        GenerationSettings(prompt="bench"),
        plan,
        np.zeros((8 * h, 8 * w, 3), np.uint8),
        None,
        [],
        ["bench"],
        args.steps,
        10.0,
        30,
    )
    history = GenerationHistory(prepared)
    history.begin({"start_latent": bank[:, :, :1]})
    history.bank = bank

    def packed_history(section) -> list[HistoryGroup]:
        return history.pack(section, "cpu")[1]

    def section_cost(section, groups) -> tuple[float, float, int]:
        tokens = []
        hook = model.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a: tokens.append(a[0].shape[1])
        )
        with torch.no_grad(), PeakRSS() as mem:
            start = time.process_time()  # CPU seconds: steady on cores shared with other jobs
            for step in range(args.steps):
                t = torch.tensor([1000.0 * (1 - step / args.steps)])
                idx = torch.tensor(section.layout.noisy)
                model.forward_packed(
                    noisy, idx, groups, t, text, None, pooled, torch.tensor([10000.0]), image
                )
            seconds = time.process_time() - start
        hook.remove()
        return seconds, mem.mib, tokens[0]

    section_cost(plan.sections[0], packed_history(plan.sections[0]))  # warm-up
    ours, base = [], []  # two passes, so one curve's freed memory never shows in the other's
    for section in plan.sections:
        ours.append(section_cost(section, packed_history(section)))
        s, mib, tokens = ours[-1]
        print(
            f"ours     section {section.number + 1:>3}/{len(plan.sections)}: {s:7.3f} s {mib:7.1f} MiB {tokens:6d} tokens"
        )
    for section in [] if args.no_baseline else plan.sections:
        base.append(section_cost(section, full_groups(section, bank)))
        s, mib, tokens = base[-1]
        print(
            f"baseline section {section.number + 1:>3}/{len(plan.sections)}: {s:7.3f} s {mib:7.1f} MiB {tokens:6d} tokens"
        )

    k = min(args.ends, len(plan.sections))

    def ends(values):
        first, last = statistics.median(values[:k]), statistics.median(values[-k:])
        return first, last, last / first

    o_t, o_m = ends([c[0] for c in ours]), ends([c[1] for c in ours])
    print(f"ours: {o_t[0]:.3f} -> {o_t[1]:.3f} s/section, last/first {o_t[2]:.3f}")
    b_cells = ["-", "-"]
    b_tokens = "-"
    if base:
        b_t, b_m = ends([c[0] for c in base]), ends([c[1] for c in base])
        print(
            f"baseline (all history at k1): {b_t[0]:.3f} -> {b_t[1]:.3f} s/section, last/first {b_t[2]:.3f}"
        )
        b_cells = [f"{b_t[0]:.3f} -> {b_t[1]:.3f} (**{b_t[2]:.2f}**)", f"{b_m[0]:.0f} -> {b_m[1]:.0f}"]
        b_tokens = str(base[-1][2])
    if args.record:
        row = (
            f"| {today()} | {machine()} | {h}x{w}, {args.steps} | {len(plan.sections)} "
            f"| {o_t[0]:.3f} -> {o_t[1]:.3f} (**{o_t[2]:.3f}**) | {b_cells[0]} "
            f"| {o_m[0]:.0f} -> {o_m[1]:.0f} | {b_cells[1]} | {ours[-1][2]} / {b_tokens} | `{command()}` |"
        )
        append_rows(HEADING, INTRO, [row])


if __name__ == "__main__":
    main()
