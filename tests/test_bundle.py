"""Bundles (layout, manifest, errors, download plan) and conditioning, on tiny real-class bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from framepack.pipeline.bundle import component_dtypes, load_bundle
from framepack.pipeline.conditioning import (
    encode_image,
    encode_prompt,
    template_crop_for,
    vae_decode,
    vae_encode,
)
from framepack.pipeline.manifest import (
    COMPONENTS,
    HUNYUAN_PROMPT_TEMPLATE,
    MANIFEST_NAME,
    BundleError,
    Manifest,
)
from framepack.pipeline.named import NAMED_BUNDLES, download_bundle, download_plan
from framepack.testing import make_tiny_bundle, tiny_bundle_dir

PROMPT = "A cat walks in the rain, the camera slowly zooms in."


@pytest.fixture
def bundle_copy(tmp_path):
    return shutil.copytree(tiny_bundle_dir(), tmp_path / "bundle")


@pytest.fixture
def reference(bundle):
    """diffusers' FramePack pipeline on the same components: the oracle for the encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline

    return HunyuanVideoFramepackPipeline(
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        transformer=None,  # not needed to encode
        vae=bundle.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=bundle.text_encoder_2,
        tokenizer_2=bundle.tokenizer_2,
        image_encoder=bundle.image_encoder,
        feature_extractor=bundle.feature_extractor,
    )


