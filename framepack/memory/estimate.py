"""What a run holds on the device besides weights: the part of a VRAM budget the weights cannot use.

A budget bounds everything the process holds on the card, as `nvidia-smi` shows it:
- the activations of one transformer call at the section's token count (`activation_bytes`),
- the step cache's state (`cache_bytes`: TeaCache / first-block cache keep residuals),
- the VAE decode's working memory (`offload.vae_decode_bytes`, at the smallest tile: the decode
  tile shrinks to the room left),
- on CUDA, the context and the cuBLAS/cuDNN workspaces, measured once per device
  (`device_overhead`), and a margin of `ALLOCATOR_MARGIN` of the budget for the caching
  allocator's reserve and fragmentation (`torch.cuda.max_memory_reserved` over the allocated
  bytes). On a CPU both are 0.

`DeviceNeed` adds them up; the weights get what is left (`DeviceNeed.weights`), and a budget that
cannot hold the smallest plan is refused with one sentence (`DeviceNeed.check`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .budgets import GIB, format_bytes
from .disk import proc_bytes

__all__ = [
    "ALLOCATOR_MARGIN",
    "DeviceNeed",
    "activation_bytes",
    "cache_bytes",
    "device_overhead",
    "host_overhead",
    "section_tokens",
]

ALLOCATOR_MARGIN = 0.15  # of a CUDA budget (less the context): the caching allocator's reserve
MLP_ROWS = 1024  # rows of `ops.chunked_mlp`'s hidden chunk
FALLBACK_OVERHEAD = 768 * 2**20  # CUDA context + workspaces when they cannot be measured
FALLBACK_HOST_OVERHEAD = 512 * 2**20  # the runtime's resident set when /proc cannot be read


def activation_bytes(cfg, image_tokens: int, text_tokens: int, itemsize: int, batch: int = 1) -> int:
    """Upper bound of the activation bytes of one `forward_packed` call (inference, no grad).

    `image_tokens` N (noisy window + packed history), `text_tokens` M (text + SigLIP), L = N + M,
    u = L * D * itemsize. Worked out from `layers.py`: a dual-stream block holds its six per-stream
    q/k/v, the three joint ones, the attention output and the new streams (10 u), a single-stream
    block 6 u; each adds the MLP's hidden chunk and its activation (2 * 1024 rows * mlp_dim); the
    residual stream outside the blocks (x, ctx and their concatenation: 2 u; the embedded image
    tokens, N * D) and the complex RoPE tables (and their parts: 2 * N * head_dim * 4 bytes) stay
    alive; in 16-bit dtypes the fp32 temporaries of the q/k
    RMSNorm and RoPE add 2 * L * D * (4 - itemsize). Measured on the CPU against
    `measure.LiveBytes` in `tests/test_estimate.py`.
    """
    d, n, length = cfg.inner_dim, image_tokens, image_tokens + text_tokens
    u = length * d * itemsize
    chunk = 2 * min(MLP_ROWS, batch * length) * cfg.mlp_dim * itemsize
    fp32 = 2 * length * d * max(0, 4 - itemsize)
    blocks = 10 * u if cfg.num_layers else 6 * u
    rope = n * cfg.attention_head_dim * 4
    return batch * (2 * u + n * d * itemsize + blocks + fp32 + 2 * rope) + chunk


def cache_bytes(
    cfg,
    cache: str | None,
    image_tokens: int,
    noisy_tokens: int,
    itemsize: int,
    branches: int = 1,
    batch: int = 1,
) -> int:
    """Bytes a step cache (`framepack.caching`) keeps on the device: per branch (CFG: 2) its signal
    over the image tokens and the residual of the read-out tokens, plus, during a call, the anchor
    and the new signal (two more image-token tensors). 0 without a cache."""
    if cache is None:
        return 0
    row = batch * cfg.inner_dim * itemsize
    return branches * (image_tokens + noisy_tokens) * row + 2 * image_tokens * row


@functools.cache
def _cuda_overhead(index: int) -> int:
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        before = torch.cuda.memory_reserved(device)
        a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
        (a @ a).sum().item()  # cuBLAS handle and workspace
        q = a.view(1, 4, 256, 64)
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()  # attention kernels
        del a, q
        torch.cuda.synchronize(device)
        used = _process_used(index)
        if used is None:  # the whole card's use: other processes count too (a safe side)
            free, total = torch.cuda.mem_get_info(device)
            used = total - free
    return max(int(used - before), 0)


def _process_used(index: int) -> int | None:
    """This process's bytes on CUDA device `index` as the driver counts them (NVML), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid() and p.usedGpuMemory:
                return int(p.usedGpuMemory)
    except Exception:  # no NVML, or another pid namespace: fall back to the card's use
        return None
    return None


