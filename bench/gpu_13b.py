"""The released 13B architecture on one GPU under VRAM budgets, with and without TeaCache.

Random bf16 weights in the `hunyuan-13b` spec (no download), the 640 bucket (640x640 pixels ->
80x80 latents), window 9 with the released packed history (start + 1 at k1, 2 at k2, 16 at k4),
`--steps` UniPC steps for one section, batch 1, 512 text tokens of which `--prompt-tokens` are
real, 729 SigLIP tokens. For each budget (GiB, or "unlimited") and cache setting the transformer
is placed with `framepack.pipeline.speed.accelerate` (weights streamed from pinned host memory
through two slots on a side stream); prints the plan, peak device memory
(`torch.cuda.max_memory_allocated`), what the process holds on the card (`max_memory_reserved` plus
the measured context overhead, `framepack.memory.estimate`; the budget bounds this), seconds per generated frame (section time / 4*window),
the ratio to the unlimited budget, and the model FLOPs utilisation (analytic FLOPs of the model
calls actually computed / time / `--peak-tflops`, the dense bf16 peak, default by device name: 989
for H100/H200; `--fp8-compute` rows count their linear FLOPs against the dense e4m3 peak, twice
that, see `mfu`). Needs about 27 GB of host RAM for the weights, held once: as `load_bundle` does under a
budget, they wait on the host (pinned for CUDA) and only the planner moves them; `--transformer
DIR` loads a checkpoint that way (shard by shard) instead of random weights. `--spec tiny --device
cpu` runs the same code on a CPU in seconds (for checking the script, not for numbers).

    python bench/gpu_13b.py [--budgets 6 8 16 unlimited] [--teacache 0.15] [--steps 25] [--record]
    python bench/gpu_13b.py --budgets 4 --ram-budget 16 --teacache 0   # weights waiting on disk
    python bench/gpu_13b.py --ranks 2   # one section on 2 GPUs against one (bench/gpu_parallel.py)
    python bench/gpu_13b.py --budgets unlimited 4 --teacache 0 --compile  # torch.compile of the blocks
    python bench/gpu_13b.py --budgets unlimited --cache magcache --teacache 0.1  # another step cache
    python bench/gpu_13b.py --budgets 4 unlimited --fp8-compute          # the blocks' products in e4m3
    python bench/gpu_13b.py --budgets unlimited --teacache 0 --attention sage  # 8-bit attention

With `--ram-budget GB` the weights wait in their safetensors files (random weights are written once
to `--disk`): the streamed blocks that fit the RAM budget (less two staging slots) are kept in
pinned host memory, the rest are read from disk at every call (`framepack.memory.disk`); the plan
column then also gives the host tier and the peak RSS of the timed run (sampled every 50 ms).

With `--fp8-compute` the blocks' linear layers multiply in e4m3 (`framepack.pipeline.fp8_compute`;
<<<<<<< HEAD
streamed blocks travel as fp8 host copies); the MFU stays counted against the bf16 peak. On a CPU
(`--spec tiny --device cpu`) the e4m3 products are emulated, which checks the script, not the speed.
`--attention sage` runs SageAttention's 8-bit kernels (the `sageattention` package, CUDA); on a CPU
its arithmetic is emulated (`sage-emulate`), again a check of the script only.
=======
streamed blocks travel as fp8 host copies) and attention stays bf16, so those rows' MFU is the time
the chip would need at its peaks (the linears' FLOPs at the e4m3 peak, twice bf16's: 1979 TFLOP/s
dense on H100/H200; attention's at bf16's) over the time measured, marked "e4m3 linears"; bf16
rows are counted against the bf16 peak alone. On a CPU (`--spec tiny --device cpu`) the e4m3
products are emulated, which checks the script, not the speed.
>>>>>>> fp8left
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.caching import CACHES, reset_caches  # noqa: E402
from framepack.memory import GIB, plan_memory  # noqa: E402
from framepack.memory.estimate import (  # noqa: E402
    ALLOCATOR_MARGIN,
    DeviceNeed,
    activation_bytes,
    cache_bytes,
    device_overhead,
)
from framepack.memory.offload import pin_host  # noqa: E402
from framepack.memory.streaming import blocks_of  # noqa: E402
from framepack.model import PackedTransformer, get_spec, load_transformer, save_transformer  # noqa: E402
from framepack.pipeline.speed import accelerate  # noqa: E402
from framepack.sampling import get_sampler, sigma_schedule, velocity_to_x0  # noqa: E402
from framepack.testing import random_packed_inputs  # noqa: E402

HEADING = "## 13B on one GPU: VRAM budgets and TeaCache (`bench/gpu_13b.py`)"
INTRO = """
Random bf16 weights in the released 13B architecture, 640x640 (80x80 latents), window 9 + released
packed history, 25 UniPC steps, batch 1. s/frame = section time / 36 frames. Ratio = s/frame over
the unlimited budget's (same cache setting), measured in one run. Targets: peak <= 6 GB at the
6 GB budget (goal 4 GB), s/frame at 6 GB within 1.25x of unlimited. MFU: against the dense bf16
peak (989 TFLOP/s on H100/H200); rows marked "e4m3 linears" (`--fp8-compute`) count the blocks'
linear FLOPs against the dense e4m3 peak (twice bf16's) and attention's against bf16's.

| date | machine | budget | cache | plan | peak GiB | held GiB (<= budget) | s/frame | ratio to unlimited | skipped | MFU | command |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"""

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # bf16 dense
E4M3_PEAK = 2.0  # dense e4m3 over dense bf16 (fp32 accumulation) on the chips that have it (8.9+)


def kernels(args: argparse.Namespace, cuda: bool) -> dict:
    """`accelerate`'s `fp8_compute` and `attention` for `--fp8-compute` and `--attention`: on a CPU
    the e4m3 products and sage's arithmetic emulated (a check of the script, not of the speed)."""
    fp8 = (True if cuda else "emulate") if args.fp8_compute else False
    return dict(
        fp8_compute=fp8, attention="sage-emulate" if args.attention == "sage" and not cuda else args.attention
    )


def random_model(spec: str, dtype: torch.dtype, device: torch.device) -> PackedTransformer:
    """The architecture with N(0, 0.02) weights in `dtype` on the host, built without a float copy.

    Each tensor is drawn on `device` and copied to the host: drawing 13B numbers on one CPU thread
    takes about 100 s, on a GPU a second or two."""
    cfg = get_spec(spec)
    with torch.device("meta"):
        model = PackedTransformer(cfg).to(dtype)
    model = model.to_empty(device="cpu")  # allocated once, in `dtype`
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty(p.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=g))
    model.fp32_head = True
    return model.eval().requires_grad_(False)


