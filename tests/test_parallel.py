"""One model call split over CPU processes (gloo) equals the single-process call.

Sequence parallelism (`framepack.parallel`): uneven token shards, key masks permuted with the
all-to-all, the read-out gathered; rank 0's calls repeated on the other ranks by `serve`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from framepack.model import PackedTransformer, get_spec
from framepack.parallel import Leader, SequenceParallel, ShardLayout, check_heads, serve, split
from framepack.testing import random_packed_inputs, tiny_bundle_dir


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


def _compiled_rank(rank: int, world: int, init: str, out: str) -> None:
    from framepack.pipeline.compiled import CompiledBlocks

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    try:
        model = _model(2, 1)
        parallel = SequenceParallel(model).attach()
        compiled = CompiledBlocks(model).attach()  # innermost, as --compile attaches it
        if rank == 0:
            leader = Leader(model)
            with torch.no_grad():
                results = [model.forward_packed(**_inputs(model, batch)) for batch in (1, 2)]
            leader.detach()
            torch.save(results, out)
        else:
            assert serve(model) == 2
        assert compiled.graphs > 0  # the blocks ran compiled, their attention between two graphs
        compiled.detach()
        parallel.detach()
    finally:
        dist.destroy_process_group()


def test_compiled_blocks_on_two_processes_equal_one_eager_process(tmp_path):
    """`--compile` with sequence parallelism: each compiled block breaks its graph around the
    attention, whose all-to-alls run eagerly; the calls equal one eager process's."""
    model = _model(2, 1)
    with torch.no_grad():
        expected = [model.forward_packed(**_inputs(model, batch)) for batch in (1, 2)]
    out = tmp_path / "out.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_compiled_rank, args=(2, init, str(out)), nprocs=2, join=True)
    for got, want in zip(torch.load(out), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- one video on several processes

DEMO_IMAGE = "framepack/demo_model/examples/red_circle_moves_right.png"
ROOT = Path(__file__).resolve().parent.parent


def _frames(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.png"))
    assert files, f"no frames in {folder}"
    return np.stack([np.asarray(Image.open(f), np.int16) for f in files])


def _same_video(one: Path, many: Path, bf16: bool = False) -> None:
    """Equal to fp32 tolerance: the 8-bit frames differ by at most one level where a value sits on
    a rounding edge, and the sidecars record the same settings (but for the budget) and frames.
    `bf16`: a bf16 transformer's products over a shard of tokens round apart from the whole's (the
    kernels block other shapes differently), so the frames need only agree to bf16 rounding."""
    a, b = _frames(one.with_name(one.stem + "_frames")), _frames(many.with_name(many.stem + "_frames"))
    assert a.shape == b.shape
    if bf16:
        psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))
        print(f"bf16: {psnr:.1f} dB, {(a != b).mean():.2%} of values differ, at most {np.abs(a - b).max()}")
        assert psnr >= BF16_PSNR_FLOOR
    else:
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    sa, sb = (json.loads(p.with_suffix(".json").read_text()) for p in (one, many))
    for s in (sa, sb):
        s["settings"].pop("vram_budget")
    assert (sa["settings"], sa["frames"]) == (sb["settings"], sb["frames"])


# The demo model on 3 processes against one in the release dtypes: measured 61.6 dB (4.5% of the
# 8-bit values one level or two apart); the floor leaves room for another CPU's kernels.
BF16_PSNR_FLOOR = 50.0

ALL = ["image_encoder", "text_encoder", "text_encoder_2", "transformer", "vae"]


def _api_rank(rank: int, world: int, init: str, kwargs: dict, out: str) -> None:
    import framepack

    # A rank left waiting (ranks that decide differently) fails in minutes instead of hanging.
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    try:
        from framepack.pipeline.api import LOADED_BUNDLES

        done = framepack.generate(out_dir=out, device="cpu", **kwargs)
        assert (done is None) == (rank != 0)
        (bundle,) = LOADED_BUNDLES.values()  # the encoders and the VAE on rank 0 only
        assert sorted(bundle.modules()) == (ALL if rank == 0 else ["transformer"])
    finally:
        dist.destroy_process_group()


