"""LoRAs at inference (framepack.lora): key conversion of each on-disk format on synthetic files,
scale 0 is exact, on the fly equals merged, removal restores the model, clear errors, and a LoRA
written by our own training."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from framepack.lora import applied_loras, attach_loras, load_loras, merge_loras, parse_lora_arg, read_lora
from framepack.model import SPECS, PackedTransformer
from framepack.testing import random_packed_inputs

RANK = 2
# One layer of each kind, the MLP layers read as raw weights included.
LAYERS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff_context.net.2",
    "transformer_blocks.0.norm1.linear",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.proj_out",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> PackedTransformer:
    torch.manual_seed(seed)
    return PackedTransformer(SPECS["tiny"]).eval()


@pytest.fixture(scope="module")
def inputs():
    return random_packed_inputs(SPECS["tiny"], 4, 4, window=2, text_tokens=4, seed=1)


def velocity(model, inputs) -> torch.Tensor:
    a = inputs
    with torch.no_grad():
        return model.forward_packed(
            a["noisy"], a["noisy_indices"], a["history"], a["timestep"], a["text"], a["text_mask"],
            a["pooled"], a["guidance"], a["image_embeds"],
        )  # fmt: skip


def factors(model, layers=LAYERS, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) per layer, large enough to change the output visibly."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    return {
        n: (
            torch.randn(RANK, mods[n].in_features, generator=g) * 0.3,
            torch.randn(mods[n].out_features, RANK, generator=g) * 0.3,
        )
        for n in layers
    }


def write(fmt: str, path, ups_downs: dict, alpha: float = 1.0):
    """A LoRA file in format `fmt` holding `ups_downs` (scale alpha / RANK, or 1 for diffusers)."""
    t = {}
    for n, (down, up) in ups_downs.items():
        if fmt == "peft":
            t[f"base_model.model.{n}.lora_A.weight"], t[f"base_model.model.{n}.lora_B.weight"] = down, up
        elif fmt == "diffusers":
            t[f"transformer.{n}.lora_A.weight"], t[f"transformer.{n}.lora_B.weight"] = down, up
        elif fmt == "kohya":
            k = "lora_unet_" + n.replace(".", "_")
            t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"] = down, up
            t[f"{k}.alpha"] = torch.tensor(alpha)
    if fmt == "peft":
        path.mkdir()
        save_file(t, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))
        return path
    save_file(t, str(path))
    return path


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_each_format_reads_to_the_same_updates(tmp_path, fmt):
    model = tiny_model()
    fs = factors(model)
    lora = read_lora(write(fmt, tmp_path / f"lora_{fmt}.safetensors", fs, alpha=0.5), model)
    scale = 1.0 if fmt == "diffusers" else 0.5 / RANK
    assert sorted(lora.layers) == sorted(LAYERS)
    for n, (down, up) in fs.items():
        torch.testing.assert_close(lora.layers[n].delta(), up @ down * scale)


def test_hunyuan_names_split_fused_layers(tmp_path):
    model = tiny_model()
    d = model.config.inner_dim
    hidden = model.single_transformer_blocks[0].proj_mlp.out_features
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(RANK, d, generator=g), torch.randn(3 * d, RANK, generator=g))
    lin1 = (torch.randn(RANK, d, generator=g), torch.randn(3 * d + hidden, RANK, generator=g))
    t = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv[0],
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv[1],
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(RANK)),
        "diffusion_model.single_blocks.0.linear1.lora_A.weight": lin1[0],
        "diffusion_model.single_blocks.0.linear1.lora_B.weight": lin1[1],
    }
    save_file(t, str(tmp_path / "hv.safetensors"))
    lora = read_lora(tmp_path / "hv.safetensors", model)
    q, k, v = (qkv[1] @ qkv[0]).split(d)
    torch.testing.assert_close(lora.layers["transformer_blocks.0.attn.to_k"].delta(), k)
    torch.testing.assert_close(lora.layers["transformer_blocks.0.attn.to_v"].delta(), v)
    mlp = (lin1[1] @ lin1[0])[3 * d :]
    torch.testing.assert_close(lora.layers["single_transformer_blocks.0.proj_mlp"].delta(), mlp)
    assert len(lora.layers) == 7


def test_scale_zero_is_exact_and_on_the_fly_equals_merged(tmp_path, inputs):
    model = tiny_model()
    base = velocity(model, inputs)
    a = read_lora(write("kohya", tmp_path / "a.safetensors", factors(model, seed=1)), model)
    b = read_lora(write("diffusers", tmp_path / "b.safetensors", factors(model, LAYERS[::2], seed=2)), model)

    with applied_loras(model, [(a, 0.0)]):
        assert torch.equal(velocity(model, inputs), base)

    with applied_loras(model, [(a, 1.0)]) as handle:
        on_the_fly = velocity(model, inputs)
        assert sorted(handle.layers) == sorted(LAYERS)
    assert not torch.allclose(on_the_fly, base, atol=1e-3)
    assert torch.equal(velocity(model, inputs), base)  # removed: the base model again
    merged = tiny_model()
    merge_loras(merged, [(a, 1.0)])
    torch.testing.assert_close(velocity(merged, inputs), on_the_fly, atol=1e-5, rtol=1e-4)

    pair = [(a, 0.7), (b, -0.4)]  # several LoRAs with their own scales
    with applied_loras(model, pair):
        both = velocity(model, inputs)
    merged = tiny_model()
    merge_loras(merged, pair)
    torch.testing.assert_close(velocity(merged, inputs), both, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", ["transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"])
def test_mlp_layers_read_raw_still_take_the_update(tmp_path, inputs, layer):
    model = tiny_model()
    base = velocity(model, inputs)
    lora = read_lora(write("peft", tmp_path / "one", factors(model, [layer])), model)
    handle = attach_loras(model, [(lora, 1.0)])
    on_the_fly = velocity(model, inputs)
    handle.remove()
    merge_loras(model, [(lora, 1.0)])
    merged = velocity(model, inputs)
    assert not torch.allclose(merged, base, atol=1e-3)
    torch.testing.assert_close(on_the_fly, merged, atol=1e-5, rtol=1e-4)


def test_bad_files_are_one_sentence(tmp_path):
    model = tiny_model()
    cases = {
        "unknown": {"lora_unet_nowhere_layer.lora_down.weight": torch.zeros(2, 64),
                    "lora_unet_nowhere_layer.lora_up.weight": torch.zeros(64, 2)},
        "shape": {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                  "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)},
        "half": {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64)},
        "full": {"transformer_blocks.0.attn.to_q.weight": torch.zeros(64, 64)},
    }  # fmt: skip
    needles = {"unknown": "matches no layer", "shape": "another model", "half": "no up", "full": "not a LoRA"}
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=needles[name]) as e:
            read_lora(tmp_path / f"{name}.safetensors", model)
        assert "\n" not in str(e.value) and str(e.value).endswith((".", "?"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for path in ("junk.safetensors", "missing.safetensors"):
        with pytest.raises(ValueError, match=path):
            read_lora(tmp_path / path, model)
    with pytest.raises(ValueError, match="scale"):
        load_loras(model, [(tmp_path / "shape.safetensors", float("nan"))])


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora_arg("C:/loras/a.safetensors:-1") == ("C:/loras/a.safetensors", -1.0)
    assert parse_lora_arg("C:/loras/a.safetensors") == ("C:/loras/a.safetensors", 1.0)


def test_a_lora_from_our_training_loads_and_matches_its_merged_checkpoint(tmp_path):
    from framepack.model import load_transformer
    from framepack.testing import tiny_bundle, tiny_bundle_dir
    from framepack.training.config import TrainConfig
    from framepack.training.prepare import prepare_dataset
    from framepack.training.train import Trainer
    from framepack.training.world import write_dataset

    write_dataset(tmp_path / "videos", 2, frames=21, size=32, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_dataset(tmp_path / "videos", tiny_bundle(), tmp_path / "cache", window=2, progress=False)
    bundle = tiny_bundle_dir()
    cfg = TrainConfig(
        data=str(tmp_path / "cache"), output=str(tmp_path / "run"), model=str(bundle), window=2,
        batch_size=2, mode="lora", lora_rank=4, lr=1e-2, steps=3, progress=False,
    )  # fmt: skip
    trainer = Trainer(cfg)
    result = trainer.run()
    batch = trainer.batch(0)
    inputs = dict(
        noisy=batch.noisy, noisy_indices=batch.noisy_indices, history=batch.history,
        timestep=batch.sigma * 1000, text=batch.text, text_mask=batch.text_mask, pooled=batch.pooled,
        guidance=torch.full((2,), 1e4), image_embeds=batch.image_embeds,
    )  # fmt: skip

    model = load_transformer(bundle / "transformer")
    base = velocity(model, inputs)
    lora = read_lora(result.checkpoint / "lora", model)  # the folder, config and all
    assert read_lora(result.checkpoint, model).layers.keys() == lora.layers.keys()  # or the checkpoint
    assert lora.layers and all(".attn." in n for n in lora.layers)
    with applied_loras(model, [(lora, 1.0)]):
        adapted = velocity(model, inputs)
    assert not torch.allclose(adapted, base, atol=1e-6)
    merged = load_transformer(result.checkpoint / "transformer")  # training's own merge
    torch.testing.assert_close(velocity(merged, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_generation_with_loras_and_the_cli_errors(tmp_path):
    import shutil
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from framepack.io import read_video
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings, settings_from_dict
    from framepack.testing import tiny_bundle, tiny_bundle_dir

    bundle = tiny_bundle()
    lora = write("kohya", tmp_path / "style.safetensors", factors(bundle.transformer, seed=4), alpha=RANK)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (200, 40, 90)
    videos = {}
    for scale in (None, 0.0, 1.0):
        loras = () if scale is None else ((str(lora), scale),)
        settings = GenerationSettings(
            prompt="a cat", sections=1, steps=2, name=f"v{scale}", loras=loras, png=True
        )
        done = open_run(bundle, Request(settings, image)).run(tmp_path / "out")
        videos[scale] = read_video(done.video)[0]
        assert settings_from_dict(json.loads(done.sidecar.read_text())["settings"]) == settings
        assert not any("lora" in m._modules for m in bundle.transformer.modules())  # removed after the run
    assert np.array_equal(videos[0.0], videos[None])
    assert not np.array_equal(videos[1.0], videos[None])

    Image.fromarray(image).save(tmp_path / "start.png")
    cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--image", "start.png",
           "--prompt", "a cat", "--sections", "1", "--steps", "2", "--out", "cli", "--name", "merged",
           "--lora", f"{lora}:1", "--lora-merge", "--png"]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stderr

    # Merged into the weights: the same frames but for rounding (compared as written, before H.264,
    # whose rate control spreads a few one-level differences over the whole clip: 1.4 levels on
    # average in the mp4s against 3e-5 in the frames).
    def pngs(folder):
        return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(int)

    diff = np.abs(pngs(tmp_path / "cli" / "merged_frames") - pngs(tmp_path / "out" / "v1.0_frames"))
    assert diff.mean() < 0.01 and diff.max() <= 2
    (tmp_path / "cli" / "merged.mp4").unlink()
    (tmp_path / "cli" / "merged.json").unlink()
    shutil.rmtree(tmp_path / "cli" / "merged_frames")
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 8)}, str(tmp_path / "bad.safetensors"))
    for bad in ("bad.safetensors:0.5", "missing.safetensors", f"{lora}:abc"):
        cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--image",
               "start.png", "--prompt", "a cat", "--out", "cli", "--lora", bad]  # fmt: skip
        r = subprocess.run(
            cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "LoRA" in lines[0], r.stderr
        assert not (tmp_path / "cli").exists() or not any((tmp_path / "cli").iterdir())


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-streaming", "streaming-then-lora"])
def test_loras_work_with_weight_streaming(tmp_path, inputs, lora_first):
    from framepack.memory.budgets import GIB
    from framepack.memory.streaming import plan_memory
    from framepack.pipeline.speed import accelerate

    model = tiny_model()
    lora = read_lora(write("kohya", tmp_path / "a.safetensors", factors(model, seed=5)), model)
    with applied_loras(model, [(lora, 0.8)]):
        expected = velocity(model, inputs)

    def one_block_budget() -> float:  # room for one block: every block streams
        plan = plan_memory(model, None)
        return (plan.base_bytes + max(plan.block_bytes)) / GIB

    if lora_first:  # the LoRA factors stream with their blocks
        handle = attach_loras(model, [(lora, 0.8)])
        run = accelerate(model, "cpu", vram_budget=one_block_budget())
    else:  # the factors stay put and follow the input to its device
        run = accelerate(model, "cpu", vram_budget=one_block_budget())
        handle = attach_loras(model, [(lora, 0.8)])
    assert run.streamer is not None and run.streamer.plan.streamed
    streamed = velocity(model, inputs)
    handle.remove()
    base_streamed = velocity(model, inputs)
    run.detach()
    torch.testing.assert_close(streamed, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(base_streamed, velocity(model, inputs))


def test_generation_with_a_lora_under_a_vram_budget(tmp_path):
    import numpy as np

    from framepack.io import read_video
    from framepack.memory.budgets import GIB
    from framepack.memory.streaming import plan_memory
    from framepack.pipeline.budget import bundle_need
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings, prepare
    from framepack.pipeline.speed import accelerate
    from framepack.testing import tiny_bundle

    bundle = tiny_bundle()
    lora = write("peft", tmp_path / "style", factors(bundle.transformer, seed=6))
    image = np.full((64, 64, 3), 90, np.uint8)
    with applied_loras(bundle.transformer, load_loras(bundle.transformer, [(lora, 1.0)])):
        plan = plan_memory(bundle.transformer, None)  # the LoRA factors stream with their blocks
    vae = sum(t.numel() * t.element_size() for t in bundle.vae.state_dict().values())
    prepared = prepare(bundle, GenerationSettings(prompt="a cat", sections=1, steps=2), image=image)
    working = bundle_need(bundle, prepared).working  # the run's activations beside the weights
    budget = (plan.base_bytes + max(plan.block_bytes) + vae + working) / GIB  # one block + VAE: all stream
    frames = []
    for name, vram in (("resident", None), ("streamed", budget), ("again", budget)):
        s = GenerationSettings(
            prompt="a cat", sections=1, steps=2, name=name, loras=((str(lora), 1.0),), vram_budget=vram
        )
        done = open_run(bundle, Request(s, image)).run(tmp_path / "out")
        frames.append(read_video(done.video)[0])
        assert vram is None or "streamed" in done.info["memory_plan"]
    accelerate(bundle.transformer, bundle.transformer.device)  # back to all resident
    assert all(np.array_equal(f, frames[0]) for f in frames[1:])


def test_lora_specs_take_every_form_and_name_anything_else_in_one_sentence():
    from pathlib import Path

    from framepack.lora import lora_specs

    given = ["a.safetensors", "b.safetensors:0.5", ("c", 2), ["d", -1.0], Path("e:0.25")]
    assert lora_specs(given) == (
        ("a.safetensors", 1.0),
        ("b.safetensors", 0.5),
        ("c", 2),
        ("d", -1.0),
        ("e", 0.25),
    )
    assert lora_specs(None) == lora_specs([]) == ()
    assert lora_specs(lora_specs(given)) == lora_specs(given)  # normalised once is normalised
    for bad, needle in (
        ([5], r'^each LoRA is "FILE", "FILE:SCALE" or \(FILE, SCALE\), got 5\.$'),
        ([("a", 1, 2)], "^each LoRA is"),
        ([(3, 1.0)], "^each LoRA is"),
        ([""], "^each LoRA is"),
        (
            "a.safetensors:0.5",
            r"^loras is a list of LoRAs, got the single 'a.safetensors:0.5'; put it in a list\.$",
        ),
        (0.5, "^loras is a list of LoRAs, got float 0.5.$"),
    ):
        with pytest.raises(ValueError, match=needle):
            lora_specs(bad)
    with pytest.raises(ValueError, match=r"^jobs.jsonl:3: each LoRA is"):
        lora_specs([None], "jobs.jsonl:3")


def test_the_api_and_the_settings_take_the_lora_forms_of_the_cli_and_jobs_files(tmp_path, monkeypatch):
    """`framepack.generate(loras=["FILE:SCALE"])` (issue 18: "too many values to unpack"), the
    pair form, and `GenerationSettings(loras=["FILE"])` run the same LoRA the same way."""
    import numpy as np

    import framepack
    from framepack.io import read_video
    from framepack.pipeline import api
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings
    from framepack.testing import tiny_bundle_dir

    model = str(tiny_bundle_dir())
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (200, 40, 90)
    bundle = api.loaded_bundle(model, "cpu")
    lora = write("kohya", tmp_path / "style.safetensors", factors(bundle.transformer, seed=4), alpha=RANK)
    monkeypatch.chdir(tmp_path)
    run = dict(image=image, prompt="a cat", sections=1, steps=2, device="cpu")
    videos = {}
    for name, loras in (("string", ["style.safetensors:0.8"]), ("pair", [(str(lora), 0.8)])):
        done = framepack.generate(model, tmp_path / "out", loras=loras, name=name, **run)
        videos[name] = read_video(done.video)[0]
        sidecar = json.loads(done.sidecar.read_text())
        assert sidecar["settings"]["loras"] == [[str(lora), 0.8]]
    settings = GenerationSettings(
        prompt="a cat", sections=1, steps=2, name="plain", loras=["style.safetensors"]
    )
    done = open_run(bundle, Request(settings, image)).run(tmp_path / "out")
    assert json.loads(done.sidecar.read_text())["settings"]["loras"] == [[str(lora), 1.0]]
    assert np.array_equal(videos["string"], videos["pair"])
    with pytest.raises(ValueError, match=r"^each LoRA is .*got 0\.8\.$"):
        framepack.generate(model, tmp_path / "out", loras=["style.safetensors", 0.8], **run)
