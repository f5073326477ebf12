"""Frame hashes of every mode on the demo model, through the front ends a user runs.

A refactor must leave every output bit-identical. `--record` runs each mode below (the CLI for most,
the API, the batch command and the GUI's job queue for the rest) and writes the SHA-256 of its
frames (decoded mp4, PNG frames, GIF, or the one-frame PNG) to `bench/frame_hashes.json`;
`--check` runs them again and names every mode whose frames changed. Hashes of float work depend on
the CPU's instructions and thread count (one thread here), so record and check on one machine:

    python bench/frame_hashes.py --record    # before the change
    python bench/frame_hashes.py --check     # after it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack.cli.main import main  # noqa: E402
from framepack.io import read_video  # noqa: E402

RECORD = Path(__file__).with_name("frame_hashes.json")
EXAMPLES = ROOT / "framepack" / "demo_model" / "examples"
START, OTHER = EXAMPLES / "red_circle_moves_right.png", EXAMPLES / "green_circle_moves_down.png"
CAPTION = (EXAMPLES / "red_circle_moves_right.txt").read_text().strip()
LORA = ROOT / "docs" / "demo_lora_up"
BASE = ["--image", str(START), "--prompt", CAPTION, "--sections", "2", "--steps", "3", "--png"]
# The smallest budget that streams every block of the demo model at 64x64 (framepack.testing's
# tight_budget, rounded up): the blocks stream, the encoders and the VAE visit the device.
TIGHT = "0.061"

# A forward extension of the source video: no start image, its own prompt and length.
FORWARD_EXTENSION = ["!", "--video", "{source}", "--order", "forward", "--prompt", CAPTION, "--sections", "1",
                     "--steps", "3", "--png"]  # fmt: skip

# name -> the arguments after `framepack generate` (BASE first unless the mode starts with "!")
CLI_MODES = {
    "image-to-video": [],
    "end image": ["--end-image", str(OTHER)],
    "anti-drifting": ["--order", "anti-drifting", "--end-image", str(OTHER), "--sections", "3"],
    "keyframes": ["--keyframe", f"1.2:{OTHER}"],
    "timed prompts": ["--prompt-at", "1.2:a green circle moves down"],
    "text-to-video": [
        "!",
        "--prompt",
        CAPTION,
        "--sections",
        "1",
        "--steps",
        "3",
        "--png",
        "--t2v-colour",
        "#204080",
    ],
    "loop": ["--loop", "--gif"],
    "forward order": ["--order", "forward"],
    "LoRA on the fly": ["--lora", f"{LORA}:1.0"],
    "LoRA merged": ["--lora", f"{LORA}:1.0", "--lora-merge"],
    "TeaCache": ["--teacache", "0.5", "--steps", "4"],
    "first-block cache": ["--cache", "fbcache:1.0", "--steps", "4"],
    "VRAM budget": ["--vram-budget", TIGHT],
    "fp8 host copies": ["--vram-budget", TIGHT, "--fp8-weights"],
    "Euler, fixed shift": ["--sampler", "euler", "--shift", "3"],
    "real CFG, rescale": ["--cfg", "3", "--cfg-rescale", "0.5", "--negative-prompt", "a blue square"],
    "release dtypes": ["--dtype", "release"],
    "release dtypes, end image": ["--dtype", "release", "--end-image", str(OTHER)],
    "window 5, 320 fps 24": ["--window", "5", "--fps", "24", "--width", "80", "--height", "64"],
    "one-frame": ["!", "--image", str(START), "--prompt", CAPTION, "--steps", "3", "--one-frame", "9"],
    "one-frame, reference": [
        "!",
        "--image",
        str(START),
        "--prompt",
        CAPTION,
        "--steps",
        "3",
        "--one-frame",
        "5",
        "--one-frame-groups",
        "post",
        "--end-image",
        str(OTHER),
    ],  # fmt: skip
    "one-frame, release dtypes": [
        "!",
        "--image",
        str(START),
        "--prompt",
        CAPTION,
        "--steps",
        "3",
        "--one-frame",
        "9",
        "--dtype",
        "release",
        "--cfg",
        "2",
        "--negative-prompt",
        "a blue square",
    ],  # fmt: skip
    "extension (inverted), release dtypes": [
        "--video",
        "{source}",
        "--order",
        "inverted",
        "--sections",
        "1",
        "--dtype",
        "release",
    ],  # fmt: skip
    "extension (inverted)": ["--video", "{source}", "--order", "inverted", "--sections", "1"],
    "extension (forward)": FORWARD_EXTENSION,
    "extension (forward), release dtypes": [*FORWARD_EXTENSION, "--dtype", "release"],
}


def digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def outputs(folder: Path, name: str) -> str:
    """The hash of everything visual a run wrote as `name` in `folder`."""
    parts = []
    if (folder / f"{name}.mp4").is_file():
        parts.append(read_video(folder / f"{name}.mp4")[0])
    pngs = sorted((folder / f"{name}_frames").glob("*.png"))
    parts += [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    if (folder / f"{name}.png").is_file():
        parts.append(np.asarray(Image.open(folder / f"{name}.png").convert("RGB")))
    if (folder / f"{name}.gif").is_file():
        with Image.open(folder / f"{name}.gif") as gif:
            for i in range(gif.n_frames):
                gif.seek(i)
                parts.append(np.asarray(gif.convert("RGB")))
    assert parts, f"no output named {name} in {folder}"
    return digest(parts)


def cli(args: list[str], out: Path, name: str) -> str:
    argv = ["generate", *args, "--out", str(out), "--name", name]
    code = main(argv)
    assert code == 0, f"framepack {' '.join(argv)} exited {code}"
    return outputs(out, name)


def run_modes(work: Path) -> dict[str, str]:
    import framepack

    hashes = {}
    source = work / "source.mp4"
    cli([*BASE[:-1], "--sections", "1"], work, "source")  # a 37-frame video for the extensions
    for name, extra in CLI_MODES.items():
        args = extra[1:] if extra[:1] == ["!"] else [*BASE, *extra]
        args = [a.replace("{source}", str(source)) for a in args]
        t0 = time.perf_counter()
        hashes[name] = cli(
            args, work / "cli", name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        )
        print(f"{name}: {hashes[name][:16]} ({time.perf_counter() - t0:.1f} s)", flush=True)

    # The API, from pixels; stopped after its first section, then resumed through the CLI and the API.
    pixels = np.asarray(Image.open(START).convert("RGB"))
    settings = dict(prompt=CAPTION, sections=3, steps=3, png=True)
    framepack.generate(out_dir=work / "api", image=pixels, name="api", **settings)
    hashes["API, pixels"] = outputs(work / "api", "api")
    for how in ("cli", "api"):
        folder, seen = work / f"resume-{how}", []

        def stop_after_one(event, seen=seen):
            seen.append(type(event).__name__)

        try:
            framepack.generate(
                out_dir=folder, image=str(START), name="r", cancel=lambda s=seen: "SectionDone" in s,
                on_event=stop_after_one, **settings,
            )  # fmt: skip
        except Exception as e:  # Cancelled
            assert type(e).__name__ == "Cancelled", e
        if how == "cli":
            assert main(["generate", "--resume", str(folder / "r.job")]) == 0
        else:
            framepack.generate(resume=folder / "r.job")
        hashes[f"resumed ({how})"] = outputs(folder, "r")

    # A batch of a generation, an extension and a one-frame job.
    jobs = work / "jobs.jsonl"
    lines = [
        dict(prompt=CAPTION, image=str(START), sections=1, steps=3, name="b0", png=True),
        dict(prompt=CAPTION, video=str(source), order="forward", sections=1, steps=3, name="b1", png=True),
        dict(prompt=CAPTION, image=str(OTHER), steps=3, one_frame=7, name="b2"),
    ]
    jobs.write_text("".join(json.dumps(j) + "\n" for j in lines))
    assert main(["batch", str(jobs), "--out", str(work / "batch"), "--device", "cpu"]) == 0
    for j in lines:
        hashes[f"batch {j['name']}"] = outputs(work / "batch", j["name"])

    # The GUI's job queue (what the server runs): a generation and a one-frame job.
    hashes.update(gui_queue(work / "gui"))
    return hashes


def gui_queue(out: Path) -> dict[str, str]:
    from framepack.gui.jobs import DONE, JobQueue
    from framepack.pipeline.bundle import load_bundle
    from framepack.pipeline.named import DEFAULT_MODEL

    GenerationSettings = __import__("framepack").GenerationSettings
    queue = JobQueue(load_bundle(DEFAULT_MODEL), out)
    try:
        a = queue.submit(
            GenerationSettings(prompt=CAPTION, image=str(START), sections=2, steps=3, name="g0", png=True)
        )
        b = queue.submit(
            GenerationSettings(prompt=CAPTION, image=str(OTHER), steps=3, name="g1"), one_frame=9
        )
        for job in (a, b):
            assert queue.wait(job.id, 600).state == DONE, queue.get(job.id).error
    finally:
        queue.close()
    return {"GUI queue g0": outputs(out, "g0"), "GUI queue one-frame g1": outputs(out, "g1")}


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", action="store_true", help=f"write the hashes to {RECORD.name}")
    what.add_argument("--check", action="store_true", help=f"compare with {RECORD.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="framepack-hashes-") as tmp:
        hashes = run_modes(Path(tmp))
    if args.record:
        RECORD.write_text(json.dumps(hashes, indent=1) + "\n")
        print(f"{len(hashes)} modes recorded in {RECORD}")
        return 0
    recorded = json.loads(RECORD.read_text())
    changed = [m for m in recorded if hashes.get(m) != recorded[m]]
    new = [m for m in hashes if m not in recorded]
    for m in changed:
        print(f"CHANGED: {m}")
    print(
        f"{len(recorded) - len(changed)} of {len(recorded)} modes bit-identical"
        + (f"; new: {new}" if new else "")
    )
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main_())
