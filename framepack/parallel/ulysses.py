"""Sequence parallelism in the Ulysses style (Jacobs et al. 2023, arXiv 2309.14509): one model call
split over the ranks of a `torch.distributed` group.

Each rank holds a contiguous 1/N of the image tokens (the packed history, then the noisy window)
and a contiguous 1/N of the conditioning tokens (SigLIP then text), with their RoPE rows. Where a
count does not divide, the first ranks hold one token more: shards are uneven and nothing is
padded, so no padding key ever needs a mask. Around every attention an all-to-all turns the token
shards into head shards (H/N heads of every token), the backend attends, and a second all-to-all
turns them back. After the all-to-all a rank sees the keys in rank order, `[image_0, text_0,
image_1, text_1, ...]`: a text-padding key mask is permuted into that order once per call, so
masks stay exact. Only the last single-stream block's read-out (the noisy tokens) is gathered, so
the head runs on the full window on every rank. The embedders and the token refiner run on every
rank (a few percent of the FLOPs); the blocks' linear layers and attention are split N ways.

`SequenceParallel(model).attach()` hooks the blocks from outside (`framepack.memory.hooks`);
every rank calls the model with the same inputs (`framepack.parallel.calls`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch
import torch.distributed as dist
import torch.nn as nn

from ..memory.hooks import HookHandle, add_hook, hooks_of
from ..model.attention import around_attention
from .calls import group_device

__all__ = [
    "ShardLayout",
    "SequenceParallel",
    "attached_parallel",
    "check_heads",
    "heads_to_seq",
    "seq_to_heads",
    "split",
]


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """`[start, stop)` of each of `parts` contiguous shards of `n` items (the first `n % parts` one bigger)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def check_heads(heads: int, world: int) -> None:
    """ValueError (one sentence) unless `world` ranks can share `heads` attention heads evenly."""
    if heads % world:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"one video on {world} processes needs a process count that divides the model's "
            f"{heads} attention heads ({', '.join(map(str, divisors))})."
        )


@dataclass(frozen=True)
class ShardLayout:
    """Which tokens each rank holds in one model call: `image` image tokens, `text` others."""

    image: int
    text: int
    world: int
    rank: int

    @cached_property
    def image_shards(self) -> list[tuple[int, int]]:
        return split(self.image, self.world)

    @cached_property
    def text_shards(self) -> list[tuple[int, int]]:
        return split(self.text, self.world)

    @cached_property
    def lengths(self) -> list[int]:
        """Tokens on each rank (image and text)."""
        return [b - a + d - c for (a, b), (c, d) in zip(self.image_shards, self.text_shards, strict=True)]

    @cached_property
    def order(self) -> torch.Tensor:
        """Indices into `[image | text]` of the keys in the order an all-to-all gathers them."""
        parts = []
        for (a, b), (c, d) in zip(self.image_shards, self.text_shards, strict=True):
            parts += [torch.arange(a, b), torch.arange(self.image + c, self.image + d)]
        return torch.cat(parts)

    def local(self, hs: torch.Tensor) -> torch.Tensor:
        """This rank's tokens `(B, L_r, D)` of the full stream `(B, image + text, D)`."""
        (a, b), (c, d) = self.image_shards[self.rank], self.text_shards[self.rank]
        return torch.cat([hs[:, a:b], hs[:, self.image + c : self.image + d]], dim=1)

    def noisy_counts(self, noisy: int) -> list[int]:
        """How many of the last `noisy` image tokens each rank holds."""
        first = self.image - noisy
        return [max(0, b - max(a, first)) for a, b in self.image_shards]


