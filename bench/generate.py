"""Per-section cost over a long run: is FramePack's per-section compute flat in the video length?

Builds a tiny bundle (`framepack.testing.make_tiny_bundle`: real encoder / VAE classes, random
weights; by default its transformer is swapped for the `medium` spec narrowed to the tiny
encoders' widths, so the sampler does real work) and runs `framepack.pipeline.run.open_run(...).run(...)`
for `--sections` sections, timing every section from the events it emits:

- sampling: from the section's `Stage("sampling")` to its last `StepEvent` (every model call of
  the section, with its packed history); FramePack's promise is that this stays flat;
- VAE decode: the incremental decoder's `vae_decode` calls (the new window + one window of
  overlap), timed by wrapping `framepack.pipeline.conditioning.vae_decode`;
- blend + uint8: the rest of the decoding stage, which cross-fades into and converts the whole
  pixel video so far (grows with length);
- mp4 write: `write_mp4` in `framepack.pipeline.video_output`, which encodes the newly settled
  frames and the blending tail after every section;
- prep: gathering the history and drawing the noise, before sampling starts;
- total: `SectionDone.seconds`.

The wrappers only time the calls. Also reports the peak RSS and the RSS after each section.

    python bench/generate.py [--sections 50] [--resolution 128] [--steps 4] [--model medium] [--record]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import framepack.pipeline.conditioning as conditioning_module
import framepack.pipeline.video_output as video_module
from framepack.pipeline.events import SectionDone, Stage, StepEvent
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Generation loop: per-section cost over a long run (`bench/generate.py`)"
INTRO = """
Tiny bundle (`make_tiny_bundle`, random weights) with the transformer given, inverted order,
window 9, Euler sampler, one 30 fps mp4 rewritten after every section. Sampling = model calls of
a section (from its `Stage("sampling")` to its last `StepEvent`); first / last are the medians of
the first and last 5 sections. Target: sampling last / first <= 1.05. The decode column is the
VAE only; "video so far" is the blend into and uint8 conversion of all pixels plus the mp4
rewrite of all frames, which grow with the video by design of the writer, not of the sampler.

