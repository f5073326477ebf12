"""The first thing to run on a lent GPU: is framepack correct there, and how fast is it.

One command, no downloads, up to about 10 minutes on one H100/H200:
1. every mode through the real CLI (`framepack generate`, in this process) with the shipped demo
   model, in the release's GPU dtypes (bf16 transformer, fp16 encoders and VAE) and in fp32: each
   must finish, and the PSNR of its frames against fp32 is the bf16-vs-fp32 table;
2. the two budgeted modes (streaming + offload, and with fp8 host copies) at the smallest budget
   the CLI accepts (it names it when it refuses a smaller one), with what the process held on the
   card (`max_memory_reserved` plus the measured CUDA context) checked against the budget;
3. `bench/sage.py`: 8-bit attention (`--attention sage`), the `sageattention` kernel against its
   emulation and exact attention at the 13B head shape, its speed against SDPA, and the demo video;
4. `bench/gpu_13b.py` in a fresh process: the released 13B architecture with random bf16 weights
   drawn on the device, 640x640, 25 UniPC steps, at budgets 4 and 6 GiB and unlimited, with and
   without TeaCache 0.15 (s/frame, MFU, peak, held against the budget), and with `--fp8-compute`,
   `--compile`, MagCache, `--attention sage`, and all three speed levers together;
5. `bench/gpu_13b.py --ranks 2`: one 13B section on 2 GPUs against one (sequence parallel, target
   1.8x), skipped with one line when fewer than 2 GPUs are visible (on a CPU: 2 gloo processes).
`--fp8-compute` (the e4m3 products) runs on a GPU of compute capability 8.9 or newer; elsewhere its
mode checks the CLI's one-sentence refusal instead.
It prints one summary table and, on CUDA (or with --record), appends it to bench/RESULTS.md; the
exit status is 1 when any check fails. `--device cpu --quick` runs the same code at tiny sizes
(the tiny spec for the 13B part), so CI keeps it from rotting.

    python bench/gpu_check.py --time-limit 540     # on CUDA (a 10-minute device call)
    python bench/gpu_check.py --time-limit 540 --skip-modes  # a second call: the 13B part alone
    python bench/gpu_check.py --device cpu --quick # what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.cli.main import main as cli  # noqa: E402
from framepack.memory import GIB  # noqa: E402
from framepack.memory.estimate import device_overhead  # noqa: E402
from framepack.model.fp8 import fp8_unsupported  # noqa: E402
from framepack.pipeline.named import DEFAULT_MODEL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = DEFAULT_MODEL / "examples"
START, OTHER = EXAMPLES / "red_circle_moves_right.png", EXAMPLES / "green_circle_moves_down.png"
CAPTION = (EXAMPLES / "red_circle_moves_right.txt").read_text().strip()
LORA = ROOT / "docs" / "demo_lora_up"
PSNR_FLOOR = 30.0  # dB against fp32: a dtype or precision bug lands far below (the CPU tier: 33-62)

HEADING = "## GPU check (`bench/gpu_check.py`)"
INTRO = """
Every mode through the CLI with the demo model in the release's GPU dtypes against fp32 (PSNR of
the frames), the budgeted modes at the smallest budget the CLI accepts (held = max_memory_reserved
+ the CUDA context, against the budget), and `bench/gpu_13b.py` (13B, random weights, 640x640,
25 steps). One row per check.

