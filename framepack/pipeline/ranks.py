"""One video on several processes: every model call split across the ranks of a started
`torch.distributed` group (`torchrun --nproc-per-node N -m framepack generate ...`).

Every rank checks and opens the same run; rank 0 loads the whole bundle, the other ranks only the
transformer and the tokenizers (`load_bundle(..., transformer_only=True)`: the encoders and the
VAE run once, on rank 0, and take no memory elsewhere). Rank 0 runs it: it encodes the
prompt, the image and the start latent, samples, decodes and writes, exactly as one process
would; each of its transformer calls is sent to the other ranks (`framepack.parallel.Leader`)
and split across all of them (`framepack.parallel.SequenceParallel`: Ulysses sequence
parallelism, each rank a 1/N of the tokens and, around attention, of the heads). The other
ranks only apply the run's LoRAs, stream the transformer under their own VRAM budget, attach the
run's step cache (its statistic summed over the ranks, its sections started by rank 0, so every
rank skips the same steps) and serve the calls (`serve_run`); they encode, decode, print and write nothing. Without a started group
(or with one process) nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
import torch.nn as nn

from ..lora import applied_loras
from ..parallel import Leader, SequenceParallel, check_heads, ranks, serve
from .budget import host_tier_budget
from .named import read_component_config
from .speed import accelerate_run

__all__ = ["check_ranks", "check_ranks_before_loading", "leading", "serve_run"]


def check_ranks(heads: int) -> None:
    """With several processes: ValueError (one sentence) for a process count that does not divide
    the model's `heads` (every setting splits: a step cache, `--compile`, a VRAM budget)."""
    world = ranks().size
    if world > 1:
        check_heads(heads, world)


def check_ranks_before_loading(model) -> None:
    """`check_ranks` from the model's config.json, before its weights load (nothing to check when
    the config cannot be read here: `load_bundle` then says why)."""
    if ranks().size == 1:
        return
    try:
        heads = int(read_component_config(model, "transformer")["num_attention_heads"])
    except (ValueError, KeyError, TypeError):
        heads = None
    if heads is not None:
        check_ranks(heads)


@contextmanager
def leading(model: nn.Module) -> Iterator[None]:
    """Rank 0's side of a run on several processes (nothing with one): its model calls split
    across the ranks for the `with` block, after which the other ranks are released."""
    if not ranks().parallel:
        yield
        return
    dist.barrier()  # every rank has checked and opened the run (a resumed job: found it free)
    parallel = SequenceParallel(model).attach()
    leader = Leader(model)
    try:
        yield
    finally:
        leader.detach()  # tells the other ranks to stop serving
        parallel.detach()


def serve_run(bundle, prepared) -> None:
    """Another rank's side of a run: the run's LoRAs applied, the transformer streamed under the
    run's VRAM budget (on this rank's device), rank 0's calls served until it has finished."""
    s, model = prepared.settings, bundle.transformer
    dist.barrier()  # before rank 0 opens (and locks) the job directory
    with applied_loras(model, prepared.loras):
        parallel = SequenceParallel(model).attach()  # first: a step cache then sums over the ranks
        try:
            speed = accelerate_run(model, bundle.device, s, None, host_tier_budget(s, bundle))
            serve(model, on_section=speed.new_section)  # rank 0's sections reset the step caches
        finally:
            parallel.detach()
