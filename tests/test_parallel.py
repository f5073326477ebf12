"""One model call split over CPU processes (gloo) equals the single-process call.

Sequence parallelism (`framepack.parallel`): uneven token shards, key masks permuted with the
all-to-all, the read-out gathered; rank 0's calls repeated on the other ranks by `serve`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framepack.model import PackedTransformer, get_spec
from framepack.parallel import Leader, SequenceParallel, ShardLayout, check_heads, serve, split
from framepack.testing import random_packed_inputs


def test_shards_cover_every_token_once():
    for n in range(0, 23):
        for parts in (1, 2, 3, 5):
            bounds = split(n, parts)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    layout = ShardLayout(image=11, text=5, world=3, rank=1)
    assert sorted(layout.order.tolist()) == list(range(16))
    assert sum(layout.lengths) == 16
    assert layout.noisy_counts(6) == [0, 3, 3] and sum(layout.noisy_counts(11)) == 11
    hs = torch.arange(16.0)[None, :, None]
    assert layout.local(hs).flatten().tolist() == [4, 5, 6, 7, 13, 14]


def test_heads_must_divide():
    check_heads(24, 8)
    with pytest.raises(
        ValueError, match=r"^one video on 5 processes .* 24 attention heads \(1, 2, 3, 4, 6, 8, 12, 24\)\.$"
    ):
        check_heads(24, 5)


def _model(heads: int, layers: int) -> PackedTransformer:
    torch.manual_seed(0)
    config = get_spec("tiny").replace(num_attention_heads=heads, num_layers=layers, num_single_layers=2)
    return PackedTransformer(config).eval()


def _inputs(model: PackedTransformer, batch: int) -> dict:
    # 3x5 tokens per frame, 7 text tokens: no count divides by 2 or 3.
    x = random_packed_inputs(model.config, 6, 10, window=3, text_tokens=7, batch=batch, seed=1)
    if batch > 1:
        x["text_mask"][1, 4:] = 0  # a padded row: the key mask must stay exact
    return x


def _rank(rank: int, world: int, init: str, heads: int, layers: int, batch: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model(heads, layers)
        parallel = SequenceParallel(model).attach()
        if rank == 0:
            leader = Leader(model)
            with torch.no_grad():
                results = [model.forward_packed(**_inputs(model, batch)) for _ in range(2)]
            leader.detach()
            torch.save(results, out)
        else:
            assert serve(model) == 2
        parallel.detach()
        assert "forward" not in model.transformer_blocks[0].__dict__ if layers else True
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world, heads, layers, batch",
    [(2, 2, 1, 1), (2, 2, 1, 2), (3, 3, 0, 2)],  # batch 1; batch 2 with a key mask; single blocks only
)
def test_model_call_on_several_processes_equals_one(tmp_path, world, heads, layers, batch):
    model = _model(heads, layers)
    with torch.no_grad():
        expected = model.forward_packed(**_inputs(model, batch))
    out = tmp_path / "out.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(world, init, heads, layers, batch, str(out)), nprocs=world, join=True)
    for got in torch.load(out):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