| date | machine | check | result | detail | command |
| --- | --- | --- | --- | --- | --- |"""


def modes(sections: int) -> list[tuple[str, list[str]]]:
    """(name, CLI arguments) of every mode, with the demo model's examples."""
    i2v = ["--image", str(START), "--prompt", CAPTION, "--sections", str(sections)]
    timed = f"[0s: {CAPTION}] [1.2s: a green circle moves down]"
    return [
        ("image-to-video", i2v),
        ("end image", [*i2v, "--end-image", str(OTHER)]),
        ("anti-drifting", [*i2v, "--order", "anti-drifting", "--end-image", str(OTHER)]),
        ("keyframes", [*i2v, "--keyframe", f"1.2:{OTHER}"]),
        ("timed prompts", ["--image", str(START), "--prompt", timed, "--sections", "2"]),  # 2.4 s
        ("text-to-video", ["--prompt", CAPTION, "--sections", "1"]),
        ("loop", [*i2v, "--loop"]),
        ("one-frame", ["--image", str(START), "--prompt", CAPTION, "--one-frame", "9"]),
        ("extension (inverted)", ["--image", str(START), "--prompt", CAPTION, "--sections", "1"]),
        ("extension (forward)", ["--prompt", CAPTION, "--sections", "1", "--order", "forward"]),
        ("forward order", [*i2v, "--order", "forward"]),
        ("LoRA on the fly", [*i2v, "--lora", str(LORA)]),
        ("LoRA merged", [*i2v, "--lora", str(LORA), "--lora-merge"]),
        ("TeaCache", [*i2v, "--teacache", "0.5"]),
        ("first-block cache", [*i2v, "--cache", "fbcache:1.0"]),
        ("MagCache", [*i2v, "--cache", "magcache:0.3"]),
        ("compiled blocks", [*i2v, "--compile"]),
        ("VRAM budget", [*i2v, "--vram-budget", "smallest"]),
        ("fp8 compute", [*i2v, "--fp8-compute"]),  # its fp32 run is plain: PSNR of e4m3 against fp32
        ("sage attention", [*i2v, "--attention", "sage"]),  # the same: 8-bit attention against fp32
        ("fp8 host copies", [*i2v, "--vram-budget", "smallest", "--fp8-weights"]),
        # Below the bundle's size: every streamed block is read from its file into a pinned staging
        # slot and copied to the card (the disk tier's CUDA path), the encoders visit from their files.
        ("RAM budget", [*i2v, "--vram-budget", "smallest", "--ram-budget", "below-bundle"]),
        ("Euler", [*i2v, "--sampler", "euler"]),
        ("UniPC", [*i2v, "--sampler", "unipc"]),
        ("real CFG, negative prompt", [*i2v, "--cfg", "3", "--negative-prompt", "a blue square"]),
    ]


def run_cli(args: list[str]) -> tuple[int, str, float]:
    """`framepack generate ARGS` in this process: exit status, what it wrote to stderr, seconds."""
    err = io.StringIO()
    start = time.perf_counter()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        status = cli(["generate", *args])
    return status, err.getvalue(), time.perf_counter() - start


def frames(out: Path, name: str) -> np.ndarray:
    """A run's frames: its PNG frames, or the one-frame PNG."""
    files = sorted((out / f"{name}_frames").glob("*.png")) or [out / f"{name}.png"]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return -math.inf
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def smallest_budget(args: list[str]) -> str | None:
    """The budget the CLI names when it refuses a far too small one (before any loading)."""
    status, err, _ = run_cli([*args, "--vram-budget", "0.001"])
    found = re.search(r"give --v?ram-budget ([0-9.]+) or more", err)  # a CPU under --ram-budget: RAM
    return found.group(1) if status == 2 and found else None


