"""One section of the released 13B architecture on one GPU and split over N (sequence parallel).

Run under torchrun, one process per GPU (`bench/gpu_13b.py --ranks N` launches it, and skips with
one line when fewer GPUs are visible):

    torchrun --nproc-per-node 2 bench/gpu_parallel.py [--steps 25] [--budget 8] [--record]
    torchrun --nproc-per-node 2 bench/gpu_parallel.py --compile --fp8-compute --attention sage
    python -m torch.distributed.run --nproc-per-node 2 bench/gpu_parallel.py --spec tiny --device cpu

Every rank builds the same random bf16 weights (`gpu_13b.random_model`, seeded on its device) and
the same inputs (640x640, window 9 + released history, 512 text tokens of which `--prompt-tokens`
are real, 729 SigLIP tokens). First rank 0 samples the section alone (the others wait), then the
same section with every model call split across all ranks (`framepack.parallel`: rank 0 samples,
the others serve its calls). Prints s/frame both ways, the speed-up (target 1.8x on 2 GPUs), the
MFU per GPU and the relative error of the split section's latents against the single-GPU ones.
NCCL on CUDA, gloo on the CPU (`--spec tiny --device cpu` checks the script, not the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402
from gpu_13b import PEAK_TFLOPS, forward_flops, kernels, random_model  # noqa: E402

from framepack.parallel import Leader, SequenceParallel, serve  # noqa: E402
from framepack.pipeline.speed import accelerate  # noqa: E402
from framepack.sampling import get_sampler, sigma_schedule, velocity_to_x0  # noqa: E402
from framepack.testing import random_packed_inputs  # noqa: E402

HEADING = "## One video on several GPUs: sequence parallel (`bench/gpu_parallel.py`)"
INTRO = """
Random bf16 weights in the released 13B architecture, 640x640, window 9 + released history, one
section of 25 UniPC steps, batch 1; first on one GPU, then each model call split over N GPUs
(Ulysses all-to-all around attention). Target: 1.8x on 2 GPUs.

| date | machine | GPUs | budget | s/frame, 1 GPU | s/frame, N GPUs | speed-up | MFU per GPU | rel. error | command |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"""


def section(model, device, inputs, sigmas, leader: bool) -> tuple[torch.Tensor | None, float]:
    """One section's latents and seconds (after a warm-up call); another rank serves rank 0's calls."""
    if not leader:
        serve(model)
        return None, 0.0

    def denoise(x, sigma):
        t = (sigma * 1000).to(device)
        v = model.forward_packed(**{**inputs, "noisy": x, "timestep": t})
        return velocity_to_x0(x, v.float().to(x.device), sigma)

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda *a: None
    with torch.no_grad():
        x = inputs["noisy"].clone()
        denoise(x, sigmas[:1])  # warm-up (kernels, allocator, communicators)
        sync(device)
        start = time.perf_counter()
        out = get_sampler("unipc")(denoise, x, sigmas)
        sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", default="640x640", help="pixels, height x width")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--spec", default="hunyuan-13b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", help="each rank's VRAM budget in GiB (default: all weights resident)")
    parser.add_argument("--compile", action="store_true", help="the blocks compiled (torch.compile)")
    parser.add_argument("--fp8-compute", action="store_true", help="the blocks' products in e4m3")
    parser.add_argument("--attention", default="sdpa", help="attention kernel: sdpa, sage, flash, xformers")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the MFU (default: by name)")
    parser.add_argument("--record", action="store_true", help="append the row to bench/RESULTS.md")
    parser.add_argument("--json", metavar="FILE", help="also write the row as JSON (bench/gpu_check.py)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = random_model(args.spec, dtype, device)
    accelerate(  # on a CPU the e4m3 products and sage's arithmetic are emulated
        model,
        device,
        float(args.budget) if args.budget else None,
        compile=args.compile,
        **kernels(args, cuda),
    )
    cfg = model.config
    h, w = (int(v) // 8 for v in args.size.lower().split("x"))
    inputs = random_packed_inputs(cfg, h, w, text_tokens=512, seed=1)
    inputs["text_mask"][:, args.prompt_tokens :] = 0
    inputs["image_embeds"] = torch.randn(
        1, 729, cfg.image_proj_dim, generator=torch.Generator().manual_seed(2)
    )
    sigmas = sigma_schedule(args.steps, seq_len=9 * h * w // 4)

    one, one_s = section(model, device, inputs, sigmas, True) if rank == 0 else (None, 0.0)
    dist.barrier()
    parallel = SequenceParallel(model).attach()
    leader = Leader(model) if rank == 0 else None
    many, many_s = section(model, device, inputs, sigmas, rank == 0)
    if leader is not None:
        leader.detach()
    parallel.detach()
    if rank == 0:
        report(args, cfg, h, w, world, one, one_s, many, many_s, device)
    dist.destroy_process_group()


def report(args, cfg, h, w, world, one, one_s, many, many_s, device) -> None:
    """Print (and with --json/--record write) the row of rank 0's two sections."""
    noisy = 9 * h * w // 4
    image = noisy + 2 * h * w // 4 + 2 * (h * w // 4) // 8 + 16 * (h * w // 4) // 64
    flops = forward_flops(cfg, image, noisy, args.prompt_tokens + 729) * args.steps
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    mfu = f"{flops / many_s / (peak * 1e12) / world:.1%}" if peak else "-"
    error = ((many.float() - one.float()).norm() / one.float().norm()).item()
    row = dict(
        gpus=str(world),
        budget=args.budget or "unlimited",
        one=f"{one_s / 36:.3f}",
        many=f"{many_s / 36:.3f}",
        speedup=f"{one_s / many_s:.2f}",
        mfu=mfu,
        error=f"{error:.2e}",
    )
    print(
        f"{world} ranks ({device.type}): {row['one']} s/frame on one, {row['many']} s/frame split, "
        f"{row['speedup']}x, MFU per GPU {mfu}, relative error {row['error']}",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(row))
    if args.record:
        cells = " | ".join(row.values())
        append_rows(HEADING, INTRO, [f"| {today()} | {machine()} | {cells} | `{command()}` |"])


if __name__ == "__main__":
    main()
