"""Where a run's weights live, before it starts: bytes on the device, in host RAM and on disk,
and what is read from disk per sampling step and per job.

`tier_plan(bundle, prepared)` asks the same planners a run uses (`memory.offload.plan_visits`,
`memory.streaming.plan_memory`) with nothing moved, so it refuses a budget too small with the
same sentence, before any work. On a CPU the device is the host: its RAM budget is the device
budget (`budget.device_budget`) and the tiers are RAM and disk. A bundle loaded disk-backed
(`load_bundle(..., ram_budget=...)`) reads its streamed blocks from their files at every model
call and the encoders and the VAE once per job; a bundle loaded into RAM reads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory.budgets import format_bytes
from ..memory.disk import disk_backed
from ..memory.offload import module_bytes, plan_visits
from ..memory.streaming import plan_memory
from .budget import bundle_need, device_budget, host_tier_budget, run_size

__all__ = ["Tiers", "tier_plan"]


@dataclass(frozen=True)
class Tiers:
    """A run's weights by tier (bytes) and its reads from disk (see the module docstring)."""

    on_cpu: bool  # the device is the host: "device" bytes are RAM
    device: int  # weights on the device at most (the transformer's plan, and the visitors when they fit)
    host: int  # weights waiting in host RAM (a GPU run): the host copies, or the disk reads' staging
    disk: int  # weights that stay in their files
    step_read: int  # bytes read from disk per sampling step
    job_read: int  # bytes read from disk once per job
    blocks: str  # the transformer's plan, in words

    def describe(self) -> str:
        where = f"RAM {format_bytes(self.device)}" if self.on_cpu else f"device {format_bytes(self.device)}"
        host = "" if self.on_cpu else f", host RAM {format_bytes(self.host)}"
        reads = ""
        if self.step_read or self.job_read:
            reads = (
                f"; read from disk: {format_bytes(self.step_read)} per sampling step, "
                f"{format_bytes(self.job_read)} per job"
            )
        return f"weights: {where}{host}, disk {format_bytes(self.disk)} ({self.blocks}){reads}"


def _device_peak(off, plan, visitors, vae) -> int:
    """Weight bytes on the device at most: everything when it fits, else the larger of a visit
    (the transformer is away while the encoders run; a visitor too big streams its layers) and
    the transformer's plan with the VAE beside it."""
    if off.resident:
        return plan.peak_bytes + sum(module_bytes(m) for m in visitors)

    def visit(m) -> int:
        streamed = off.streamed.get(id(m))
        return module_bytes(m) if streamed is None else streamed.peak_bytes

    return max(max(visit(m) for m in visitors), plan.peak_bytes + visit(vae))


def _host_tier(plan, budget: int) -> int:
    """Bytes of streamed blocks kept in host memory, as `WeightStreamer` picks them (with fp8, the
    fp8 copies of the matrices; the few vectors beside them are left out of this count)."""
    kept = 0
    for i in plan.streamed:
        size = plan.fp8_bytes[i] if plan.fp8 else plan.block_bytes[i]
        if kept + size <= budget:
            kept += size
    return kept


def tier_plan(bundle, prepared) -> Tiers:
    """The tiers of running `prepared` with `bundle` (see the module docstring); ValueError (one
    sentence) when its budgets cannot hold it."""
    s = prepared.settings
    model, device = bundle.transformer, bundle.device
    visitors = bundle.visitors()
    budget = device_budget(s, device)
    need = bundle_need(bundle, prepared) if budget is not None else None
    off = plan_visits(
        model,
        visitors,
        device,
        budget,
        beside=bundle.vae,
        fp8=s.fp8_copies,
        need=need,
        run_size=run_size(prepared),
    )
    weights = off.transformer_budget if off.total is not None else None
    plan = plan_memory(model, weights, fp8=s.fp8_copies, fp8_compute=bool(s.fp8_compute))
    streamed = sum(plan.block_bytes[i] for i in plan.streamed)
    total, seen = module_bytes(model), sum(module_bytes(m) for m in visitors)
    on_device = _device_peak(off, plan, visitors, bundle.vae)
    lazy = bundle.from_files and disk_backed(model)
    branches = 1 if prepared.cfg == 1 else 2
    on_cpu = device.type == "cpu"
    if lazy:  # the VAE visits once per section's decode when it does not stay
        kept = _host_tier(plan, host_tier_budget(s, bundle))
        disk = streamed - kept + (0 if off.resident else seen)
        staging = (
            0 if on_cpu or not streamed else plan.slots * max(plan.block_bytes[i] for i in plan.streamed)
        )
        decodes = 0 if off.resident else (len(prepared.plan.sections) - 1) * module_bytes(bundle.vae)
        job = seen + total - streamed + kept + decodes
        return Tiers(
            on_cpu, on_device, staging + kept, disk, (streamed - kept) * branches, job, plan.describe()
        )
    if on_cpu:  # every weight is in RAM, whatever visits
        return Tiers(True, total + seen, 0, 0, 0, 0, plan.describe())
    host = streamed + (0 if off.resident else seen)  # the streamed blocks, the visitors
    return Tiers(False, on_device, host, 0, 0, 0, plan.describe())
