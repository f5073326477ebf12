"""8-bit attention (`--attention sage`, issue 20): its error, and on a GPU its kernel's speed.

    python bench/sage.py [--tokens 2048] [--seconds 4] [--record]      # this CPU: the emulation
    python bench/sage.py --device cuda [--tokens 19257]                # also the package's kernel

1. Attention at the 13B head shape (24 heads of 128), `--tokens` queries and keys of N(0, 1) in
   bf16, the keys with an offset every key shares (N(0, 1) per channel, as a layer's bias gives):
   relative error (Frobenius) against fp64 attention of SDPA in bf16 and of SageAttention's
   arithmetic (`framepack.model.sage_numerics`, emulated on any device); on CUDA with the
   `sageattention` package also its kernel, its difference from the emulation, and the time of
   SDPA and of the kernel (median of 5, in TFLOP/s: 4 L^2 D H per call).
2. The demo model's video of the README command in the release dtypes (bf16 transformer): PSNR of
   the `sage-emulate` frames (and on CUDA of the kernel's) against the SDPA frames.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.model.sage_numerics import sage_attention  # noqa: E402

HEADING = "## 8-bit attention (`bench/sage.py`)"
INTRO = """
SageAttention's arithmetic (INT8 Q.K per block with smoothed keys, fp16 P.V) against exact
attention at the 13B head shape, and the demo model's video against SDPA's (release dtypes).
`emulated` is `framepack.model.sage_numerics` (`--attention sage-emulate`); `kernel` is the
`sageattention` package on CUDA.

| date | machine | what | result | command |
| --- | --- | --- | --- | --- |"""


def qkv(tokens: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, 24, 128, generator=g) for _ in range(3))
    k = k + torch.randn(1, 1, 24, 128, generator=g)  # an offset every key shares
    return tuple(t.to(device, torch.bfloat16) for t in (q, k, v))


def exact(q, k, v) -> torch.Tensor:
    """fp64 attention, one head at a time (bounded memory); `(B, L, H, D)`."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[2]):
        qh, kh, vh = (t[:, :, h].double() for t in (q, k, v))
        w = torch.softmax(qh @ kh.mT / math.sqrt(q.shape[-1]), dim=-1)
        out[:, :, h] = w @ vh
    return out


def sdpa(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


def kernel(q, k, v) -> torch.Tensor:
    import sageattention

    return sageattention.sageattn(q, k - k.mean(dim=1, keepdim=True), v, tensor_layout="NHD", smooth_k=False)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def timed(fn, *args) -> float:
    """Median seconds of 5 calls after a warm-up (CUDA synchronised)."""
    fn(*args)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def attention_rows(tokens: int, device: str) -> list[tuple[str, str]]:
    q, k, v = qkv(tokens, device)
    ref = exact(q, k, v)
    emulated = sage_attention(q, k, v)
    rows = [
        (f"{tokens} tokens, 24x128 heads: SDPA bf16", f"rel. error {rel(sdpa(q, k, v), ref):.2%}"),
        (f"{tokens} tokens: emulated sage", f"rel. error {rel(emulated, ref):.2%}"),
    ]
    if device.startswith("cuda") and importlib.util.find_spec("sageattention"):
        out = kernel(q, k, v)
        rows.append(
            (
                f"{tokens} tokens: sage kernel",
                f"rel. error {rel(out, ref):.2%}, {rel(out, emulated.double()):.2%} from the emulation",
            )
        )
        flops = 4 * tokens**2 * 128 * 24
        t_sdpa, t_sage = timed(sdpa, q, k, v), timed(kernel, q, k, v)
        rows.append(
            (
                f"{tokens} tokens: time",
                f"SDPA {t_sdpa * 1e3:.1f} ms ({flops / t_sdpa / 1e12:.0f} TFLOP/s), sage {t_sage * 1e3:.1f} ms "
                f"({flops / t_sage / 1e12:.0f} TFLOP/s), {t_sdpa / t_sage:.2f}x",
            )
        )
    elif device.startswith("cuda"):
        rows.append((f"{tokens} tokens: sage kernel", "not run: the sageattention package is not installed"))
    return rows


def demo_rows(seconds: float, device: str) -> list[tuple[str, str]]:
    from framepack.io import read_video
    from framepack.pipeline.bundle import component_dtypes, load_bundle
    from framepack.pipeline.named import DEFAULT_MODEL
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings

    examples = DEFAULT_MODEL / "examples"
    image = str(examples / "red_circle_moves_right.png")
    prompt = (examples / "red_circle_moves_right.txt").read_text().strip()
    bundle = load_bundle(DEFAULT_MODEL, device=device, dtypes=component_dtypes("cuda"))
    names = ["sdpa", "sage-emulate"]
    if device.startswith("cuda") and importlib.util.find_spec("sageattention"):
        names.append("sage")
    videos = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            settings = GenerationSettings(
                prompt=prompt, image=image, seconds=seconds, name=name, attention=name
            )
            video = read_video(open_run(bundle, Request(settings)).run(tmp).video)
            videos[name] = np.asarray(video[0] if isinstance(video, tuple) else video).astype(np.float64)
    rows = []
    for name in names[1:]:
        mse = ((videos[name] - videos["sdpa"]) ** 2).mean()
        value = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
        rows.append((f"demo model, {seconds:g} s, release dtypes: {name}", f"{value:.1f} dB against SDPA"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, help="queries and keys (default: 2048 on a CPU, 19257 on CUDA)")
    parser.add_argument("--seconds", type=float, default=4.0, help="the demo video's length")
    parser.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    args = parser.parse_args()
    tokens = args.tokens or (19257 if args.device.startswith("cuda") else 2048)
    torch.manual_seed(0)
    rows = attention_rows(tokens, args.device) + demo_rows(args.seconds, args.device)
    for what, result in rows:
        print(f"{what}: {result}")
    if args.record:
        append_rows(
            HEADING, INTRO, [f"| {today()} | {machine()} | {w} | {r} | `{command()}` |" for w, r in rows]
        )


if __name__ == "__main__":
    main()