def device_overhead(device: torch.device | str) -> int:
    """Bytes the process holds on `device` outside its tensors: the CUDA context, the loaded
    kernels and the cuBLAS/cuDNN workspaces; measured once per device (after a small matmul and
    an attention call) and cached. 0 on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    index = torch.cuda.current_device() if device.index is None else device.index
    try:
        return _cuda_overhead(index)
    except RuntimeError:
        return FALLBACK_OVERHEAD


@functools.cache
def host_overhead() -> int:
    """Bytes the process holds in host memory outside the weights and a run's tensors: the Python
    runtime, torch and the other libraries, the tokenizers; the resident set the first time it is
    asked (before a run reads any weight in), cached. What a RAM budget on a CPU keeps for them."""
    rss = proc_bytes("/proc/self/status", "VmRSS")
    return FALLBACK_HOST_OVERHEAD if rss is None else rss


def section_tokens(plan, height: int, width: int) -> tuple[int, int]:
    """(image tokens, noisy tokens) of the widest section of a `SectionPlan` for latents `height x
    width`: the noisy window and the packed history (anchors and group 0 at k1, each group at its
    kernel, a tail token group at the last kernel)."""
    from ..packing.schedule import K1

    kernels = [g.kernel for g in plan.schedule.groups]
    image = noisy = 0
    for section in plan.sections:
        layout = section.layout
        n = K1.tokens(len(layout.noisy), height, width)
        history = K1.tokens(len(layout.clean_k1()), height, width)
        history += sum(
            k.tokens(len(g), height, width) for k, g in zip(kernels[1:], layout.groups[1:], strict=True)
        )
        history += kernels[-1].tokens(len(layout.tail), height, width)
        image, noisy = max(image, n + history), max(noisy, n)
    return image, noisy


@dataclass(frozen=True)
class DeviceNeed:
    """Device bytes of a run besides weights (see the module docstring)."""

    activations: int
    cache: int = 0
    vae_decode: int = 0
    overhead: int = 0  # CUDA context and workspaces
    margin: float = 0.0  # fraction of the budget (less `overhead`) for the allocator
    memory: str = "VRAM"  # the budget's name in a refusal: VRAM, or RAM on a CPU under --ram-budget

    @property
    def working(self) -> int:
        """Tensors besides weights at once: the step cache, then a model call or a decode."""
        return self.cache + max(self.activations, self.vae_decode)

    def reserve(self, total: int) -> int:
        """Bytes of a budget of `total` bytes the weights may not use."""
        return self.overhead + math.ceil(self.margin * max(total - self.overhead, 0)) + self.working

    def weights(self, total: int) -> int:
        return total - self.reserve(total)

    def smallest(self, weights: int) -> int:
        """The smallest budget (bytes) leaving `weights` bytes to the weights."""
        total = math.ceil((weights + self.working + self.overhead * (1 - self.margin)) / (1 - self.margin))
        while self.weights(total) < weights:  # rounding
            total += 1
        return total

    def describe(self) -> str:
        parts = [f"activations {format_bytes(self.activations)}"]
        if self.cache:
            parts.append(f"step cache {format_bytes(self.cache)}")
        if self.vae_decode:
            parts.append(f"VAE decode {format_bytes(self.vae_decode)}")
        if self.memory == "RAM" and self.overhead:
            parts.append(f"the runtime {format_bytes(self.overhead)}")
        elif self.overhead or self.margin:
            parts.append(
                f"CUDA context {format_bytes(self.overhead)}, allocator {self.margin:.0%} of the budget"
            )
        return ", ".join(parts)

    def check(self, total: int, weights: int, size: str) -> None:
        """Raise ValueError (one sentence) when a budget of `total` bytes cannot leave `weights`
        bytes (the smallest plan's) to the weights; `size` names the run ("640x640")."""
        if self.weights(total) >= weights:
            return
        need = self.smallest(weights)
        step = 10 if need >= GIB else 1000  # GiB to one decimal, or to the MiB below 1 GiB
        gib = math.ceil(need / GIB * step) / step
        raise ValueError(
            f"a {self.memory} budget of {total / GIB:.3g} GiB cannot hold this run at {size} (it needs "
            f"at least {format_bytes(need)}: {format_bytes(weights)} of weights, {self.describe()}); "
            f"give --{self.memory.lower()}-budget {gib:g} or more."
        )
