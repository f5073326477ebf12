"""The generation loop against diffusers' `HunyuanVideoFramepackPipeline` on the same tiny components.

Both sides run from one tiny bundle directory (FRAMEPACK.md section 8): ours through
`framepack.pipeline.run` (`prepare` + `Run.events`, the code the CLI runs), diffusers'
pipeline from components loaded independently out of the same folders (LLaMA, CLIP, SigLIP and
their processors, the VAE, and `HunyuanVideoFramepackTransformer3DModel.from_pretrained` on our
saved transformer) with a `FlowMatchEulerDiscreteScheduler` and `output_type="latent"`. The
transformer weights are re-randomised (q/k norms around 3, as in test_transformer.py) so RoPE
time indices, history and conditioning all move the output.

Compared: the latents every section samples (Euler, ours `framepack.sampling.euler`, theirs the
scheduler's step), in the inverted anti-drifting order (1 section: padding 0; 5 sections: the
release's paddings 3, 2, 2, 1, 0, so every history group fills) and the vanilla / F1 order, plus a
case with real CFG against a negative prompt, a non-default distilled guidance and an explicit
shift. Everything that shapes those latents is computed independently by each side:

- sigmas: ours `sigma_schedule(steps, seq_len=window tokens)`, theirs the pipeline's `mu` from
  the same tokens through the scheduler's dynamic exponential shift (a fixed `shift=` on ours
  against `use_dynamic_shifting=False, shift=` on theirs); asserted equal as well;
- noise: both draw `randn((1, 16, window, h, w))` per section from one CPU generator seeded with
  the same seed;
- history layout, time indices, clean k1 / k2 / k4 latents and what enters them: our plan and
  `gather_history` against diffusers' `sampling_type` code;
- conditioning: the prompt in the HunyuanVideo template (diffusers gets the manifest's template
  and its `crop_start`, since the tiny tokenizer's crop is not 95) and `max_sequence_length`;
  CLIP pooled; SigLIP of the start image; the VAE latent of the start image; distilled guidance
  `g * 1000`; true CFG on a negative prompt.

Aligned by hand, and why:

- The start image latent. diffusers draws its posterior sample from the pipeline generator,
  before the first section's noise; ours draws it from a separate generator seeded 0, so the
  seed feeds only the noise. The pipeline's public arguments cannot express that (`image_latents`
  excludes `image`, which the SigLIP branch needs), so its `prepare_image_latents` is wrapped to
  receive a fresh generator seeded 0; diffusers' own VAE encode still computes the latent, which
  is compared with ours.
- The start image's pixel values lie in 64..255. diffusers hands SigLIP's processor a float
  tensor in [0, 1] that went through `u / 255 * 2 - 1` and back; the PIL-backed processor
  converts it to uint8 by truncation, which turns the values 1..63 into one less (the float32
  round trip lands just below them). Ours feeds the uint8 image itself. From 64 on, both give
  the same pixels, so the SigLIP embeddings are compared exactly instead of to a loose tolerance.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoFramepackPipeline,
    HunyuanVideoFramepackTransformer3DModel,
)
from PIL import Image
from torch.testing import assert_close
from transformers import AutoImageProcessor, AutoTokenizer, CLIPTextModel, LlamaModel, SiglipVisionModel

import framepack.pipeline.sections as sections_module
from framepack.model import load_transformer, save_transformer
from framepack.pipeline.bundle import load_bundle
from framepack.pipeline.conditioning import encode_image, encode_prompt, vae_encode
from framepack.pipeline.decode import from_uint8_frames
from framepack.pipeline.run import Run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.sampling import euler
from framepack.testing import tiny_bundle_dir

PROMPT = "A cat walks in the rain, the camera slowly zooms in."
NEGATIVE = "a dog"
HEIGHT, WIDTH = 32, 48  # latents 4 x 6: not square, so a swapped axis shows
SEED = 1234
RTOL = 1e-4  # relative to the largest latent; observed about 1e-7


@dataclass(frozen=True)
class Case:
    order: str  # "inverted" | "forward" (the bundle's manifest order)
    sections: int
    cfg: float = 1.0
    distilled_cfg: float | None = None
    shift: float | None = None


CASES = {
    "inverted-1": Case("inverted", 1),
    "inverted-5": Case("inverted", 5),
    "forward-3": Case("forward", 3),
    "inverted-2-cfg-shift": Case("inverted", 2, cfg=3.0, distilled_cfg=6.0, shift=3.0),
}
SAMPLING_TYPE = {"inverted": "inverted_anti_drifting", "forward": "vanilla"}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every weight ~ N(0, 0.05); norm scales around 1, q/k RMSNorm scales around 3 (sharper attention)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            if re.search(r"norm_(added_)?[qk]\.weight$", name):
                noise += 3.0
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                noise += 1.0
            p.copy_(noise)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    """`bundle_root(order)`: a copy of the tiny bundle with re-randomised transformer weights."""
    roots = {}

    def get(order: str):
        if order not in roots:
            root = shutil.copytree(tiny_bundle_dir(order), tmp_path_factory.mktemp(order) / "bundle")
            model = load_transformer(root / "transformer")
            randomise(model, seed=7)
            save_transformer(model, root / "transformer")
            roots[order] = root
        return roots[order]

    return get


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """The start image, already at the generation size; values 64..255 (see the module docstring)."""
    return np.random.default_rng(0).integers(64, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def run_ours(root, case: Case, image: np.ndarray, out_dir, monkeypatch):
    """Our generation loop with the Euler sampler, recording what the sampler gets and returns.

    Returns (bundle, prepared, sigmas per section, sampled latents per section in generation order).
    """
    bundle = load_bundle(root)
    settings = GenerationSettings(
        prompt=PROMPT,
        negative_prompt=NEGATIVE if case.cfg != 1 else "",
        sections=case.sections,
        seed=SEED,
        cfg=case.cfg,
        distilled_cfg=case.distilled_cfg,
        sampler="euler",
        shift=case.shift,
        width=WIDTH,
        height=HEIGHT,
        name="oracle",
    )
    sigmas, latents = [], []

    def recording_euler(model, x, s, **kwargs):
        out = euler(model, x, s, **kwargs)
        sigmas.append(s.clone())
        latents.append(out.clone())
        return out

    def get_sampler(name: str):
        assert name == "euler"
        return recording_euler

    monkeypatch.setattr(sections_module, "get_sampler", get_sampler)
    prepared = prepare(bundle, settings, image=image)
    assert np.array_equal(prepared.image, image)  # already at its size: no resampling on our side
    for _ in Run(bundle, prepared).events(out_dir):
        pass
    return bundle, prepared, sigmas, latents


def reference_pipeline(root, case: Case) -> HunyuanVideoFramepackPipeline:
    """diffusers' pipeline with every component loaded from the bundle's folders."""
    scheduler = (
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        if case.shift is None
        else FlowMatchEulerDiscreteScheduler(shift=case.shift)
    )
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=LlamaModel.from_pretrained(root / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        transformer=HunyuanVideoFramepackTransformer3DModel.from_pretrained(root / "transformer").eval(),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(root / "vae").eval(),
        scheduler=scheduler,
        text_encoder_2=CLIPTextModel.from_pretrained(root / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        image_encoder=SiglipVisionModel.from_pretrained(root / "image_encoder").eval(),
        feature_extractor=AutoImageProcessor.from_pretrained(root / "feature_extractor"),
    )
    pipe.set_progress_bar_config(disable=True)
    encode = pipe.prepare_image_latents

    def start_latent_from_seed_0(image, dtype=None, device=None, generator=None, latents=None):
        return encode(image, dtype=dtype, device=device, generator=torch.Generator().manual_seed(0))

    pipe.prepare_image_latents = start_latent_from_seed_0  # see the module docstring
    return pipe


def run_reference(pipe: HunyuanVideoFramepackPipeline, manifest, prepared, image: np.ndarray, case: Case):
    """Video latents `(1, 16, 1 + window * S, h, w)` in time order (start latent first)."""
    window = prepared.plan.window
    frames = pipe(
        image=Image.fromarray(image),
        prompt=PROMPT,
        negative_prompt=NEGATIVE if case.cfg != 1 else None,
        true_cfg_scale=case.cfg,
        height=HEIGHT,
        width=WIDTH,
        num_frames=case.sections * ((window - 1) * 4 + 1),  # exactly `sections` windows
        latent_window_size=window,
        num_inference_steps=prepared.steps,
        guidance_scale=prepared.distilled_cfg,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
        prompt_template={"template": manifest.prompt_template, "crop_start": manifest.template_crop},
        max_sequence_length=manifest.max_prompt_tokens,
        sampling_type=SAMPLING_TYPE[case.order],
    ).frames
    assert len(frames) == case.sections
    return frames[-1]  # the whole history after the last section


@pytest.fixture(scope="module")
def results(bundle_root, image, tmp_path_factory):
    """`results(name)` -> (bundle, prepared, our sigmas, our latents, pipe, reference latents), cached."""
    cache = {}

    def get(name: str):
        if name not in cache:
            case = CASES[name]
            root = bundle_root(case.order)
            with pytest.MonkeyPatch.context() as mp:
                bundle, prepared, sigmas, latents = run_ours(
                    root, case, image, tmp_path_factory.mktemp(name), mp
                )
            pipe = reference_pipeline(root, case)
            reference = run_reference(pipe, bundle.manifest, prepared, image, case)
            cache[name] = bundle, prepared, sigmas, latents, pipe, reference
        return cache[name]

    return get


def close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert_close(ours, reference, rtol=RTOL, atol=RTOL * float(reference.abs().max()))


@pytest.mark.parametrize("name", list(CASES))
def test_section_latents_match_diffusers(results, name):
    _, prepared, sigmas, latents, pipe, reference = results(name)
    plan = prepared.plan
    assert reference.shape == (1, 16, plan.total_latents, HEIGHT // 8, WIDTH // 8)
    assert len(latents) == len(plan.sections)
    for section, ours in zip(plan.sections, latents, strict=True):
        close(ours, reference[:, :, list(section.window)])
    # Every section used the scheduler's sigmas (set anew per section, the same each time).
    for s in sigmas:
        assert_close(s, pipe.scheduler.sigmas, rtol=0, atol=1e-6)


def test_conditioning_pieces_match_diffusers(results, image):
    """The inputs the sampling comparison depends on, compared one by one (to localise a failure)."""
    bundle, _, _, _, pipe, reference = results("inverted-1")
    m = bundle.manifest
    template = {"template": m.prompt_template, "crop_start": m.template_crop}
    ours = encode_prompt(bundle, PROMPT)
    text, mask = pipe._get_llama_prompt_embeds(PROMPT, template, device="cpu", dtype=torch.float32)
    n = ours.length
    assert torch.equal(ours.mask, mask.long()) and n > 1
    assert_close(ours.text[:, :n], text[:, :n], rtol=0, atol=1e-6)
    assert_close(ours.pooled, pipe._get_clip_prompt_embeds(PROMPT, device="cpu", dtype=torch.float32))
    pixels = pipe.video_processor.preprocess(Image.fromarray(image), HEIGHT, WIDTH)  # (1, 3, H, W)
    ours_pixels = from_uint8_frames(image[None])[:, :, 0]
    assert_close(ours_pixels, pixels, rtol=0, atol=1e-6)
    assert_close(encode_image(bundle, image), pipe.encode_image(pixels, device="cpu", dtype=torch.float32))
    start = vae_encode(bundle, ours_pixels[:, :, None])  # (1, 16, 1, h, w)
    close(start, reference[:, :, :1])  # the start latent leads diffusers' history


def test_the_oracle_sees_layout_errors(results):
    """Section 0 of a 1- and a 5-section video differ only by the blank padding (0 and 27 latents)
    in the time indices: same noise, sigmas and conditioning, an all-zero history. The difference
    must dwarf the tolerance, or the comparison above could not catch a wrong index or slot."""
    _, one, _, ours_one, _, _ = results("inverted-1")
    _, five, _, ours_five, _, _ = results("inverted-5")
    assert (one.plan.sections[0].blank, five.plan.sections[0].blank) == (0, 3 * five.plan.window)
    change = float((ours_one[0] - ours_five[0]).abs().max() / ours_five[0].abs().max())
    assert change > 20 * RTOL, change  # observed about 1e-2: ~100x the tolerance, 1e5x the error
