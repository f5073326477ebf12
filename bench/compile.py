"""`--compile` on this machine: the README's first command, and steady-state steps (issue 20).

    python bench/compile.py [--seconds 4] [--repeat 3] [--record]

1. The README's command (`framepack generate` on the demo model, a 4-second video) in fresh
   processes, without and with `--compile`, alternating, `--repeat` times each: the wall time a
   user sees, compile included.
2. In one process, the same video generated twice without and twice with compiled blocks: the
   second run of each is timed (the compile is paid once per process), for the steady-state ratio.
Ratios are measured side by side in one run (these machines are noisy); not a test.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

EXAMPLE = ROOT / "framepack" / "demo_model" / "examples" / "red_circle_moves_right.png"
PROMPT = "a red circle moves right on a blue background"
HEADING = "## torch.compile of the blocks on the CPU (`bench/compile.py`)"
INTRO = """The README's first command (demo model, 64x64) in fresh processes, and steady-state runs in
one process (the second of two, so the one-off compile is left out). Target (issue 20): the README
command at least 1.3x faster with `--compile`, or a measured reason why not.

| date | machine | seconds | README command: eager / compiled (ratio) | steady state: eager / compiled (ratio) | compile | command |
| --- | --- | --- | --- | --- | --- | --- |"""


def cli_seconds(seconds: float, compiled: bool, out: Path) -> float:
    cmd = [sys.executable, "-m", "framepack", "generate", "--image", str(EXAMPLE), "--prompt", PROMPT]
    cmd += ["--seconds", str(seconds), "--out", str(out)] + (["--compile"] if compiled else [])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def steady(seconds: float, out: Path) -> tuple[float, float, float]:
    """(eager s, compiled s, compile s): the second of two runs each, in this process."""
    from framepack.pipeline.bundle import load_bundle
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings

    bundle = load_bundle(ROOT / "framepack" / "demo_model")
    times, compile_s = {}, 0.0
    for compiled in (False, True):
        for i in range(2):
            settings = GenerationSettings(
                prompt=PROMPT, image=str(EXAMPLE), seconds=seconds, compile=compiled
            )
            start = time.perf_counter()
            done = open_run(bundle, Request(settings)).run(out)
            times[compiled] = time.perf_counter() - start
            if compiled and i == 0:
                compile_s = done.info["compile"]["compile_seconds"]
    return times[False], times[True], compile_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {False: [], True: []}
        for _ in range(args.repeat):
            for compiled in (False, True):
                runs[compiled].append(cli_seconds(args.seconds, compiled, Path(tmp) / "cli"))
        eager_cli, compiled_cli = (statistics.median(runs[c]) for c in (False, True))
        eager, compiled, compile_s = steady(args.seconds, Path(tmp) / "steady")
    readme = f"{eager_cli:.1f} / {compiled_cli:.1f} s ({eager_cli / compiled_cli:.2f}x)"
    state = f"{eager:.2f} / {compiled:.2f} s ({eager / compiled:.2f}x)"
    print(f"README command: {readme}; steady state: {state}; compile {compile_s:.1f} s")
    if args.record:
        row = f"| {today()} | {machine()} | {args.seconds:g} | {readme} | {state} | {compile_s:.1f} s | `{command()}` |"
        append_rows(HEADING, INTRO, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
