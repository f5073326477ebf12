"""The video writing cost per section: re-encoding everything vs the job directory's segments.

Feeds the same incremental decode (inverted order, window 9, a cheap causal stand-in for the VAE so
only the writing is timed) to two writers after every section:

- rewrite: `write_mp4` of every frame so far (the loop before job directories; grows with length);
- segments: `SegmentedVideo` (encode the newly settled frames once and the blending tail, then
  remux all segments into the playable mp4 with `concat_mp4`).

Both produce a playable mp4 of every frame so far after every section. Prints the median seconds
per section over the first and last 5 sections.

    python bench/video_writes.py [--sections 50] [--size 128] [--record]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from framepack.io import read_video, write_mp4
from framepack.pipeline.decode import IncrementalDecoder, to_uint8_frames
from framepack.pipeline.jobs import JobDir
from framepack.pipeline.video_output import SegmentedVideo

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Video writing per section: rewrite vs segments (`bench/video_writes.py`)"
INTRO = """
Inverted order, window 9, 30 fps, crf 16; a causal stand-in for the VAE (latent -> 4 frames,
8x nearest upsampling, smooth latents) so only the writing is timed. "rewrite" encodes every frame
so far after each section (the loop before job directories); "segments" encodes the newly settled
frames once plus the 33-frame tail and remuxes all segments (`SegmentedVideo`, what the loop does
now). Median wall seconds per section over the first and last 5 sections.

| date | machine | size | sections, frames | rewrite s/section first -> last | segments s/section first -> last | same frame count | command |
| --- | --- | --- | --- | --- | --- | --- | --- |"""


def causal_decode(latents: torch.Tensor) -> torch.Tensor:
    x = latents[:, :3].tanh()
    x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    return x.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)  # (1, 3, 4n - 3, 8h, 8w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=50)
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels (multiple of 16)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    ws, n = 9, args.sections
    total = ws * n + 1
    side = args.size // 8
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(1, 16, total, 1, 1, generator=g).expand(1, 16, total, side, side).clone()
    bank += 0.1 * torch.randn(1, 16, total, side, side, generator=g)

    rewrite, segments = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = IncrementalDecoder(causal_decode, ws)
        video = SegmentedVideo(
            JobDir(root / "v.job"), IncrementalDecoder(causal_decode, ws), True, 30, 16, False
        )
        for k in range(n):
            lo = 1 + (n - 1 - k) * ws
            lo = lo if lo > 1 else 0
            full.update(bank, lo, total)
            t0 = time.perf_counter()
            write_mp4(to_uint8_frames(full.frames), root / "rewrite.mp4")  # the decoder keeps floats
            rewrite.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            video.update(bank, lo, total, k, final=k == n - 1)  # includes its (cheap) decode
            video.write(root / "segments.mp4", {})
            video.prune()
            segments.append(time.perf_counter() - t0)
            print(
                f"section {k + 1}/{n}: rewrite {rewrite[-1]:.3f} s, segments {segments[-1]:.3f} s", flush=True
            )
        same = read_video(root / "rewrite.mp4")[0].shape == read_video(root / "segments.mp4")[0].shape

    def ends(xs):
        return statistics.median(xs[:5]), statistics.median(xs[-5:])

    (r0, r1), (s0, s1) = ends(rewrite), ends(segments)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    cmd = f"`python bench/video_writes.py --sections {n} --size {args.size} --record`"
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {machine} | {args.size} px | {n}, {4 * total - 3} | "
        f"{r0:.3f} -> {r1:.3f} | {s0:.3f} -> {s1:.3f} | {'yes' if same else 'NO'} | {cmd} |"
    )
    print(row)
    if args.record:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if HEADING not in text:
            text = text.rstrip("\n") + f"\n\n{HEADING}\n{INTRO}\n"
        head, _, rest = text.partition(HEADING)
        section, sep, tail = rest.partition("\n## ")
        text = head + HEADING + section.rstrip("\n") + "\n" + row + "\n" + (sep + tail if sep else "")
        RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
