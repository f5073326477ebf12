"""The release's rounding rules in the model call, worked out by hand (FRAMEPACK.md sections 3, 5).

In bf16 the release casts the latent, the timestep (sigma * 1000) and the distilled guidance
(g * 1000) to the model's dtype before the call, and computes x0 in fp32 from the latent as cast.
"""

from __future__ import annotations

import torch

from framepack.model import PackedTransformer, get_spec
from framepack.pipeline.conditioning import PromptEmbeds
from framepack.pipeline.section import make_denoiser
from framepack.testing import random_packed_inputs


def _denoiser_and_inputs(dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = get_spec("tiny")
    model = PackedTransformer(cfg).to(dtype).eval()
    model.fp32_head = True
    inp = random_packed_inputs(cfg, 8, 8)
    cond = PromptEmbeds(inp["text"], inp["text_mask"], inp["pooled"], False)
    seen = []
    model.time_text_embed.register_forward_pre_hook(lambda m, args: seen.append(args))
    guidance = torch.tensor([10 * 1000.0])
    denoise = make_denoiser(
        model, "cpu", inp["noisy_indices"], inp["history"], cond, None, guidance, inp["image_embeds"], None
    )
    return model, inp, cond, denoise, seen


def test_bf16_model_gets_the_timestep_guidance_and_latent_rounded_as_the_release():
    model, inp, cond, denoise, seen = _denoiser_and_inputs(torch.bfloat16)
    x = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.7
    sigma = torch.tensor(0.9673)
    with torch.no_grad():
        x0 = denoise(x, sigma)
    timestep, _, guidance = seen[0]
    # 967.3 lies in [512, 1024), where bf16 steps by 4: 968. 10000 lies in [8192, 16384), steps of
    # 64: 156.25 * 64 -> 156 * 64 = 9984.
    assert timestep.dtype == guidance.dtype == torch.bfloat16
    assert timestep.item() == 968.0 and guidance.item() == 9984.0
    # x0 = x_bf16 - sigma * v in fp32, with v from the bf16 latent (worked from the same model call).
    cast = x.to(torch.bfloat16)
    with torch.no_grad():
        v = model.forward_packed(
            cast,
            inp["noisy_indices"],
            inp["history"],
            timestep,
            cond.text,
            cond.mask,
            cond.pooled,
            guidance,
            inp["image_embeds"],
        )
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, cast.float() - sigma * v, rtol=0, atol=0)
    assert not torch.equal(x0, x - sigma * v)  # the fp32 latent would give other numbers


def test_fp32_model_gets_the_values_unrounded():
    _, _, _, denoise, seen = _denoiser_and_inputs(torch.float32)
    with torch.no_grad():
        denoise(torch.randn(1, 16, 9, 8, 8), torch.tensor(0.9673))
    timestep, _, guidance = seen[0]
    assert timestep.dtype == torch.float32 and abs(timestep.item() - 967.3) < 1e-3
    assert guidance.item() == 10000.0
