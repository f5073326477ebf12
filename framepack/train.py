"""`python -m framepack.train CONFIG` (also under `torchrun --nproc-per-node N -m framepack.train`)."""

from __future__ import annotations

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
