"""Training over several processes (`torchrun`): the process group, the DDP or FSDP wrapping of
the transformer, and the collectives a run needs (weights gathered for checkpoints, the mean loss,
rank digests). With one process every function here is a plain local operation."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import PackedTransformer

__all__ = [
    "StepModule",
    "join_process_group",
    "wrap",
    "cpu_copy",
    "laid_out_like",
    "shared_from_rank0",
    "gathered_model_state",
    "rank_digests",
    "mean_over_ranks",
    "barrier",
]


class StepModule(nn.Module):
    """`forward` = the transformer's `forward_packed`, so DDP and FSDP see a plain module call."""

    def __init__(self, transformer: PackedTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.transformer.forward_packed(*args, **kwargs)


def join_process_group(device: torch.device, world: int) -> bool:
    """Start the process group of `world` processes if there are several and none is started yet
    (NCCL on CUDA, else gloo); True when this call started it (the caller then leaves it)."""
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def wrap(net: nn.Module, model: PackedTransformer, device: torch.device, world: int, fsdp: bool) -> nn.Module:
    """`net` as it trains: itself in one process, else DDP, or FSDP (each block a shard) with `fsdp`."""
    if world == 1 or not dist.is_initialized():
        return net
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            fully_shard(block, mesh=mesh)
        return fully_shard(net, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t`, gathered first if it is an FSDP shard (a collective then)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def laid_out_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param` (sharded again for FSDP)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype).clone()


def shared_from_rank0(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's `t` on every rank (on the CPU; broadcast through `device`); `t` itself without a group."""
    if not dist.is_initialized():
        return t
    shared = t.to(device)
    dist.broadcast(shared, 0)
    return shared.cpu()


def gathered_model_state(
    model: PackedTransformer, net: nn.Module, sharded: bool, names=None
) -> dict[str, torch.Tensor]:
    """Full weights on the CPU (gathered from every rank when `sharded` by FSDP through `net`),
    optionally only `names`."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {
            k.removeprefix("transformer."): v for k, v in get_model_state_dict(net, options=opts).items()
        }
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if names is None or k in names}
    return state if names is None else {k: v for k, v in state.items() if k in names}


def rank_digests(trainable: dict[str, torch.Tensor], world: int, fsdp: bool) -> list[str] | None:
    """SHA-256 of each rank's trained weights (DDP keeps them identical); None without DDP."""
    if not dist.is_initialized() or world == 1 or fsdp:
        return None
    h = hashlib.sha256()
    for name in sorted(trainable):
        h.update(trainable[name].detach().cpu().contiguous().numpy().tobytes())
    out: list = [None] * world
    dist.all_gather_object(out, h.hexdigest())
    return out


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """`value` averaged over the `world` processes (in place); itself in one process."""
    if dist.is_initialized() and world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def barrier(world: int) -> None:
    """Wait for every process of the group (nothing in one process)."""
    if dist.is_initialized() and world > 1:
        dist.barrier()