def test_python_api_video_on_two_processes_equals_one(tmp_path, image):
    """The tiny bundle through `framepack.generate` in a started gloo group, each rank streaming
    its blocks under a VRAM budget, against one process without one."""
    import framepack

    start = tmp_path / "start.png"
    Image.fromarray(image).save(start)
    kwargs = dict(model=str(tiny_bundle_dir()), image=str(start), prompt="a square", sections=2, steps=2)
    one = framepack.generate(out_dir=tmp_path / "one", device="cpu", png=True, name="v", **kwargs)
    init = f"file://{tmp_path / 'rendezvous'}"
    kwargs.update(png=True, name="v", vram_budget="0.011")  # each rank streams every block
    mp.spawn(_api_rank, args=(2, init, kwargs, str(tmp_path / "two")), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    _same_video(one.video, tmp_path / "two" / "v.mp4")


@pytest.mark.parametrize(
    "cache, threshold, coefficients",
    [("teacache", 0.085, (1.0, 0.0)), ("fbcache", 0.42, None), ("magcache", 0.5, (1.0,) + (0.99,) * 7)],
)
def test_step_cache_on_two_processes_skips_as_one_process(tmp_path, image, cache, threshold, coefficients):
    """Each rank sees half the tokens: TeaCache's and the first-block cache's rel-L1 are summed
    over the ranks, and rank 0's sections reset every rank's cache, so both ranks skip the steps
    one process skips (some, not all) and the video is one process's."""
    import framepack

    start = tmp_path / "start.png"
    Image.fromarray(image).save(start)
    kwargs = dict(model=str(tiny_bundle_dir()), image=str(start), prompt="a square", sections=2, steps=6,
                  cache=cache, cache_threshold=threshold, cache_coefficients=coefficients, png=True, name="v")  # fmt: skip
    one = framepack.generate(out_dir=tmp_path / "one", device="cpu", **kwargs)
    assert 0 < one.info["cache"]["skipped"] < 2 * (6 - 2)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_api_rank, args=(2, init, kwargs, str(tmp_path / "two")), nprocs=2, join=True)
    _same_video(one.video, tmp_path / "two" / "v.mp4")
    two = json.loads((tmp_path / "two" / "v.json").read_text())
    assert two["cache"] == one.info["cache"]
    print(f"{cache} {threshold}: {one.info['cache']}")


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("dtype", ["fp32", "release"])
def test_torchrun_demo_model_video_on_three_processes_equals_one(tmp_path, dtype):
    """The shipped demo model (3 heads) under a real torchrun, in fp32 and in the release's GPU
    dtypes (bf16 transformer, fp16 encoders and VAE): each token's and each head's arithmetic is
    the one process's (in bf16 up to the products' rounding over shards of other sizes)."""
    args = ["generate", "--image", DEMO_IMAGE, "--prompt", "a red circle moves right on a blue background",
            "--sections", "2", "--steps", "3", "--device", "cpu", "--dtype", dtype, "--png", "--name", "v"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "framepack", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "-m", "framepack", *args, "--out", str(tmp_path / "three")]  # fmt: skip
    three = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert three.returncode == 0, three.stderr[-3000:]
    assert three.stdout.split() == [str(tmp_path / "three" / "v.mp4")]  # printed once, by rank 0
    assert three.stderr.count("section(s) of") == 1  # the plan line too
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["v.json", "v.mp4", "v_frames"]
    _same_video(tmp_path / "one" / "v.mp4", tmp_path / "three" / "v.mp4", bf16=dtype == "release")


def test_a_process_count_that_does_not_divide_the_heads_is_one_sentence(tmp_path):
    """Two processes as torchrun starts them (its environment), on the demo model's 3 heads: exit 2
    on both, one sentence from rank 0, nothing from rank 1, nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "framepack", "generate", "--image", DEMO_IMAGE, "--prompt", "x",
           "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
            )
        )
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    (code0, out0, err0), (code1, out1, err1) = results
    assert (code0, code1) == (2, 2)
    assert err0.strip().splitlines() == [
        "framepack: one video on 2 processes needs a process count that divides the model's 3 attention heads (1, 3)."
    ]
    assert not (out0 + out1 + err1).strip()
    assert not (tmp_path / "out").exists()
