"""One video on several devices: each model call split across the ranks of a `torchrun` launch.

- `ulysses`: sequence parallelism around attention (`SequenceParallel`), as block hooks.
- `calls`: rank 0's model calls repeated on the other ranks (`Leader`, `serve`).
- `world`: this process's rank, and the process group of a launch.
"""

from .calls import Leader, broadcast_call, group_device, leader_of, receive_call, serve
from .ulysses import (
    SequenceParallel,
    ShardLayout,
    attached_parallel,
    check_heads,
    heads_to_seq,
    seq_to_heads,
    split,
)
from .world import Ranks, join_from_env, launched_world, leave, local_rank, rank_device, ranks

__all__ = [
    "Leader",
    "Ranks",
    "SequenceParallel",
    "ShardLayout",
    "attached_parallel",
    "broadcast_call",
    "check_heads",
    "group_device",
    "heads_to_seq",
    "join_from_env",
    "launched_world",
    "leader_of",
    "leave",
    "local_rank",
    "rank_device",
    "ranks",
    "receive_call",
    "seq_to_heads",
    "serve",
    "split",
]
