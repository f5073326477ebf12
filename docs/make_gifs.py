"""The README's GIFs: every generation mode run on the shipped demo model through the CLI.

    python docs/make_gifs.py            # writes docs/gifs/*.gif (a few minutes on a CPU)

Each mode is one `framepack generate` command (printed as it runs, so the README's commands are
the ones that made the pictures); its mp4 (or PNG) is turned into a small GIF, upscaled 2x with
nearest-neighbour pixels and at half the frame rate, so the files stay around 100 kB.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from framepack.io import read_video, write_bytes_atomic, write_mp4  # noqa: E402
from framepack.training.world import render, scene_from_caption  # noqa: E402

EXAMPLES = ROOT / "framepack" / "demo_model" / "examples"
START = EXAMPLES / "red_circle_moves_right.png"


def modes(work: Path) -> dict[str, list[str]]:
    """Mode name -> the `framepack generate` arguments that show it."""
    # Extension in the demo model's inverted order leads from a start image into a video: the
    # second half of a demo-world clip is the video, its first frame the start image.
    source, lead_in = work / "source.mp4", work / "lead_in.png"
    scene = scene_from_caption("a yellow square moves up on a black background", seed=900_010, frames=145)
    frames = render(scene, 145, 64)
    write_mp4(frames[72:], source, fps=30)
    Image.fromarray(frames[0]).save(lead_in)
    return {
        "image_to_video": ["--image", str(START), "--prompt", "a red circle moves right on a blue background"],
        # A LoRA trained by `framepack train docs/demo_lora_up/train.toml` on the 81 "moves up" clips.
        "lora": ["--image", str(START), "--prompt", "a red circle moves right on a blue background",
                 "--lora", str(ROOT / "docs" / "demo_lora_up") + ":1.0"],
        "text_to_video": ["--t2v-colour", "purple", "--prompt", "a white circle moves left on a purple background"],
        "loop": ["--image", str(EXAMPLES / "green_circle_moves_down.png"), "--loop",
                 "--prompt", "a green circle moves down on a yellow background"],
        "extend": ["--video", str(source), "--image", str(lead_in), "--prompt", "a yellow square moves up on a black background"],
        "one_frame": ["--image", str(EXAMPLES / "white_triangle_moves_left.png"), "--one-frame", "9",
                      "--prompt", "a white triangle moves left on a purple background"],
    }  # fmt: skip


def to_gif(frames: np.ndarray, path: Path, fps: float, scale: int = 2, every: int = 2) -> None:
    """(T, H, W, 3) uint8 -> a looping GIF, written atomically."""
    picked = frames[::every]
    images = [
        Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in picked
    ]
    with tempfile.NamedTemporaryFile(suffix=".gif", delete=False) as tmp:
        images[0].save(
            tmp.name, save_all=True, append_images=images[1:], duration=round(1000 * every / fps), loop=0
        )
    data = Path(tmp.name).read_bytes()
    os.unlink(tmp.name)
    write_bytes_atomic(data, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gifs")
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--only", nargs="*", help="mode names to make (default: all)")
    a = p.parse_args(argv)
    work = ROOT / "outputs" / "gifs"
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, args in modes(work).items():
        if a.only and name not in a.only:
            continue
        command = [
            "framepack",
            "generate",
            *args,
            "--seconds",
            str(a.seconds),
            "--out",
            str(work),
            "--name",
            name,
        ]
        print("$", shlex.join(command).replace(str(ROOT) + "/", ""), flush=True)
        subprocess.run([sys.executable, "-m", "framepack", *command[1:]], check=True, cwd=ROOT)
        if name == "one_frame":  # the start image, then the frame made from it
            start = np.asarray(Image.open(args[1]).convert("RGB"))
            made = np.asarray(Image.open(work / f"{name}.png").convert("RGB"))
            to_gif(np.stack([start, made]), a.out / f"{name}.gif", fps=1, every=1)
        else:
            frames, fps, _ = read_video(work / f"{name}.mp4")
            to_gif(frames, a.out / f"{name}.gif", fps=fps)
        print(f"wrote {a.out / name}.gif ({(a.out / f'{name}.gif').stat().st_size // 1000} kB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