# ------------------------------------------------------------------------------------- the bundle
def test_make_and_load_tiny_bundle(tmp_path):
    root = make_tiny_bundle(tmp_path / "b", order="forward", seed=3)
    assert sorted(p.name for p in root.iterdir()) == sorted([*COMPONENTS, "framepack.json"])
    assert not [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    b = load_bundle(root)
    assert b.root == root and b.manifest.order == "forward" and b.manifest.packing == "forward"
    assert type(b.text_encoder).__name__ == "LlamaModel"
    assert type(b.text_encoder_2).__name__ == "CLIPTextModel"
    assert type(b.image_encoder).__name__ == "SiglipVisionModel"
    assert type(b.vae).__name__ == "AutoencoderKLHunyuanVideo"
    assert type(b.transformer).__name__ == "PackedTransformer"
    assert set(b.dtypes().values()) == {torch.float32}
    cfg = b.transformer.config
    assert cfg.text_embed_dim == b.text_encoder.config.hidden_size
    assert cfg.pooled_projection_dim == b.text_encoder_2.config.hidden_size
    assert cfg.image_proj_dim == b.image_encoder.config.hidden_size
    assert b.vae.config.latent_channels == 16 and b.vae.config.scaling_factor == pytest.approx(0.476986)
    assert not any(p.requires_grad for m in b.modules().values() for p in m.parameters())
    assert b.transformer.fp32_head


def test_tiny_bundle_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    state = torch.random.get_rng_state()
    a = make_tiny_bundle(tmp_path / "a", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (a / weights).read_bytes() == (tiny_bundle_dir(seed=1) / weights).read_bytes()
    assert (a / weights).read_bytes() != (tiny_bundle_dir(seed=0) / weights).read_bytes()


def test_load_with_dtype_and_release_dtypes(bundle_copy):
    b = load_bundle(bundle_copy, dtype=torch.float64)
    assert set(b.dtypes().values()) == {torch.float64}
    gpu = component_dtypes("cuda")
    assert gpu.pop("transformer") == torch.bfloat16 and set(gpu.values()) == {torch.float16}
    assert set(component_dtypes("cpu").values()) == {torch.float32}


def test_load_with_per_component_dtypes():
    release = load_bundle(tiny_bundle_dir(), dtypes=component_dtypes("cuda"))  # on the CPU
    assert release.dtypes() == component_dtypes("cuda") and release.device == torch.device("cpu")
    half = load_bundle(tiny_bundle_dir(), dtypes={"vae": torch.float16})  # the others keep their default
    assert half.dtypes() == {**component_dtypes("cpu"), "vae": torch.float16}
    with pytest.raises(BundleError, match="'unet', not a component"):
        load_bundle(tiny_bundle_dir(), dtypes={"unet": torch.float16})
    with pytest.raises(BundleError, match="not both"):
        load_bundle(tiny_bundle_dir(), dtype=torch.float16, dtypes={"vae": torch.float16})


# ---------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip_and_defaults(tmp_path):
    m = Manifest(order="forward", packing="f16k4f2k2f1k1_g9", shift=3.0, name="x")
    path = m.save(tmp_path)
    assert path.name == "framepack.json"
    assert Manifest.load(tmp_path) == m == Manifest.load(path)
    d = Manifest()
    assert (d.template_crop, d.max_prompt_tokens, d.text_hidden_layer, d.window) == (95, 256, -3, 9)
    assert (d.fps, d.resolution, d.steps, d.distilled_guidance, d.shift) == (30, 640, 25, 10.0, None)
    assert d.cfg == 1.0  # real CFG off by default, as the release


def test_prompt_template_is_diffusers_default():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import DEFAULT_PROMPT_TEMPLATE

    assert HUNYUAN_PROMPT_TEMPLATE == DEFAULT_PROMPT_TEMPLATE["template"]
    assert Manifest().template_crop == DEFAULT_PROMPT_TEMPLATE["crop_start"]


@pytest.mark.parametrize(
    "data, words",
    [
        ({"order": "inverted", "windw": 9}, "unknown key 'windw'"),
        ({"order": "sideways"}, "order"),
        ({"packing": "f16k9"}, "packing schedule"),
        ({"prompt_template": "no placeholder"}, "exactly one '{}'"),
        ({"window": 0}, "window"),
        ({"resolution": 100}, "multiple of 16"),
        ({"shift": -1.0}, "shift"),
        ({"cfg": 0}, "cfg"),
    ],
)
def test_manifest_rejects_bad_values(tmp_path, data, words):
    (tmp_path / "framepack.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=words) as info:
        Manifest.load(tmp_path)
    assert str(info.value).count(". ") == 0  # one sentence


def test_bad_manifest_in_bundle(bundle_copy):
    (bundle_copy / "framepack.json").write_text('{"order": "inverted", "colour": 1}')
    with pytest.raises(BundleError, match="framepack.json.*unknown key 'colour'"):
        load_bundle(bundle_copy)


# ------------------------------------------------------------------------------------------ errors
def test_missing_manifest(bundle_copy):
    (bundle_copy / "framepack.json").unlink()
    with pytest.raises(BundleError, match="has no framepack.json"):
        load_bundle(bundle_copy)


def test_missing_component(bundle_copy):
    shutil.rmtree(bundle_copy / "vae")
    with pytest.raises(BundleError, match="lacks its vae component"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "component", ["text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer"]
)
def test_corrupt_config(bundle_copy, component):
    (bundle_copy / component / "config.json").write_text("{ not json")
    with pytest.raises(BundleError, match=f"the {component} component"):
        load_bundle(bundle_copy)


def test_wrong_model_class(bundle_copy):
    shutil.rmtree(bundle_copy / "text_encoder")
    shutil.copytree(bundle_copy / "text_encoder_2", bundle_copy / "text_encoder")
    with pytest.raises(BundleError, match="text_encoder component is a 'clip_text_model' model"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("component", ["tokenizer", "vae"])
def test_corrupt_files(bundle_copy, component):
    target = {"tokenizer": "tokenizer.json", "vae": "diffusion_pytorch_model.safetensors"}[component]
    path = bundle_copy / component / target
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match=f"the {component} component .*could not be loaded"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("component", ["image_encoder", "vae"])
def test_incomplete_checkpoint_is_refused(bundle_copy, component):
    """transformers and diffusers would fill missing weights randomly (or leave them on `meta`)."""
    from safetensors.torch import load_file, save_file

    weights = next((bundle_copy / component).glob("*.safetensors"))
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(BundleError, match=f"{component} component's checkpoint lacks the weight '{dropped}'"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("component", ["text_encoder", "transformer"])
def test_pickle_only_component_is_refused(bundle_copy, component):
    folder = bundle_copy / component
    weights = next(folder.glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(BundleError, match=f"{component} component holds only pickle weights.*refused"):
        load_bundle(bundle_copy)


def test_unknown_name_lists_named_bundles(tmp_path):
    with pytest.raises(BundleError, match="hunyuan-i2v, hunyuan-f1"):
        load_bundle(str(tmp_path / "no-such-bundle"))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty hub cache with the hub client in offline mode: nothing can reach the network."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub-cache"


@pytest.mark.parametrize("name", sorted(NAMED_BUNDLES))
def test_named_bundle_offline(offline_hub, name):
    with pytest.raises(BundleError, match=r"offline") as info:
        download_bundle(name, progress=False, cache_dir=offline_hub)
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError, match=rf"not \(completely\) in the local Hugging Face cache.*{name}"):
        load_bundle(name, cache_dir=offline_hub)


def test_download_plan():
    i2v, f1 = download_plan("hunyuan-i2v"), download_plan("hunyuan-f1")
    common = {"hunyuanvideo-community/HunyuanVideo", "lllyasviel/flux_redux_bfl"}
    assert set(i2v) == common | {"lllyasviel/FramePackI2V_HY"}
    assert set(f1) == common | {"lllyasviel/FramePack_F1_I2V_HY_20250503"}

    def wanted(repo: str, path: str) -> bool:  # the hub client's own filter
        return list(filter_repo_objects([path], allow_patterns=i2v[repo])) == [path]

    for patterns in (*i2v.values(), *f1.values()):
        assert not [p for p in patterns if p.endswith((".bin", ".pt", ".pth", ".ckpt", "*"))]
    hy, redux, tr = (
        "hunyuanvideo-community/HunyuanVideo",
        "lllyasviel/flux_redux_bfl",
        "lllyasviel/FramePackI2V_HY",
    )
    folders = {p.split("/")[0] for p in i2v[hy]}
    assert folders == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"}
    assert {p.split("/")[0] for p in i2v[redux]} == {"feature_extractor", "image_encoder"}
    for path in (
        "text_encoder/model-00001-of-00004.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/tokenizer.json",
        "tokenizer_2/merges.txt",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/config.json",
    ):
        assert wanted(hy, path), path
    for path in (
        "transformer/diffusion_pytorch_model-00001-of-00006.safetensors",  # HunyuanVideo's own model
        "text_encoder/pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "README.md",
    ):
        assert not wanted(hy, path), path
    assert wanted(redux, "image_encoder/model.safetensors") and wanted(
        redux, "feature_extractor/preprocessor_config.json"
    )
    assert not wanted(redux, "image_embedder/diffusion_pytorch_model.safetensors")
    assert wanted(tr, "diffusion_pytorch_model-00002-of-00003.safetensors")
    assert wanted(tr, "diffusion_pytorch_model.safetensors.index.json") and wanted(tr, "config.json")
    assert not wanted(tr, "diffusion_pytorch_model.fp8.safetensors")
    with pytest.raises(BundleError, match="hunyuan-i2v"):
        download_plan("nope")


# ------------------------------------------------------------------------------------ conditioning
def test_template_crop_matches_the_released_rule(bundle):
    tok, m = bundle.tokenizer, bundle.manifest
    assert m.template_crop == template_crop_for(tok, m.prompt_template)
    ids = tok(m.prompt_template.format(PROMPT)).input_ids
    # What is left after the crop is the prompt and the closing <|eot_id|>, nothing of the template.
    assert tok.decode(ids[m.template_crop :]) == PROMPT + "<|eot_id|>"


def test_encode_prompt_shapes_and_mask(bundle):
    m = bundle.manifest
    e = encode_prompt(bundle, PROMPT)
    n = len(bundle.tokenizer(m.prompt_template.format(PROMPT)).input_ids) - m.template_crop
    assert e.text.shape == (1, m.max_prompt_tokens, bundle.text_encoder.config.hidden_size)
    assert e.mask.shape == (1, m.max_prompt_tokens) and e.mask.dtype == torch.long
    assert e.pooled.shape == (1, bundle.text_encoder_2.config.hidden_size)
    assert e.length == n and not e.truncated
    assert e.mask[0, :n].all() and not e.mask[0, n:].any()
    assert e.text[0, :n].abs().sum(-1).gt(0).all() and not e.text[0, n:].any()
    assert e.text.dtype == e.pooled.dtype == torch.float32


def test_encode_prompt_truncates_long_prompts(bundle):
    long = " ".join(["rain"] * 400)
    e = encode_prompt(bundle, long)
    assert e.truncated and e.length == bundle.manifest.max_prompt_tokens


@pytest.mark.parametrize("prompt", [PROMPT, "", " ".join(["city street"] * 200)])
def test_encode_prompt_matches_diffusers(bundle, reference, prompt):
    m = bundle.manifest
    template = {"template": m.prompt_template, "crop_start": m.template_crop}
    text, mask = reference._get_llama_prompt_embeds(prompt, template, device="cpu", dtype=torch.float32)
    pooled = reference._get_clip_prompt_embeds(prompt, device="cpu", dtype=torch.float32)
    ours = encode_prompt(bundle, prompt)
    assert torch.equal(ours.mask, mask.long())
    torch.testing.assert_close(ours.text, text * mask[..., None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=1e-5)
    # diffusers computes the crop itself when crop_start is None: the same tokens come out.
    computed, _ = reference._get_llama_prompt_embeds(prompt, {"template": m.prompt_template}, device="cpu")
    torch.testing.assert_close(computed, text, atol=1e-6, rtol=0)


def test_encode_image(bundle, reference, monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    emb = encode_image(bundle, image)
    side, patch = bundle.image_encoder.config.image_size, bundle.image_encoder.config.patch_size
    assert emb.shape == (1, (side // patch) ** 2, bundle.image_encoder.config.hidden_size)
    # Against diffusers on an image at the encoder's size (its [-1, 1] tensor path resizes differently).
    square = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    monkeypatch.setattr(bundle.feature_extractor, "do_resize", False)
    pixels = torch.from_numpy(square).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = reference.encode_image(pixels, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(encode_image(bundle, square), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        encode_image(bundle, image.astype(np.float32))


@pytest.mark.parametrize("t", [1, 3, 6])  # 6: 21 frames, past the VAE's temporal tile
def test_vae_round_trip_shapes(bundle, t):
    frames = torch.rand(1, 3, 4 * t - 3, 16, 24) * 2 - 1
    latents = vae_encode(bundle, frames)
    assert latents.shape == (1, 16, t, 2, 3) and latents.dtype == torch.float32
    assert torch.equal(latents, vae_encode(bundle, frames))  # repeatable by default
    assert vae_encode(bundle, frames, mode="mean").shape == latents.shape
    pixels = vae_decode(bundle, latents)
    assert pixels.shape == (1, 3, 4 * t - 3, 16, 24)
    torch.testing.assert_close(pixels, vae_decode(bundle, latents, tiling=False))  # small: no tiles


def test_vae_encode_matches_diffusers(bundle, reference):
    image = torch.rand(1, 3, 32, 40) * 2 - 1
    expected = reference.prepare_image_latents(
        image, dtype=torch.float32, device="cpu", generator=torch.Generator().manual_seed(5)
    )
    ours = vae_encode(bundle, image[:, :, None], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, expected)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        vae_encode(bundle, image)


def test_vae_temporal_tiles_follow_the_manifest(bundle, bundle_copy):
    # The release codes clips of more than 16 frames in diffusers' temporal tiles, each restarting
    # the causal convolutions; a manifest with vae_temporal_tiles false codes whole clips.
    z = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(0))  # 33 frames
    tiled = bundle.vae
    assert tiled.use_framewise_encoding and tiled.use_framewise_decoding  # the default: the release's
    manifest = Manifest.load(bundle_copy / MANIFEST_NAME).replace(vae_temporal_tiles=False)
    manifest.save(bundle_copy / MANIFEST_NAME)
    whole = load_bundle(bundle_copy)
    assert not whole.vae.use_framewise_encoding and not whole.vae.use_framewise_decoding
    frames = vae_decode(whole, z, tiling=False)
    with torch.no_grad():
        exact = whole.vae.decoder(whole.vae.post_quant_conv(z / manifest.vae_scaling_factor))
        torch.testing.assert_close(frames, exact)
        assert not torch.allclose(vae_decode(bundle, z, tiling=False), exact, atol=1e-3)  # tiles differ
    with pytest.raises(ValueError, match="vae_temporal_tiles"):
        manifest.replace(vae_temporal_tiles="no")
