"""`--fp8-compute` quality on this CPU, with the e4m3 products emulated (issue 20, part 2).

    python bench/fp8.py [--tokens 384] [--text 128] [--seconds 4] [--record]

1. Blocks at the 13B width: one dual-stream and one single-stream block of the released
   architecture (hidden 3072, 24 heads of 128, MLP 12288), weights N(0, 0.02) in bf16 as
   `bench/gpu_13b.py` draws them, `--tokens` image and `--text` text tokens of N(0, 1) activations.
   Relative error (Frobenius) of each block's outputs against the same block in fp32 (the same
   bf16 weights, upcast): bf16 compute beside fp8 compute (emulated), and fp8 against bf16.
2. The demo model's video of the README command (`framepack generate --image
   red_circle_moves_right.png --prompt ... --seconds 4`), transformer in bf16 (`--dtype release`
   on this CPU): PSNR of the fp8-compute (emulated) frames against the bf16 frames, and of both
   against fp32.
The emulation quantises exactly as the GPU path (`framepack.model.fp8`) and multiplies in fp32, so
the errors are those of a GPU run up to the kernel's summation order; the speed is not (GPU rows:
`bench/gpu_13b.py --fp8-compute`).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.model import get_spec  # noqa: E402
from framepack.model.layers import DualStreamBlock, SingleStreamBlock  # noqa: E402
from framepack.pipeline.fp8_compute import Fp8Compute  # noqa: E402

EXAMPLE = ROOT / "framepack" / "demo_model" / "examples" / "red_circle_moves_right.png"
PROMPT = "a red circle moves right on a blue background"
HEADING = "## fp8 compute quality, emulated on the CPU (`bench/fp8.py`)"
INTRO = """Relative error of block outputs at the 13B width (random N(0, 0.02) bf16 weights, N(0, 1)
activations) against fp32, and PSNR of the demo model's README video (bf16 transformer) with the
e4m3 products emulated. Speed is a GPU matter: `bench/gpu_13b.py --fp8-compute`.

| date | machine | tokens (image + text) | dual block: bf16 / fp8 vs fp32, fp8 vs bf16 | single block: bf16 / fp8 vs fp32, fp8 vs bf16 | demo video: fp8 vs bf16, bf16 vs fp32, fp8 vs fp32 | command |
| --- | --- | --- | --- | --- | --- | --- |"""


class TwoBlocks(nn.Module):
    """One block of each kind, where `blocks_of` looks for them."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([DualStreamBlock(dim, heads, mlp_ratio)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(dim, heads, mlp_ratio)])


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def block_errors(tokens: int, text: int) -> dict[str, tuple[float, float, float]]:
    """block -> (bf16 vs fp32, fp8 vs fp32, fp8 vs bf16) relative errors of its outputs."""
    cfg = get_spec("hunyuan-13b")
    dim, heads = cfg.inner_dim, cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    blocks = TwoBlocks(dim, heads, cfg.mlp_ratio).to(torch.bfloat16).eval().requires_grad_(False)
    for p in blocks.parameters():  # as bench/gpu_13b.py draws them
        p.copy_(torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g))
    x = torch.randn(1, tokens, dim, generator=g)  # (B, N, D)
    c = torch.randn(1, text, dim, generator=g)  # (B, M, D)
    temb = torch.randn(1, dim, generator=g)  # (B, D)
    angles = torch.rand(1, tokens, 1, dim // heads // 2, generator=g) * 2 * math.pi
    rope = torch.polar(torch.ones_like(angles), angles)  # (B, N, 1, Dh/2) complex

    def outputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dual, single = blocks.transformer_blocks[0], blocks.single_transformer_blocks[0]
        xd, cd, td = x.to(dtype), c.to(dtype), temb.to(dtype)
        with torch.no_grad():
            xo, co = dual(xd, cd, td, rope, None)
            h = single(torch.cat([xo, co], dim=1), td, rope, None)
        return torch.cat([xo, co], dim=1), h

    blocks.float()  # the drawn bf16 values, exactly
    reference = outputs(torch.float32)
    blocks.to(torch.bfloat16)  # and back, exactly
    bf16 = outputs(torch.bfloat16)
    fp8 = Fp8Compute(blocks, emulate=True).attach()
    try:
        quantised = outputs(torch.bfloat16)
    finally:
        fp8.detach()
    return {
        name: (_rel(bf16[i], reference[i]), _rel(quantised[i], reference[i]), _rel(quantised[i], bf16[i]))
        for i, name in enumerate(("dual", "single"))
    }


def demo_video(seconds: float, out: Path) -> dict[str, np.ndarray]:
    """The README command's frames: transformer in bf16 with and without fp8 compute, and fp32."""
    from framepack.io import read_video
    from framepack.pipeline.bundle import component_dtypes, load_bundle
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings

    frames = {}
    for name, dtypes, fp8 in (
        ("fp32", None, False),
        ("bf16", component_dtypes("cuda"), False),
        ("fp8", component_dtypes("cuda"), "emulate"),
    ):
        bundle = load_bundle(ROOT / "framepack" / "demo_model", dtypes=dtypes)
        settings = GenerationSettings(
            prompt=PROMPT, image=str(EXAMPLE), seconds=seconds, name=name, fp8_compute=fp8
        )
        start = time.perf_counter()
        finished = open_run(bundle, Request(settings)).run(out)
        video = read_video(finished.video)
        frames[name] = np.asarray(video[0] if isinstance(video, tuple) else video).astype(np.float64)
        print(f"demo video {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=384, help="image tokens through the blocks")
    parser.add_argument("--text", type=int, default=128, help="text tokens through the blocks")
    parser.add_argument("--seconds", type=float, default=4.0, help="the demo video's length")
    parser.add_argument("--record", action="store_true", help="append the row to bench/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)

    errors = block_errors(args.tokens, args.text)
    print("13B-width block outputs, relative error   bf16 vs fp32   fp8 vs fp32   fp8 vs bf16")
    for name, (b, f, fb) in errors.items():
        print(f"  {name + '-stream block':<38} {b:>12.4f} {f:>13.4f} {fb:>13.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        frames = demo_video(args.seconds, Path(tmp))
    video = (
        psnr(frames["fp8"], frames["bf16"]),
        psnr(frames["bf16"], frames["fp32"]),
        psnr(frames["fp8"], frames["fp32"]),
    )
    print(f"demo video ({args.seconds:g} s), PSNR          fp8 vs bf16    bf16 vs fp32   fp8 vs fp32")
    print(f"  {'':<38} {video[0]:>9.1f} dB {video[1]:>10.1f} dB {video[2]:>10.1f} dB")
    if args.record:
        cell = lambda e: f"{e[0]:.4f} / {e[1]:.4f}, {e[2]:.4f}"  # noqa: E731
        row = (
            f"| {today()} | {machine()} | {args.tokens} + {args.text} | {cell(errors['dual'])} | "
            f"{cell(errors['single'])} | {video[0]:.1f} dB, {video[1]:.1f} dB, {video[2]:.1f} dB | `{command()}` |"
        )
        append_rows(HEADING, INTRO, [row])


if __name__ == "__main__":
    main()
