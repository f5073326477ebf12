"""The encoders and the VAE under the VRAM budget: same video, within the budget, at what cost?

A whole generation with a bundle (default: a tiny random one; `--model` a bundle directory) under
three budgets: none, everything (all resident), and "tight" (the VAE beside the transformer's
non-block weights and one streamed block, so the encoders and the VAE visit the device one at a
time and every block streams). Prints, per budget: the plans, whether the video is bit-identical
to the unbudgeted one, the byte ledger's peak against the budget, and the time ratio (best of
`--repeats` in process CPU time; the 2 shared cores make wall time meaningless). Then the VAE's
decode activation estimate (`offload.vae_decode_bytes`) against the measured peak of live tensors
(`measure.LiveBytes`) for the bundle's VAE and, with `--release-vae`, for the release's VAE
architecture (random weights, fp32, about 30 s on a CPU).

    python bench/offload.py [--model DIR] [--sections 2] [--steps 4] [--repeats 2] [--release-vae] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.io import read_video  # noqa: E402
from framepack.memory import GIB  # noqa: E402
from framepack.memory.budgets import format_bytes  # noqa: E402
from framepack.memory.measure import LiveBytes  # noqa: E402
from framepack.memory.offload import module_bytes, vae_decode_bytes  # noqa: E402
from framepack.pipeline.budget import bundle_need  # noqa: E402
from framepack.pipeline.run import Request, open_run  # noqa: E402
from framepack.pipeline.settings import GenerationSettings, prepare  # noqa: E402
from framepack.testing import tight_budget  # noqa: E402

HEADING = "## Encoders and VAE under the VRAM budget (`bench/offload.py`)"
INTRO = """
A whole generation (64x64 start image) with every weight under the budget; "tight" holds the VAE
beside the transformer's non-block weights and one block (every budget adds the run's activations and
decode room), so the encoders and the VAE visit the
device one at a time and every block streams. Peak = the byte ledger's maximum over the run; time
ratio = best of N in process CPU time against no budget.

| date | machine | bundle | budget | plans | identical | peak / budget | time ratio | command |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |"""
VAE_HEADING = "## VAE decode activations: estimate against measured (`bench/offload.py`)"
VAE_INTRO = """
`offload.vae_decode_bytes` (5 full-resolution tensors of the widest late channels, one temporal
tile of at most 17 frames) against the peak of live tensors during an untiled decode on a CPU
(`measure.LiveBytes`, fp32).

| date | VAE | latents | estimate | measured | estimate / measured | command |
| --- | --- | --- | --- | --- | --- | --- |"""


def _generations(bundle, args) -> list[str]:
    image = np.full((64, 64, 3), 90, np.uint8)
    image[16:48, 20:44] = (200, 30, 30)
    total = sum(module_bytes(m) for m in bundle.modules().values())
    run = GenerationSettings(prompt="a red square moves right", sections=args.sections, steps=args.steps)
    prepared = prepare(bundle, run, image=image)
    budgets = {  # each with room for what the run holds besides its weights
        "none": None,
        "everything": total + bundle_need(bundle, prepared).working,
        "tight": tight_budget(bundle, prepared),  # the VAE beside the non-block weights and one block
    }
    out = Path(tempfile.mkdtemp(prefix="bench-offload-"))
    rows, reference, base_time = [], None, None
    for name, budget in budgets.items():
        times = []
        for rep in range(args.repeats):
            settings = GenerationSettings(
                prompt="a red square moves right",
                sections=args.sections,
                steps=args.steps,
                name=f"{name}{rep}",
                vram_budget=None if budget is None else budget / GIB,
            )
            start = time.process_time()
            done = open_run(bundle, Request(settings, image)).run(out)
            times.append(time.process_time() - start)
        frames = read_video(done.video)[0]
        reference = frames if reference is None else reference
        base_time = min(times) if base_time is None else base_time
        identical = "yes" if np.array_equal(frames, reference) else "no"
        peak = done.info.get("device_weights_peak_bytes")
        plans = "; ".join(done.info[k] for k in ("offload", "memory_plan") if k in done.info) or "-"
        ratio = min(times) / base_time
        shown = "-" if budget is None else f"{format_bytes(peak)} / {format_bytes(budget)}"
        print(f"{name:>10}: {plans}; identical {identical}; peak {shown}; time ratio {ratio:.3f}")
        label = name if budget is None else f"{name} ({format_bytes(budget)})"
        rows.append(
            f"| {today()} | {machine()} | {args.model or 'tiny (random)'} | {label} | {plans} | {identical} "
            f"| {shown} | **{ratio:.3f}** | `{command()}` |"
        )
    return rows


def _estimates(vaes: dict, shapes) -> list[str]:
    rows = []
    for name, vae in vaes.items():
        vae.disable_tiling()
        for shape in shapes:
            with torch.no_grad(), LiveBytes() as live:
                vae.decode(torch.randn(shape))
            estimate = vae_decode_bytes(vae, shape)
            ratio = estimate / live.peak
            latents = "x".join(str(d) for d in shape[2:])
            print(
                f"{name:>12} {latents:>8}: estimate {format_bytes(estimate)}, measured {format_bytes(live.peak)}, ratio {ratio:.2f}"
            )
            rows.append(
                f"| {today()} | {name} | {latents} | {format_bytes(estimate)} | {format_bytes(live.peak)} "
                f"| **{ratio:.2f}** | `{command()}` |"
            )
    return rows


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle directory (default: a tiny random bundle)")
    parser.add_argument("--sections", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--release-vae", action="store_true", help="also the release's VAE architecture")
    parser.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    args = parser.parse_args()
    if args.model:
        from framepack.pipeline.bundle import load_bundle

        bundle = load_bundle(args.model)
    else:
        from framepack.testing import tiny_bundle

        bundle = tiny_bundle()
    rows = _generations(bundle, args)
    vaes = {"bundle's": bundle.vae}
    if args.release_vae:
        from diffusers import AutoencoderKLHunyuanVideo

        vaes["release arch"] = AutoencoderKLHunyuanVideo().eval()  # random weights: sizes only
    torch.manual_seed(0)
    vae_rows = _estimates(vaes, [(1, 16, 2, 8, 8), (1, 16, 3, 12, 12)])
    if args.record:
        append_rows(HEADING, INTRO, rows)
        append_rows(VAE_HEADING, VAE_INTRO, vae_rows)


if __name__ == "__main__":
    main()
