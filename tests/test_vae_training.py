"""framepack.training.vae: training a small AutoencoderKLHunyuanVideo on the demo world."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from framepack.training.vae import (
    HELDOUT_SEED,
    VAETrainConfig,
    build_vae,
    demo_clips,
    latent_stats,
    main,
    reconstruction_psnr,
    shape_weights,
    train_vae,
)

TINY = dict(channels=(8, 8, 16, 16), groups=2, size=32, clip_frames=5, batch=2, heldout=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    config = VAETrainConfig(**TINY, steps=40, lr=3e-4, warmup=0, image_every=4)
    vae, report = train_vae(config, out, progress=False)
    return config, vae, report, out


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="4k \\+ 1"):
        VAETrainConfig(clip_frames=8)
    with pytest.raises(ValueError, match="divide"):
        VAETrainConfig(channels=(8, 12, 16, 16), groups=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        VAETrainConfig(size=60)
    with pytest.raises(ValueError, match="steps"):
        VAETrainConfig(steps=0)


@pytest.mark.parametrize("frames, latents", [(1, 1), (5, 2), (9, 3), (13, 4)])
def test_shapes_follow_the_release_layout(frames, latents):
    config = VAETrainConfig(**TINY)
    vae = build_vae(config).eval()
    assert vae.config.latent_channels == 16
    x = demo_clips([3], config, frames=frames)  # (1, 3, T, 32, 32)
    assert x.shape == (1, 3, frames, 32, 32)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    assert z.shape == (1, 16, latents, 4, 4)  # 4k + 1 frames -> k + 1 latents, 8x spatial
    assert y.shape == x.shape


def test_clips_are_deterministic_and_in_range():
    config = VAETrainConfig(**TINY)
    a, b = demo_clips([1, 2], config), demo_clips([1, 2], config)
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a[0], a[1])
    held = demo_clips(range(HELDOUT_SEED, HELDOUT_SEED + 2), config)
    assert not torch.equal(held, a)


def test_build_is_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    one, two = build_vae(VAETrainConfig(**TINY)), build_vae(VAETrainConfig(**TINY))
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loss_goes_down(trained):
    _, _, report, out = trained
    assert report.steps == 40 and len(report.losses) == 40
    assert np.isfinite(report.losses).all()
    assert np.mean(report.losses[-10:]) < 0.9 * np.mean(report.losses[:10])
    with open(out / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {r["frames"] for r in rows} == {"1", "5"}  # clips and single frames
    assert float(rows[0]["loss"]) == pytest.approx(report.losses[0], abs=1e-5)


def test_save_load_round_trip(trained):
    from diffusers import AutoencoderKLHunyuanVideo

    config, vae, report, out = trained
    loaded = AutoencoderKLHunyuanVideo.from_pretrained(out).eval()
    assert loaded.config.scaling_factor == pytest.approx(report.scaling_factor)
    assert tuple(loaded.config.block_out_channels) == config.channels
    assert report.size_bytes == sum(p.stat().st_size for p in out.glob("*.safetensors")) > 0
    x = demo_clips([HELDOUT_SEED], config)
    with torch.no_grad():
        a = vae.decode(vae.encode(x).latent_dist.mode()).sample
        b = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(a, b)
    summary = json.loads((out / "train_report.json").read_text())
    assert summary["steps"] == 40 and "losses" not in summary
    assert summary["config"]["channels"] == list(config.channels)


def test_latent_stats_give_unit_std_after_scaling(trained):
    config, vae, report, _ = trained
    clips = demo_clips(range(HELDOUT_SEED, HELDOUT_SEED + config.heldout), config)
    mean, std = latent_stats(vae, clips)
    assert (mean, std) == pytest.approx((report.latent_mean, report.latent_std), rel=1e-5)
    assert np.isfinite(mean) and std > 0
    assert report.scaling_factor == pytest.approx(1 / std)
    with torch.no_grad():
        z = vae.encode(clips).latent_dist.mode() * report.scaling_factor
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)
    # batches in a list give the same statistics as one tensor
    assert latent_stats(vae, [clips[:1], clips[1:]]) == pytest.approx((mean, std), rel=1e-4)


def test_psnr_is_sane(trained):
    config, vae, report, _ = trained
    clips = demo_clips(range(HELDOUT_SEED, HELDOUT_SEED + config.heldout), config)
    assert reconstruction_psnr(vae, clips) == pytest.approx(report.heldout_psnr)
    assert 5 < report.heldout_psnr < 60


def test_cli_trains_and_rejects_bad_input(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "2", "--channels", "8,8,16,16", "--groups", "2"]
    assert main(args + ["--size", "32", "--clip-frames", "5", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--clip-frames", "8"])
    assert e.value.code == 2 and "4k + 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--channels", "8,x"])
    assert "four comma-separated" in capsys.readouterr().err


def test_schedule_warms_up_and_anneals_by_steps_or_clock():
    from framepack.training.vae import lr_at

    config = VAETrainConfig(steps=100, warmup=10, lr=1e-4)
    assert lr_at(0, config) == pytest.approx(1e-5)
    assert lr_at(10, config) == pytest.approx(1e-4)
    assert lr_at(99, config) == pytest.approx(1e-5, rel=1e-2)
    timed = VAETrainConfig(steps=100, warmup=10, lr=1e-4, max_minutes=1.0)
    assert lr_at(20, timed, elapsed=0.0) == pytest.approx(lr_at(20, config))
    assert lr_at(20, timed, elapsed=60.0) == pytest.approx(1e-5)  # the clock ran out first


def test_shape_weights_favour_the_shape():
    config = VAETrainConfig(**TINY)
    x = demo_clips([HELDOUT_SEED], config)  # (1, 3, T, H, W)
    assert torch.equal(shape_weights(x, 0.0), torch.ones_like(x[:, :1]))
    w = shape_weights(x, 10.0)
    assert w.shape == (1, 1, *x.shape[2:]) and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    background = x[0, :, 0, 0, 0]  # the corner is always background (the shape keeps a margin)
    on_shape = (x[0] - background[:, None, None, None]).abs().amax(dim=0) > 0.1  # (T, H, W)
    assert 0 < float(on_shape.float().mean()) < 0.5
    assert float(w[0, 0][on_shape].min()) == pytest.approx(11 * float(w[0, 0][~on_shape].max()))


def test_training_continues_from_a_saved_vae(trained, tmp_path, capsys):
    config, vae, _, out = trained
    same = VAETrainConfig(**TINY, steps=1, lr=1e-12, warmup=0, image_every=0, init=str(out))
    continued, _ = train_vae(same, None, progress=False)
    for (name, a), b in zip(vae.state_dict().items(), continued.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)  # one step at lr 1e-12
    args = ["--out", str(tmp_path), "--steps", "1", "--init", str(out), "--channels", "8,8,16,32"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--groups", "2", "--size", "32", "--clip-frames", "5", "--quiet"])
    assert e.value.code == 2 and "configured widths" in capsys.readouterr().err