def check_mode(name: str, args: list[str], common: list[str], out: Path, cuda: bool) -> list[list[str]]:
    """Rows for one mode: it runs in both precisions, PSNR against fp32, and for a budget the peak."""
    slug = re.sub(r"\W+", "_", name).strip("_")
    if "--fp8-compute" in args and not (cuda and fp8_unsupported("cuda") is None):
        return [_refused(name, [*args, *common, "--out", str(out / "refused")], "compute capability 8.9")]
    if "sage" in args and not (cuda and importlib.util.find_spec("sageattention")):
        return [_refused(name, [*args, *common, "--out", str(out / "refused")], "attention 'sage'")]
    png = [] if "--one-frame" in args else ["--png"]
    results = {}
    for dtype in ("fp32", "release"):
        run_args = [*args, *common, "--dtype", dtype]
        if dtype == "fp32":  # fp8 compute and 8-bit attention are measured against the plain fp32 run
            run_args = plain(run_args)
        if "below-bundle" in run_args:  # on CUDA below the demo bundle's 20-33 MB; on a CPU any
            run_args[run_args.index("below-bundle")] = "0.01" if cuda else "2"  # keeps them on disk
        budget = None
        if "smallest" in run_args:  # the budget the CLI names for this run in this dtype
            at = run_args.index("smallest")
            rest = [*run_args[: at - 1], *run_args[at + 1 :]]
            budget = smallest_budget([*rest, "--out", str(out / "refused")])
            if budget is None:
                return [
                    [name, "FAIL", f"--dtype {dtype}: no smallest budget named when 0.001 GiB was refused"]
                ]
            run_args[at] = budget
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        status, err, seconds = run_cli([*run_args, *png, "--out", str(out / dtype), "--name", slug])
        if status != 0:
            last = err.strip().splitlines()[-1] if err.strip() else "no message"
            return [[name, "FAIL", f"--dtype {dtype} exited {status}: {last[:300]}"]]
        held = (torch.cuda.max_memory_reserved() + device_overhead("cuda")) / GIB if cuda else None
        results[dtype] = (frames(out / dtype, slug), seconds, held, budget)
    value = psnr(results["release"][0], results["fp32"][0])
    pixels, seconds, held, budget = results["release"]
    rows = [
        [
            name,
            "ok" if value >= PSNR_FLOOR else "FAIL",
            f"{value:.1f} dB vs fp32, {len(pixels)} frame(s), {seconds:.1f} s",
        ]
    ]
    if budget is not None:
        if held is None:  # a CPU: what the sidecar's ledger counted
            info = json.loads((out / "release" / f"{slug}.json").read_text())
            used, what = info["device_weights_peak_bytes"] / GIB, "weights"
        else:
            used, what = held, "held (reserved + context)"
        ok = used <= float(budget)
        rows.append(
            [f"{name}: peak", "ok" if ok else "FAIL", f"{what} {used:.3f} GiB <= budget {budget} GiB"]
        )
    return rows


def plain(args: list[str]) -> list[str]:
    """`args` without `--fp8-compute` and `--attention NAME`."""
    out = [a for a in args if a != "--fp8-compute"]
    if "--attention" in out:
        at = out.index("--attention")
        del out[at : at + 2]
    return out


def _refused(name: str, args: list[str], phrase: str) -> list[str]:
    """Where a kernel cannot run (the e4m3 products, SageAttention's), asking for it must be one
    sentence with `phrase` and exit 2."""
    status, err, _ = run_cli(args)
    lines = [line for line in err.splitlines() if line.strip()]
    ok = status == 2 and len(lines) == 1 and phrase in lines[0]
    return [name, "ok" if ok else "FAIL", f"refused here (exit {status}): {' '.join(lines)[:200]}"]


def with_source(args: list[str], name: str, source: Path) -> list[str]:
    return [*args, "--video", str(source)] if name.startswith("extension") else args