| date | machine | config | sections, frames | sampling s/section first -> last (ratio) | VAE decode s first -> last | video so far (blend + uint8 + mp4) s first -> last | total s/section first -> last (ratio) | peak RSS, RSS after first -> last section | command |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def build_bundle(directory: Path, args) -> Path:
    """A tiny bundle at `args.resolution` / `args.steps`; `--model medium` swaps in a wider transformer."""
    from framepack.model import PackedTransformer, get_spec, save_transformer
    from framepack.testing import make_tiny_bundle

    root = make_tiny_bundle(
        directory / "bundle",
        order=args.order,
        resolution=args.resolution,
        steps=args.steps,
        window=args.window,
    )
    if args.model != "tiny":
        tiny = get_spec("tiny")
        spec = get_spec(args.model).replace(
            text_embed_dim=tiny.text_embed_dim,
            pooled_projection_dim=tiny.pooled_projection_dim,
            image_proj_dim=tiny.image_proj_dim,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_transformer(PackedTransformer(spec), root / "transformer")
    return root


@dataclass
class Section:
    number: int
    start: float = 0.0  # perf_counter when the section's sampling stage began
    sampled: float = 0.0  # ... when its last step ended
    decoding: float = 0.0  # ... when its decoding stage began
    done: float = 0.0
    total: float = 0.0  # SectionDone.seconds
    decode: float = 0.0  # VAE decode seconds
    write: float = 0.0  # mp4 write seconds
    rss: float = 0.0
    frames: int = 0

    @property
    def sampling(self) -> float:
        return self.sampled - self.start

    @property
    def video_so_far(self) -> float:
        """Blend + uint8 conversion of all pixels, and the mp4 rewrite."""
        return self.done - self.decoding - self.decode

    @property
    def blend(self) -> float:
        return self.video_so_far - self.write

    @property
    def prep(self) -> float:
        return self.total - (self.done - self.start)


@dataclass
class Recorder:
    sections: list[Section] = field(default_factory=list)
    current: Section | None = None

    def on_event(self, event) -> None:
        now = time.perf_counter()
        if isinstance(event, Stage) and event.name == "sampling":
            self.current = Section(len(self.sections), start=now)
            self.sections.append(self.current)
        elif isinstance(event, StepEvent):
            self.current.sampled = now
        elif isinstance(event, Stage) and event.name == "decoding":
            self.current.decoding = now
        elif isinstance(event, SectionDone):
            s = self.current
            s.done, s.total, s.frames, s.rss = now, event.seconds, event.frames, rss_mib()
            print(
                f"section {s.number + 1:3d}/{event.sections}: total {s.total:6.3f} s | sampling {s.sampling:6.3f} "
                f"| VAE decode {s.decode:6.3f} | blend+uint8 {s.blend:6.3f} | mp4 {s.write:6.3f} "
                f"| prep {s.prep:6.3f} | {s.frames:5d} frames | RSS {s.rss:7.1f} MiB",
                flush=True,
            )

    def timed(self, fn, attribute: str):
        """`fn` wrapped to add its wall time to the current section's `attribute`."""

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.current is not None:
                    setattr(
                        self.current,
                        attribute,
                        getattr(self.current, attribute) + time.perf_counter() - start,
                    )

        return wrapper


def ends(values: list[float], k: int) -> tuple[float, float]:
    """Medians of the first and the last `k` values."""
    return statistics.median(values[:k]), statistics.median(values[-k:])


def summary(rec: Recorder, k: int) -> dict:
    secs = rec.sections
    out = {}
    for name in ("sampling", "decode", "blend", "write", "video_so_far", "total", "prep"):
        values = [getattr(s, name) for s in secs]
        first, last = ends(values, k)
        out[name] = dict(
            first=first,
            last=last,
            ratio=last / first if first > 0 else float("nan"),
            median=statistics.median(values),
            first_raw=values[0],
            last_raw=values[-1],
        )
    return out


def record(args, stats: dict, rec: Recorder, peak: float, command: str) -> None:
    s = stats
    cpu = platform.processor() or platform.machine()
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__} "
        f"| {args.model} transformer, {args.resolution} px, {args.steps} steps "
        f"| {len(rec.sections)}, {rec.sections[-1].frames} "
        f"| {s['sampling']['first']:.3f} -> {s['sampling']['last']:.3f} (**{s['sampling']['ratio']:.3f}**) "
        f"| {s['decode']['first']:.3f} -> {s['decode']['last']:.3f} "
        f"| {s['video_so_far']['first']:.3f} -> {s['video_so_far']['last']:.3f} "
        f"| {s['total']['first']:.3f} -> {s['total']['last']:.3f} ({s['total']['ratio']:.2f}) "
        f"| {peak:.0f} MiB, {rec.sections[0].rss:.0f} -> {rec.sections[-1].rss:.0f} MiB "
        f"| `{command}` |\n"
    )
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if HEADING not in text:
        text = text.rstrip("\n") + "\n\n" + HEADING + "\n" + INTRO + row
    else:  # insert after the last row of this heading's table
        head, rest = text.split(HEADING, 1)
        lines = rest.split("\n")
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        lines.insert(last + 1, row.rstrip("\n"))
        text = head + HEADING + "\n".join(lines)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"recorded in {RESULTS}")


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=128, help="bucket setting (pixels), multiple of 16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--order", default="inverted", choices=["inverted", "forward"])
    parser.add_argument("--model", default="medium", choices=["tiny", "medium"], help="transformer spec")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    args = parser.parse_args()
    if args.sections < 2:
        parser.error("--sections must be at least 2.")
    command = "python bench/generate.py " + " ".join(sys.argv[1:])

    from framepack.pipeline.bundle import load_bundle

    with tempfile.TemporaryDirectory(prefix="framepack-bench-") as tmp:
        root = build_bundle(Path(tmp), args)
        bundle = load_bundle(root)
        n_params = sum(p.numel() for p in bundle.transformer.parameters())
        image = np.random.default_rng(0).integers(
            0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8
        )
        settings = GenerationSettings(
            prompt="a cat walks in the rain", sections=args.sections, sampler="euler"
        )
        print(
            f"{args.sections} sections, {args.order} order, {args.resolution} px, {args.steps} steps, "
            f"window {args.window}, {args.model} transformer ({n_params / 1e6:.1f} M params), "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        rec = Recorder()
        originals = video_module.write_mp4, conditioning_module.vae_decode
        video_module.write_mp4 = rec.timed(video_module.write_mp4, "write")  # where the segments are written
        conditioning_module.vae_decode = rec.timed(conditioning_module.vae_decode, "decode")
        try:
            started = time.perf_counter()
            run = open_run(bundle, Request(settings, image))
            finished = run.run(Path(tmp) / "out", on_event=rec.on_event)
            wall = time.perf_counter() - started
        finally:
            video_module.write_mp4, conditioning_module.vae_decode = originals
    peak = peak_rss_mib()

    k = max(1, min(5, len(rec.sections) // 4))
    stats = summary(rec, k)
    print(
        f"\n{finished.frames} frames in {wall:.1f} s; first / last = medians of the first / last {k} sections"
    )
    print(
        f"{'seconds per section':<22} {'first':>8} {'last':>8} {'median':>8} {'last/first':>10}   (raw first, last)"
    )
    for name, label in (
        ("sampling", "sampling"),
        ("decode", "VAE decode"),
        ("blend", "blend + uint8"),
        ("write", "mp4 write"),
        ("prep", "history + noise"),
        ("total", "total"),
    ):
        r = stats[name]
        print(
            f"{label:<22} {r['first']:8.3f} {r['last']:8.3f} {r['median']:8.3f} {r['ratio']:10.3f}"
            f"   ({r['first_raw']:.3f}, {r['last_raw']:.3f})"
        )
    ratio = stats["sampling"]["ratio"]
    print(f"sampling last/first {ratio:.3f}: {'meets' if ratio <= 1.05 else 'misses'} the 1.05 target")
    print(
        f"peak RSS {peak:.0f} MiB; RSS after the first section {rec.sections[0].rss:.0f} MiB, "
        f"after the last {rec.sections[-1].rss:.0f} MiB"
    )
    if args.record:
        record(args, stats, rec, peak, command)


if __name__ == "__main__":
    main()
