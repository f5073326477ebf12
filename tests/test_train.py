"""framepack.training.train and `framepack train`: packed-context training on a tiny latent cache (CPU)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framepack.cli.train import add_parser
from framepack.cli.train import main as train_main
from framepack.model import init_kernel_from_base, load_transformer
from framepack.testing import tiny_bundle, tiny_bundle_dir
from framepack.training.config import TrainConfig, load_config
from framepack.training.prepare import prepare_dataset
from framepack.training.train import Trainer, train
from framepack.training.world import write_dataset

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is fastest on one thread, which is also immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two demo clips of 6 latents (21 frames), encoded with the tiny bundle at window 2."""
    videos = tmp_path_factory.mktemp("videos")
    write_dataset(videos, 2, frames=21, size=32, seed=0, progress=False)
    out = tmp_path_factory.mktemp("cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_dataset(videos, tiny_bundle(), out, window=2, progress=False)
    return out


def config(cache, output, **changes) -> TrainConfig:
    base = dict(data=str(cache), output=str(output), model="tiny", window=2, batch_size=2, lr=1e-3)
    return TrainConfig(**{**base, "progress": False, "log_every": 1, **changes})


def log_losses(output) -> list[float]:
    with open(output / "loss.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_lowers_the_loss_and_checkpoints_load(cache, tmp_path):
    trainer = Trainer(config(cache, tmp_path, steps=30, checkpoint_every=10, keep_checkpoints=2))
    result = trainer.run()
    assert len(result.losses) == 30 and result.step == 30
    assert sum(result.losses[-10:]) / 10 < 0.9 * sum(result.losses[:10]) / 10
    assert log_losses(tmp_path) == pytest.approx(result.losses, rel=1e-6)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    loaded = load_transformer(result.checkpoint / "transformer")
    state = trainer.model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_resume_equals_an_unbroken_run(cache, tmp_path):
    settings = dict(checkpoint_every=2, ema_decay=0.9, keep_checkpoints=0)
    train(config(cache, tmp_path / "a", steps=6, **settings))
    train(config(cache, tmp_path / "b", steps=3, **settings))  # stopped after step 3
    resumed = train(config(cache, tmp_path / "b", steps=6, **settings))
    assert len(resumed.losses) == 3
    a, b = tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6"
    for name in (WEIGHTS, "transformer_ema/diffusion_pytorch_model.safetensors", "optimizer.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert log_losses(tmp_path / "a") == log_losses(tmp_path / "b")
    with pytest.raises(ValueError, match="lr"):  # a resumed run must keep its settings
        train(config(cache, tmp_path / "b", steps=8, lr=2e-3, **settings))


def test_lora_trains_only_adapters_and_merges(cache, tmp_path):
    bundle = tiny_bundle_dir()
    cfg = config(cache, tmp_path, model=str(bundle), mode="lora", lora_rank=4, lr=1e-2, steps=20)
    trainer = Trainer(cfg.replace(new_kernels=("k8",)))
    base = load_transformer(bundle / "transformer")
    k8 = trainer.model.clean_x_embedder.proj_8x
    expected = torch.nn.Conv3d(16, k8.out_channels, k8.kernel_size, k8.kernel_size)
    init_kernel_from_base(base.clean_x_embedder.proj, expected)
    assert torch.equal(k8.weight, expected.weight) and torch.equal(k8.bias, expected.bias)
    assert trainer.trainable and all(".lora_" in n for n in trainer.trainable)

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.run()
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainer.trainable)

    adapter = load_file(str(result.checkpoint / "lora" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter)
    merged = load_transformer(result.checkpoint / "transformer")  # adapters folded in
    batch = trainer.batch(0)
    trainer.model.eval()
    with torch.no_grad():

        def velocity(m):
            args = (batch.sigma * 1000, batch.text, batch.text_mask, batch.pooled, torch.full((2,), 1e4))
            return m.forward_packed(
                batch.noisy, batch.noisy_indices, batch.history, *args, batch.image_embeds
            )

        torch.testing.assert_close(velocity(merged), velocity(trainer.model), atol=1e-5, rtol=1e-5)


def test_history_discretization(cache, tmp_path):
    trainer = Trainer(config(cache, tmp_path, discretize=8, order="forward", steps=2))
    codebook = load_file(str(tmp_path / "codebook.safetensors"))["codebook"]
    assert codebook.shape == (8, 16) and torch.equal(codebook, trainer.codebook)
    seen = 0
    for step in range(3):
        for i, group in enumerate(trainer.batch(step).history):
            latents = group.latents[:, :, 1:] if i == 0 else group.latents  # k1: the anchor stays clean
            pixels = latents.movedim(1, -1).reshape(-1, 16)
            pixels = pixels[pixels.abs().sum(1) > 0]  # zero-filled slots stay zero, as at inference
            assert (pixels[:, None] == codebook[None]).all(-1).any(-1).all()
            seen += len(pixels)
    assert seen > 0
    trainer.run()  # and it trains


def _torchrun(cfg_path, output, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "framepack.train", str(cfg_path), "--set", f"output='{output}'", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(cache, tmp_path, fsdp):
    cfg_path = tmp_path / "train.toml"
    cfg_path.write_text(
        f"data = '{cache}'\nmodel = 'tiny'\noutput = 'unused'\nwindow = 2\nbatch_size = 2\n"
        "lr = 1e-3\nsteps = 6\nlog_every = 1\nprogress = false\n"
    )
    single = train(load_config(cfg_path, {"output": str(tmp_path / "one")}))
    run = _torchrun(cfg_path, tmp_path / "two", "--set", f"fsdp={str(fsdp).lower()}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert log_losses(tmp_path / "two") == pytest.approx(single.losses, abs=1e-5)
    state = json.loads((tmp_path / "two" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    if not fsdp:  # every DDP rank holds the same weights
        assert len(set(state["rank_digests"])) == 1
    x = load_file(str(tmp_path / "one" / "checkpoint-6" / WEIGHTS))
    y = load_file(str(tmp_path / "two" / "checkpoint-6" / WEIGHTS))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-4, rtol=0)


def test_caption_dropout_trains_on_the_empty_caption(cache, tmp_path):
    from framepack.training.data import LatentCache

    empty = LatentCache(cache).empty_prompt()
    dropped = Trainer(config(cache, tmp_path / "a", caption_dropout=1.0)).batch(0)
    for key, name in (("text", "text"), ("text_mask", "text_mask"), ("pooled", "pooled")):
        assert all(torch.equal(row, empty[name].float()) for row in getattr(dropped, key))
    kept = Trainer(config(cache, tmp_path / "b")).batch(0)
    assert not torch.equal(kept.pooled[0], empty["pooled"].float())
    assert torch.equal(kept.noisy, dropped.noisy)  # dropout changes the caption only


def test_motion_weight_favours_what_moved(cache, tmp_path):
    from framepack.training.samples import motion_weights, weighted_mse

    start = torch.zeros(16, 1, 4, 4)
    x0 = torch.zeros(16, 3, 4, 4)
    x0[:, 2, 1, 1] = 2.0  # one latent pixel moved, in the last frame of the window
    w = motion_weights(x0, start, 9.0)
    assert w.shape == (1, 3, 4, 4) and w.mean().item() == pytest.approx(1.0)
    assert w[0, 2, 1, 1] == pytest.approx(10 * w[0, 0, 0, 0].item()) and w.max() == w[0, 2, 1, 1]
    assert torch.equal(motion_weights(start.expand(16, 3, 4, 4), start, 9.0), torch.ones(1, 3, 4, 4))
    pred, target = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    assert torch.equal(weighted_mse(pred, target, None), torch.nn.functional.mse_loss(pred, target))

    plain = Trainer(config(cache, tmp_path / "a")).batch(0)
    weighted = Trainer(config(cache, tmp_path / "b", motion_weight=4.0)).batch(0)
    assert plain.weight is None and weighted.weight.shape == (2, 1, *plain.noisy.shape[2:])
    assert torch.equal(plain.noisy, weighted.noisy)  # the weights change the loss only
    assert weighted.weight.mean().item() == pytest.approx(1.0) and weighted.weight.max() > 1.5
    result = train(config(cache, tmp_path / "c", steps=20, motion_weight=4.0))  # and it trains
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_bad_configs_are_one_sentence(tmp_path, capsys):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("data: cache\noutput: out\nlearning_rate: 0.1\n")
    assert train_main([str(bad_key)]) == 2
    err = capsys.readouterr().err
    assert "'learning_rate' is unknown" in err and err.count("\n") == 1
    missing = tmp_path / "b.toml"
    missing.write_text("data = 'nowhere'\noutput = 'out'\n")
    assert train_main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and err.count("\n") == 1
    assert train_main([str(missing), "--set", "steps=0"]) == 2
    assert "'steps' must be an integer of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("targets", [["proj_mlp"], ["to_q", "proj_mlp"]])
def test_lora_target_read_as_a_raw_weight_is_one_sentence(cache, tmp_path, capsys, targets):
    """The fused MLP reads `proj_mlp` as a raw weight: an adapter there would never train. The run
    stops at its first step, before backward (which fails when no adapter was called at all), with
    one sentence, and leaves no log or checkpoint behind."""
    out = tmp_path / "run"
    toml = tmp_path / "lora.toml"
    toml.write_text(
        f"data = '{cache}'\noutput = '{out}'\nmodel = '{tiny_bundle_dir()}'\nmode = 'lora'\n"
        f"window = 2\nsteps = 2\nprogress = false\nlora_targets = {targets!r}\n".replace("'", '"')
    )
    assert train_main([str(toml)]) == 2
    err = capsys.readouterr().err
    assert "proj_mlp is read as a raw weight" in err and err.count("\n") == 1, err
    assert not (out / "loss.csv").exists() and not list(out.glob("checkpoint-*"))


def test_every_config_key_is_documented():
    text = DOCS.read_text()
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in text, f.name


def test_subcommand_parses():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "run.toml", "--set", "steps=5"])
    assert args.config == "run.toml" and args.overrides == ["steps=5"] and callable(args.func)