def seq_to_heads(t: torch.Tensor, lengths: list[int], group=None) -> torch.Tensor:
    """All-to-all: token shards `(B, L_r, H, ...)` -> every token, H/N heads `(B, sum(lengths), H/N, ...)`.

    Rank r sends its tokens of head group j to rank j; `lengths` are every rank's token counts.
    """
    p = len(lengths)
    b, length, h = t.shape[:3]
    rest = t.shape[3:]
    send = t.reshape(b, length, p, h // p, *rest).transpose(0, 2).contiguous()  # (P, L_r, B, H/P, ...)
    out = t.new_empty(sum(lengths), b, h // p, *rest)
    dist.all_to_all_single(out, send.flatten(0, 1), lengths, [length] * p, group=group)
    return out.transpose(0, 1)  # (B, L, H/P, ...)


def heads_to_seq(t: torch.Tensor, lengths: list[int], rank: int, group=None) -> torch.Tensor:
    """The inverse of `seq_to_heads`: `(B, sum(lengths), H/N, ...)` -> `(B, lengths[rank], H, ...)`."""
    p = len(lengths)
    b, _, hp = t.shape[:3]
    rest = t.shape[3:]
    send = t.transpose(0, 1).contiguous()  # (L, B, H/P, ...)
    mine = lengths[rank]
    out = t.new_empty(p * mine, b, hp, *rest)
    dist.all_to_all_single(out, send, [mine] * p, lengths, group=group)
    out = out.view(p, mine, b, hp, *rest).permute(2, 1, 0, *range(3, 4 + len(rest)))  # (B, L_r, P, H/P, ...)
    return out.reshape(b, mine, p * hp, *rest)


class SequenceParallel:
    """One model's blocks split over the ranks of `group` (see the module docstring).

    Every rank must call the model with the same inputs; each gets the full velocity back.
    """

    priority = 100  # outside weight streaming: the block sees (and streams for) its shard only

    def __init__(self, model: nn.Module, group=None) -> None:
        self.model, self.group = model, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        check_heads(model.config.num_attention_heads, self.world)
        if len(model.single_transformer_blocks) == 0:
            raise ValueError("sequence parallelism needs a model with at least one single-stream block.")
        self.handles: list[HookHandle] = []
        self.layout: ShardLayout | None = None
        self._rope: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._mask: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def attach(self) -> SequenceParallel:
        blocks = [*self.model.transformer_blocks, *self.model.single_transformer_blocks]
        self.first = blocks[0]
        for block in self.model.transformer_blocks:
            self.handles.append(add_hook(block, _Hook(self.dual_block, self.priority)))
        for block in self.model.single_transformer_blocks:
            self.handles.append(add_hook(block, _Hook(self.single_block, self.priority)))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._begin(None)

    def _begin(self, layout: ShardLayout | None) -> None:
        """A new model call (its first block): a new layout, nothing cached."""
        self.layout = layout
        self._rope, self._mask = (None, None), (None, None)

    def _local(self, rope: torch.Tensor, key_mask: torch.Tensor | None):
        """This rank's RoPE rows and the key mask in gathered order, computed once per call."""
        assert self.layout is not None, "the first block of a call sets the layout"
        if self._rope[0] is not rope:
            a, b = self.layout.image_shards[self.rank]
            self._rope = (rope, rope[:, a:b])  # (B, N_r, 1, Dh/2)
        if key_mask is not None and self._mask[0] is not key_mask:
            self._mask = (key_mask, key_mask[:, self.layout.order.to(key_mask.device)])  # (B, L)
        return self._rope[1], None if key_mask is None else self._mask[1]

    def dual_block(self, block, forward, x, c, temb, rope, key_mask):
        if block is self.first:  # full streams in: shard them
            self._begin(ShardLayout(x.shape[1], c.shape[1], self.world, self.rank))
            (a, b), (s, e) = self.layout.image_shards[self.rank], self.layout.text_shards[self.rank]
            x, c = x[:, a:b], c[:, s:e]  # (B, N_r, D), (B, M_r, D)
        rope, key_mask = self._local(rope, key_mask)
        with around_attention(partial(self._attend, None)):
            return forward(x, c, temb, rope, key_mask)

    def single_block(self, block, forward, h, temb, rope, key_mask, keep_last=None):
        if block is self.first:  # no dual blocks: the joint stream comes in whole
            n = rope.shape[1]
            self._begin(ShardLayout(n, h.shape[1] - n, self.world, self.rank))
            h = self.layout.local(h)  # (B, L_r, D)
        rope, key_mask = self._local(rope, key_mask)
        counts = None
        if keep_last is not None:  # the read-out: every rank computes its own noisy tokens
            counts = self.layout.noisy_counts(keep_last)
            keep_last = counts[self.rank]
        with around_attention(partial(self._attend, counts)):
            out = forward(h, temb, rope, key_mask, keep_last=keep_last)  # (B, R_r, D)
        return out if counts is None else self._gather(out, counts)

    def _attend(self, q_lengths, backend, q, k, v, key_mask):
        """Attention over every rank's tokens for this rank's heads; `q_lengths`: every rank's
        query count when it differs from its key count (the read-out block)."""
        lengths, group = self.layout.lengths, self.group
        if q_lengths is None:  # one all-to-all for q, k and v
            q, k, v = seq_to_heads(torch.stack([q, k, v], dim=3), lengths, group).unbind(3)
            q_lengths = lengths
        else:
            q = seq_to_heads(q, q_lengths, group)
            k, v = seq_to_heads(torch.stack([k, v], dim=3), lengths, group).unbind(3)
        out = backend(q, k, v, key_mask)  # (B, Lq, H/N, Dh)
        return heads_to_seq(out, q_lengths, self.rank, group)  # (B, Lq_r, H, Dh)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (the same on every rank): a statistic of every token, from
        each rank's sum over its shard (a step cache's, `framepack.caching`)."""
        wire = t.to(group_device(self.group)).contiguous()
        dist.all_reduce(wire, group=self.group)
        return wire.to(t.device)

    def _gather(self, out: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's read-out tokens `(B, counts[r], D)`, in order: `(B, sum(counts), D)`."""
        most = max(counts)
        padded = torch.nn.functional.pad(out, (0, 0, 0, most - out.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, counts, strict=True)], dim=1)


def attached_parallel(model: nn.Module) -> SequenceParallel | None:
    """The `SequenceParallel` attached to `model`'s blocks, None when they see every token."""
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    for hook in hooks_of(blocks[0]) if blocks else ():
        if isinstance(getattr(hook, "owner", None), SequenceParallel):
            return hook.owner
    return None


class _Hook:
    """A bound method of a `SequenceParallel` as a hook with a `priority` (`framepack.memory.hooks`)."""

    def __init__(self, fn, priority: int) -> None:
        self.fn, self.priority, self.owner = fn, priority, fn.__self__

    def __call__(self, module, forward, *args, **kwargs):
        return self.fn(module, forward, *args, **kwargs)