def flop_parts(cfg, image_tokens: int, noisy_tokens: int, text_tokens: int) -> tuple[float, float]:
    """Matrix-product FLOPs of one forward: (the blocks' token linears, attention). The AdaLN
    modulations act on one vector per sample; embedders and the head are ignored."""
    d, mlp = cfg.inner_dim, cfg.mlp_dim
    n = image_tokens + text_tokens
    single_blocks = max(cfg.num_single_layers - 1, 0)  # and the last one, which reads out the noisy tokens
    linears = (
        cfg.num_layers * 2 * n * (4 * d * d + 2 * d * mlp)  # each stream through its own weights
        + single_blocks * 2 * n * (3 * d * d + d * mlp + (d + mlp) * d)
        + 2 * n * 3 * d * d
        + 2 * noisy_tokens * (d * mlp + (d + mlp) * d)
    )
    attention = (cfg.num_layers + single_blocks) * 4 * n * n * d + 4 * noisy_tokens * n * d
    return linears, attention


def forward_flops(cfg, image_tokens: int, noisy_tokens: int, text_tokens: int) -> float:
    """Matrix-product FLOPs of one forward (`flop_parts`, summed)."""
    return sum(flop_parts(cfg, image_tokens, noisy_tokens, text_tokens))


def mfu(parts: tuple[float, float], calls: int, seconds: float, peak: float | None, e4m3: bool) -> str:
    """The MFU cell: the time `calls` forwards of `parts` FLOPs need at the peak over `seconds`.
    `peak` is dense bf16 TFLOP/s; `e4m3` (fp8 compute): the linears at `E4M3_PEAK` times it, attention
    at bf16's, and the cell says so."""
    if not peak:
        return "nan%"
    linears, attention = parts
    ideal = calls * (linears / (E4M3_PEAK if e4m3 else 1.0) + attention) / (peak * 1e12)
    return f"{ideal / seconds:.1%}" + (" (e4m3 linears)" if e4m3 else "")


def disk_backed(model, transformer: str | None, dtype, scratch: Path | None) -> PackedTransformer:
    """`model` read back disk-backed (`load_transformer(lazy=True)`): from its checkpoint, or from
    its random weights written once to `scratch` (a temporary folder by default)."""
    directory = transformer
    if directory is None:
        directory = scratch or Path(tempfile.mkdtemp(prefix="framepack-13b-"))
        if not (Path(directory) / "config.json").exists():
            t0 = time.perf_counter()
            save_transformer(model, directory)
            print(f"wrote the weights to {directory} in {time.perf_counter() - t0:.0f} s", flush=True)
    lazy = load_transformer(directory, dtype=dtype, lazy=True)
    lazy.fp32_head = True
    return lazy


