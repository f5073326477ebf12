"""Shared by the memory / caching benchmarks: the machine string and appending rows to RESULTS.md."""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        cpu = torch.cuda.get_device_name()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def append_rows(heading: str, intro: str, rows: list[str]) -> None:
    """Append table rows under `heading` (created with `intro`, which ends with the table head)."""
    rows = [r.rstrip("\n") for r in rows]
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if heading not in text:
        text = (
            text.rstrip("\n") + "\n\n" + heading + "\n" + intro.rstrip("\n") + "\n" + "\n".join(rows) + "\n"
        )
    else:  # after the last row of this heading's table
        head, rest = text.split(heading, 1)
        lines = rest.split("\n")
        nxt = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
        last = max(i for i, line in enumerate(lines[:nxt]) if line.startswith("|"))
        lines[last + 1 : last + 1] = rows
        text = head + heading + "\n".join(lines)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"recorded in {RESULTS}")


def today() -> str:
    return time.strftime("%Y-%m-%d")