def check_13b(quick: bool, device: str, deadline: float | None = None) -> list[list[str]]:
    """`bench/gpu_13b.py` in fresh processes (their own CUDA contexts and peaks): the VRAM budgets
    with and without TeaCache, then issue 20's targets (`--attention sage --fp8-compute --compile`
    at budget 4 and unlimited, with and without TeaCache, and with MagCache), then `--vram-budget 4
    --ram-budget 16` with the weights waiting on disk, each lever alone, and one section on 2 GPUs
    (2 gloo processes for `quick`), plain and with the levers; one row per run (printed as it
    comes); past `deadline` (`time.perf_counter()`) the rest are rows that say they did not run."""
    split = ["--device", device]  # the 2-GPU run's sizes
    if quick:
        extra = split = ["--spec", "tiny", "--device", device, "--steps", "2", "--size", "128x128"]
        runs = [("", [*extra, "--budgets", "0.003", "0.07", "unlimited"])]
        runs.append((" RAM 0.002", [*extra, "--budgets", "0.07", "--ram-budget", "0.002", "--teacache", "0"]))
        runs.append((" fp8 compute (emulated)", [*extra, "--budgets", "0.07", "unlimited", "--fp8-compute"]))
        runs.append((" compiled", [*extra, "--budgets", "0.07", "unlimited", "--teacache", "0", "--compile"]))
        runs.append(
            (" MagCache", [*extra, "--budgets", "unlimited", "--cache", "magcache", "--teacache", "0.3"])
        )
        runs.append((" sage attention (emulated)", [*extra, "--budgets", "unlimited", "--attention", "sage"]))
    else:  # issue 20's targets first (a device call may end before the rest): all levers at once
        on = ["--device", device]
        runs = [("", [*on, "--budgets", "4", "6", "unlimited", "--teacache", "0.15"])]
        levers = ["--attention", "sage", "--fp8-compute", "--compile"]
        runs.append((" sage + fp8 compute + compiled", [*on, "--budgets", "4", "unlimited", *levers]))
        runs.append(
            (
                " all levers + MagCache",
                [*on, "--budgets", "unlimited", *levers, "--cache", "magcache", "--teacache", "0.1"],
            )
        )
        runs.append(
            (
                " RAM 16",
                [*on, "--budgets", "4", "unlimited", "--ram-budget", "16", "--teacache", "0", "--steps", "5"],
            )
        )
        runs.append(
            (" fp8 compute", [*on, "--budgets", "4", "unlimited", "--teacache", "0", "--fp8-compute"])
        )
        runs.append((" compiled", [*on, "--budgets", "4", "unlimited", "--teacache", "0", "--compile"]))
        runs.append(
            (" sage attention", [*on, "--budgets", "unlimited", "--teacache", "0", "--attention", "sage"])
        )
        runs.append(
            (" MagCache", [*on, "--budgets", "unlimited", "--cache", "magcache", "--teacache", "0.1"])
        )
    rows = []
    for label, extra in runs:
        new = _timed(f"13B{label}", deadline, lambda t, label=label, extra=extra: _run_13b(label, extra, t))
        print("\n".join(f"{r[0]}: {r[1]} ({r[2]})" for r in new), flush=True)
        rows += new
    rows += _timed("13B on 2 GPUs", deadline, lambda t: _run_ranks(2, split, t))
    if quick:
        return rows
    levers = [*split, "--attention", "sage", "--fp8-compute", "--compile"]
    label = ", sage + fp8 compute + compiled"
    return rows + _timed(f"13B on 2 GPUs{label}", deadline, lambda t: _run_ranks(2, levers, t, label))


def _timed(name: str, deadline: float | None, run) -> list[list[str]]:
    """`run(timeout)`'s rows, or one row saying it did not run (or finish) before `deadline`."""
    left = None if deadline is None else deadline - time.perf_counter()
    if left is not None and left < 30:
        return [[name, "skip", "not run: --time-limit reached"]]
    try:
        return run(left)
    except subprocess.TimeoutExpired:
        return [[name, "skip", "stopped: --time-limit reached"]]


