"""The loss log of a training run: `loss.csv`, plus TensorBoard scalars when tensorboard is installed."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

__all__ = ["LOG_NAME", "LossLog"]

LOG_NAME = "loss.csv"


class LossLog:
    """`loss.csv` (step, loss, lr, seconds), plus TensorBoard scalars when tensorboard is installed.

    A resumed run keeps the rows up to its checkpoint's step and appends after them.
    """

    FIELDS = ("step", "loss", "lr", "seconds")

    def __init__(self, output: Path, step: int) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.path = output / LOG_NAME
        rows = []
        if step > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.file = open(self.path, "w", newline="")
        self.csv = csv.DictWriter(self.file, self.FIELDS)
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.file.flush()
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"), purge_step=step + 1 if step else None)

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.csv.writerow(
            {"step": step, "loss": f"{loss:.9g}", "lr": f"{lr:.9g}", "seconds": f"{seconds:.3f}"}
        )
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