class RssSampler:
    """The peak resident set of this process, sampled every 50 ms on a thread between start and stop."""

    def __init__(self) -> None:
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> RssSampler:
        self.thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self.done.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def split_over_ranks(args: argparse.Namespace) -> int:
    """`--ranks N`: `bench/gpu_parallel.py` under torchrun, one process per GPU (one line and
    exit status 0 when fewer than N GPUs are visible); `--budgets` with one number is each rank's."""
    if args.device.startswith("cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < args.ranks:
            print(
                f"skipped: one video on {args.ranks} GPUs needs {args.ranks} visible; this machine has {visible}."
            )
            return 0
    script = Path(__file__).with_name("gpu_parallel.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
           str(script), "--spec", args.spec, "--device", args.device, "--steps", str(args.steps),
           "--size", args.size, "--prompt-tokens", str(args.prompt_tokens)]  # fmt: skip
    if len(args.budgets) == 1 and args.budgets[0] != "unlimited":
        cmd += ["--budget", args.budgets[0]]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    cmd += ["--attention", args.attention] + (["--compile"] if args.compile else [])
    cmd += ["--fp8-compute"] if args.fp8_compute else []
    cmd += (["--json", args.json] if args.json else []) + (["--record"] if args.record else [])
    return subprocess.run(cmd).returncode


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["6", "8", "16", "unlimited"])
    parser.add_argument("--teacache", type=float, default=0.15, help="threshold of the cached runs (0: none)")
    parser.add_argument("--cache", default="teacache", choices=sorted(CACHES), help="the cached runs' cache")
    parser.add_argument("--compile", action="store_true", help="the blocks compiled (torch.compile)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", default="640x640", help="pixels, height x width")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--spec", default="hunyuan-13b")
    parser.add_argument("--transformer", metavar="DIR", help="a checkpoint instead of random --spec weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fp8", action="store_true", help="fp8 host copies of the streamed blocks")
    parser.add_argument("--fp8-compute", action="store_true", help="the blocks' products in e4m3")
    parser.add_argument("--attention", default="sdpa", help="attention kernel: sdpa, sage, flash, xformers")
    parser.add_argument("--ram-budget", type=float, help="GiB of host memory; the weights wait on disk")
    parser.add_argument("--disk", type=Path, help="where random weights are written for --ram-budget")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the MFU (default: by name)")
    parser.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (bench/gpu_check.py)")
    parser.add_argument("--ranks", type=int, default=1, help="instead: one section split over N GPUs")
    args = parser.parse_args()
    if args.ranks > 1:
        sys.exit(split_over_ranks(args))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device; run with --spec tiny --device cpu to check the script on a CPU.")
    h, w = (int(v) // 8 for v in args.size.lower().split("x"))
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = args.peak_tflops
    if peak is None and cuda:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    t0 = time.perf_counter()
    if args.transformer:  # the host, shard by shard, as load_bundle under a budget
        model = load_transformer(args.transformer, dtype=dtype, device="cpu").eval().requires_grad_(False)
        model.fp32_head = True
    else:
        model = random_model(args.spec, dtype, device)
    host_budget = 0
    if args.ram_budget:  # the weights wait in their files; the host keeps what the budget allows
        model = disk_backed(model, args.transformer, dtype, args.disk)
        if cuda:
            torch.cuda.empty_cache()  # the random weights drawn on the card are gone
        block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks_of(model))
        host_budget = max(round(args.ram_budget * GIB) - 2 * block, 0)
    if cuda:
        pin_host(model)  # the host copies the planner streams from
    cfg = model.config
    print(
        f"built {args.transformer or args.spec} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B) in {time.perf_counter() - t0:.0f} s"
    )
    inputs = random_packed_inputs(cfg, h, w, text_tokens=512, seed=1)
    inputs["text_mask"][:, args.prompt_tokens :] = 0
    inputs["image_embeds"] = torch.randn(1, 729, cfg.image_proj_dim)
    noisy_tokens = 9 * h * w // 4
    image_tokens = noisy_tokens + 2 * h * w // 4 + 2 * (h * w // 4) // 8 + 16 * (h * w // 4) // 64
    parts = flop_parts(cfg, image_tokens, noisy_tokens, args.prompt_tokens + 729)
    sigmas = sigma_schedule(args.steps, seq_len=noisy_tokens)
    sampler = get_sampler("unipc")

    def denoise(x, sigma):
        t = (sigma * 1000).to(device)
        v = model.forward_packed(**{**inputs, "noisy": x, "timestep": t})
        return velocity_to_x0(x, v.float().to(x.device), sigma)

    caches = [None] + ([args.teacache] if args.teacache > 0 else [])
    results: dict[tuple[str, float | None], dict] = {}
    rows = []
    for cache in caches:
        for budget in args.budgets:
            unlimited = budget == "unlimited"
            itemsize = dtype.itemsize
            need = DeviceNeed(  # what the device holds besides weights (framepack.memory.estimate)
                activation_bytes(cfg, image_tokens, args.prompt_tokens + 729, itemsize),
                cache_bytes(cfg, args.cache if cache else None, image_tokens, noisy_tokens, itemsize),
                overhead=device_overhead(device),
                margin=ALLOCATOR_MARGIN if cuda else 0.0,
            )
            total = None if unlimited else round(float(budget) * GIB)
            if not unlimited:
                least = plan_memory(model, None, fp8=args.fp8 or args.fp8_compute).least_bytes
                try:  # as the pipeline refuses it: one sentence, then the next budget
                    need.check(total, least, args.size)
                except ValueError as e:
                    print(f"{budget} GiB: refused: {e}")
                    continue
            run = accelerate(
                model,
                device,
                None if unlimited else float(budget),
                args.cache if cache else None,
                cache or 0.0,
                fp8=args.fp8 and not unlimited,
                reserve=None if unlimited else need.reserve(total),
                host_budget=host_budget,
                compile=args.compile,
                **kernels(args, cuda),
            )
            rss = RssSampler().start()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                reset_caches(model, args.steps)
                x = inputs["noisy"].clone()
                warm = time.perf_counter()
                denoise(x, sigmas[:1])  # warm-up call (kernels, allocator, the compile), not timed
                warm = time.perf_counter() - warm
                reset_caches(model, args.steps)
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                sampler(denoise, x, sigmas)
                if cuda:
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            rss.stop()
            peak_gib = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
            # What nvidia-smi shows: the allocator's reserve plus the context and workspaces.
            held_gib = (
                (torch.cuda.max_memory_reserved(device) + need.overhead) / GIB if cuda else float("nan")
            )
            fits = "-" if unlimited or not cuda else ("yes" if held_gib <= float(budget) else "NO")
            cache_obj = run.cache
            skipped = cache_obj.stats.skipped if cache_obj is not None else 0
            computed = args.steps - skipped
            used = mfu(parts, computed, seconds, peak, bool(args.fp8_compute))
            per_frame = seconds / (4 * 9)
            plan = run.streamer.plan.describe() if run.streamer else "all resident"
            if args.ram_budget:
                kept = run.streamer.host_tier if run.streamer else 0
                plan += f"; host tier {kept / GIB:.2f} GiB, peak RSS {rss.peak / GIB:.2f} GiB"
            results[(budget, cache)] = dict(per_frame=per_frame)
            label = (f"{CACHES[args.cache].__name__} {cache}" if cache else "none") + (
                ", fp8 compute" if args.fp8_compute else ""
            )
            if args.attention != "sdpa":
                label += f", {args.attention} attention"
            if args.compile:
                label += ", compiled"
                plan += f"; first call {warm:.0f} s (compile)"
            print(
                f"budget {budget:>9} | cache {label:>13} | {plan} | peak {peak_gib:.2f} GiB | "
                f"{per_frame:.3f} s/frame | skipped {skipped}/{args.steps} | MFU {used}",
                flush=True,
            )
            rows.append(
                [
                    budget,
                    label,
                    plan,
                    f"{peak_gib:.2f}",
                    f"{held_gib:.2f} ({fits})",
                    f"{per_frame:.3f}",
                    None,
                    f"{skipped}/{args.steps}",
                    used,
                ]
            )
            run.detach()
            if cuda:
                model.to("cpu")
                pin_host(model)  # back on the host, as the next budget expects it
                torch.cuda.empty_cache()
    for row in rows:  # ratios once the unlimited runs are known
        cache = None if row[1].startswith("none") else args.teacache
        base = results.get(("unlimited", cache))
        row[6] = f"{results[(row[0], cache)]['per_frame'] / base['per_frame']:.3f}" if base else "-"
        plain = results[(row[0], None)]["per_frame"]
        speedup = plain / results[(row[0], cache)]["per_frame"]
        print(
            f"{row[0]:>9} GiB, {row[1]:>13}: {row[5]} s/frame, {row[6]}x the unlimited budget, "
            f"{speedup:.2f}x faster than without a cache"
        )
    if args.json:
        keys = ("budget", "cache", "plan", "peak_gib", "held_gib", "s_per_frame", "ratio", "skipped", "mfu")
        Path(args.json).write_text(json.dumps([dict(zip(keys, map(str, r), strict=True)) for r in rows]))
    if args.record:
        append_rows(
            HEADING,
            INTRO,
            [f"| {today()} | {machine()} | " + " | ".join(map(str, r)) + f" | `{command()}` |" for r in rows],
        )


if __name__ == "__main__":
    main()