def _run_sage(extra: list[str], timeout: float | None = None) -> list[list[str]]:
    """`bench/sage.py`: 8-bit attention's error at the 13B head shape and on the demo video, and on
    CUDA the package's kernel against its emulation, and its speed against SDPA; a row per line."""
    cmd = [sys.executable, str(Path(__file__).with_name("sage.py")), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["no message"]
        return [["8-bit attention", "FAIL", f"bench/sage.py exited {result.returncode}: {last[0][:300]}"]]
    found = [line.rsplit(": ", 1) for line in result.stdout.splitlines() if ": " in line]
    rows = [
        [f"sage: {what}", "ok", value]
        for what, value in found
        if what[:1].isdigit() or what.startswith("demo")
    ]
    print("\n".join(f"{r[0]}: {r[1]} ({r[2]})" for r in rows), flush=True)
    return rows


def _run_ranks(
    ranks: int, extra: list[str], timeout: float | None = None, label: str = ""
) -> list[list[str]]:
    """`gpu_13b.py --ranks N`: one section on N devices against one; one row (or the skip line)."""
    script = Path(__file__).with_name("gpu_13b.py")
    name = f"13B on {ranks} GPUs{label}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(script), "--ranks", str(ranks), *extra, "--json", f"{tmp}/row.json"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = result.stdout.strip().splitlines()
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            return [[name, "FAIL", f"exited {result.returncode}: {' '.join(tail)[:300]}"]]
        if out and out[0].startswith("skipped"):
            return [[name, "skip", out[0]]]
        r = json.loads(Path(f"{tmp}/row.json").read_text())
    ok = float(r["error"]) < 2e-2  # bf16 on a GPU; fp32 on a CPU is near 1e-6
    detail = (f"{r['many']} s/frame ({r['speedup']}x one GPU's {r['one']}), MFU per GPU {r['mfu']}, "
              f"relative error {r['error']}")  # fmt: skip
    return [[name, "ok" if ok else "FAIL", detail]]


def _run_13b(label: str, extra: list[str], timeout: float | None = None) -> list[list[str]]:
    script = Path(__file__).with_name("gpu_13b.py")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, str(script), *extra, "--json", f"{tmp}/rows.json"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            return [[f"13B{label}", "FAIL", f"exited {result.returncode}: {' '.join(tail)[:300]}"]]
        runs = json.loads(Path(f"{tmp}/rows.json").read_text())
    refused = [line for line in result.stdout.splitlines() if "refused" in line]
    host = lambda r: f", {r['plan'].split('; ', 1)[1]}" if "RAM" in label and "; " in r["plan"] else ""  # noqa: E731
    rows = [[f"13B{label} budget {r['budget']}, {r['cache']}", "FAIL" if "NO" in r["held_gib"] else "ok",
             f"{r['s_per_frame']} s/frame ({r['ratio']}x unlimited), MFU {r['mfu']}, peak {r['peak_gib']} GiB, "
             f"held {r['held_gib']}, skipped {r['skipped']}{host(r)}"] for r in runs]  # fmt: skip
    rows += [[f"13B{label} refused budget", "ok", line.strip()[:200]] for line in refused]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU check CI runs)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--skip-13b", action="store_true", help="only the modes and budgets")
    parser.add_argument(
        "--skip-modes", action="store_true", help="only the 13B part (a second device call's worth)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="start nothing after S seconds (rows say what did not run)",
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device; run with --device cpu --quick to check the script on a CPU.")
    started = time.perf_counter()
    deadline = None if args.time_limit is None else started + args.time_limit
    steps, sections = ("2", 1) if args.quick else ("4", 2)
    common = ["--device", args.device, "--steps", steps]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = out / "source.mp4"  # the video the extension modes extend
        status, err, _ = (
            (0, "", 0.0)
            if args.skip_modes
            else run_cli(
                [*modes(1)[0][1][:4], "--sections", "1", *common, "--out", str(out), "--name", "source"]
            )
        )
        if status != 0:
            rows.append(["source video", "FAIL", err.strip()[-300:]])
        for name, mode_args in [] if args.skip_modes else modes(sections):
            if deadline is not None and time.perf_counter() > deadline - 60:
                rows.append([name, "skip", "not run: --time-limit reached"])
                continue
            rows += check_mode(name, with_source(mode_args, name, source), common, out / "runs", cuda)
            print(f"{rows[-1][0]}: {rows[-1][1]} ({rows[-1][2]})", flush=True)
    sage = [
        "--device",
        args.device,
        *(["--tokens", "256", "--seconds", "1.2"] if args.quick else ["--seconds", "2.4"]),
    ]
    if not args.skip_modes:
        rows += _timed("8-bit attention", deadline, lambda t: _run_sage(sage, t))
    if not args.skip_13b:
        rows += check_13b(args.quick, args.device, deadline)
    failed = sum(row[1] == "FAIL" for row in rows)
    rows.append(
        [
            "all",
            "FAIL" if failed else "ok",
            f"{failed} failed, {sum(row[1] == 'skip' for row in rows)} skipped, of {len(rows)}, "
            f"{time.perf_counter() - started:.0f} s",
        ]
    )
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{r[0]:<{width}}  {r[1]:<4}  {r[2]}" for r in rows))
    if args.record or (cuda and not args.quick):
        append_rows(
            HEADING,
            INTRO,
            [f"| {today()} | {machine()} | " + " | ".join(r) + f" | `{command()}` |" for r in rows],
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
