"""Conformance of `PackedTransformer` with the diffusers oracle (FRAMEPACK.md sections 2-3).

The oracle is diffusers' `HunyuanVideoFramepackTransformer3DModel` (a test-only dependency) with
every weight re-randomised; our model is loaded from its `save_pretrained` output. diffusers runs
only with all three history groups and image embeddings, so a call without history is checked
against the plain `HunyuanVideoTransformer3DModel` on the same weights instead.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import HunyuanVideoFramepackTransformer3DModel, HunyuanVideoTransformer3DModel
from torch.testing import assert_close

from framepack.model import (
    HistoryGroup,
    PackedTransformer,
    get_spec,
    init_kernel_from_base,
    load_transformer,
    save_transformer,
)
from framepack.model.ops import linear
from framepack.packing import pad_replicate
from framepack.testing import random_packed_inputs

TOL = {"rtol": 1e-5, "atol": 1e-5}

# Constructor keywords of the diffusers oracle; our side of each config comes from its config.json.
TINY = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(4, 14, 14),
    num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, guidance_embeds=True,
    text_embed_dim=24, pooled_projection_dim=12, has_image_proj=True, image_proj_dim=20, has_clean_x_embedder=True,
)  # fmt: skip
CONFIGS = {
    "tiny": TINY,
    "dual-only": dict(
        TINY, in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16,
        rope_axes_dim=(4, 6, 6), num_layers=2, num_single_layers=0, num_refiner_layers=2,
    ),
    "single-only": dict(
        TINY, num_attention_heads=3, attention_head_dim=24, rope_axes_dim=(8, 8, 8), num_layers=0,
        num_single_layers=2, num_refiner_layers=0, guidance_embeds=False, text_embed_dim=16,
        pooled_projection_dim=8, image_proj_dim=10,
    ),
}  # fmt: skip
# No history or image projection: diffusers builds and saves it, but only the plain model runs it.
BARE = {**TINY, "has_image_proj": False, "has_clean_x_embedder": False}
# diffusers (and the release) build the token refiner with mlp_ratio 4 whatever the config says.
MLP_RATIO_2 = {**TINY, "mlp_ratio": 2.0}
ALL_CONFIGS = {**CONFIGS, "bare": BARE, "mlp-ratio-2": MLP_RATIO_2}

TEXT_LEN, IMAGE_TOKENS, BLANK = 12, 5, 5
VALID_TEXT = (7, 12)  # valid tokens of sample 0 and 1: batch 1 is padded too
RELEASED_HISTORY = (2, 2, 16)  # k1 (start frame + 1), k2, k4 frames


# ---------------------------------------------------------------- models and inputs
def randomise(model: nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.05), so no zero-init hides a bug, except norm scales: around 1, and
    around 3 for the q/k RMSNorms, which sharpens attention so that RoPE and masks weigh in."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            if re.search(r"norm_(added_)?[qk]\.weight$", name):
                noise += 3.0
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                noise += 1.0
            p.copy_(noise)


def build_reference(cfg: dict, seed: int = 0) -> HunyuanVideoFramepackTransformer3DModel:
    model = HunyuanVideoFramepackTransformer3DModel(**cfg).eval()
    randomise(model, seed)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`models(name)` -> (diffusers oracle, ours loaded from its `save_pretrained`), built once."""
    cache = {}

    def get(name: str) -> tuple[HunyuanVideoFramepackTransformer3DModel, PackedTransformer]:
        if name not in cache:
            ref = build_reference(ALL_CONFIGS[name])
            path = tmp_path_factory.mktemp(name)
            ref.save_pretrained(path)
            cache[name] = ref, load_transformer(path)
        return cache[name]

    return get


def section_indices(order: str, frames: int, history: tuple[int, int, int]) -> list[torch.Tensor]:
    """Time indices (noisy, k1, k2, k4) of one section, k1 = start frame + the nearest history.

    `"forward"` (F1): `[start | k4 | k2 | k1 | noisy]`, contiguous. `"inverted"` (I2V, anti-drifting):
    `[start | blank | noisy | k1 | k2 | k4]`, so the indices skip the blank latents.
    """
    n1, n2, n4 = history
    if order == "forward":
        sizes = [1, n4, n2, n1 - 1, frames]
        start, k4, k2, k1, noisy = torch.arange(sum(sizes)).split(sizes)
    else:
        sizes = [1, BLANK, frames, n1 - 1, n2, n4]
        start, _, noisy, k1, k2, k4 = torch.arange(sum(sizes)).split(sizes)
    return [noisy, torch.cat([start, k1]), k2, k4]


@dataclass
class Inputs:
    """One model call, as our release keywords or as diffusers' keywords."""

    noisy: torch.Tensor  # (B, C, T, H, W)
    noisy_indices: torch.Tensor  # (T,)
    history: list[HistoryGroup]  # k1, k2, k4 groups, or none
    timestep: torch.Tensor  # (B,)
    text: torch.Tensor  # (B, M, text_embed_dim)
    text_mask: torch.Tensor  # (B, M), a prefix of ones
    pooled: torch.Tensor  # (B, pooled_projection_dim)
    guidance: torch.Tensor | None  # (B,)
    image: torch.Tensor | None  # (B, IMAGE_TOKENS, image_proj_dim)

    def release_kwargs(self) -> dict:
        kw = {
            "hidden_states": self.noisy,
            "timestep": self.timestep,
            "encoder_hidden_states": self.text,
            "encoder_attention_mask": self.text_mask,
            "pooled_projections": self.pooled,
            "guidance": self.guidance,
            "latent_indices": self.noisy_indices,
            "image_embeddings": self.image,
        }
        suffix = {"k1": "", "k2": "_2x", "k4": "_4x"}
        for g in self.history:
            kw[f"clean_latents{suffix[g.kernel]}"] = g.latents
            kw[f"clean_latent{suffix[g.kernel]}_indices"] = g.indices
        return kw

    def diffusers_kwargs(self) -> dict:
        kw = {
            "hidden_states": self.noisy,
            "timestep": self.timestep,
            "encoder_hidden_states": self.text,
            "encoder_attention_mask": self.text_mask,
            "pooled_projections": self.pooled,
            "guidance": self.guidance,
            "indices_latents": self.noisy_indices,
            "image_embeds": self.image,
        }
        names = {"k1": "latents_clean", "k2": "latents_history_2x", "k4": "latents_history_4x"}
        for g in self.history:
            kw[names[g.kernel]] = g.latents
            kw["indices_" + names[g.kernel]] = g.indices
        return kw


def make_inputs(
    cfg: dict,
    batch: int = 1,
    size: tuple[int, int] = (6, 10),
    frames: int = 3,
    order: str | None = "forward",
    history: tuple[int, int, int] = RELEASED_HISTORY,
    image: bool = True,
    seed: int = 0,
) -> Inputs:
    """Seeded inputs for `cfg`; `order=None` gives no history and indices `0..T-1`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    c, (h, w) = cfg["in_channels"], size
    groups = []
    if order is None:
        noisy_indices = torch.arange(frames)
    else:
        noisy_indices, *indices = section_indices(order, frames, history)
        for kernel, idx in zip(("k1", "k2", "k4"), indices, strict=True):
            groups.append(HistoryGroup(randn(batch, c, len(idx), h, w), idx, kernel))
    valid = torch.tensor(VALID_TEXT[:batch])
    return Inputs(
        noisy=randn(batch, c, frames, h, w),
        noisy_indices=noisy_indices,
        history=groups,
        timestep=torch.tensor([620.0, 250.0][:batch]),
        text=randn(batch, TEXT_LEN, cfg["text_embed_dim"]),
        text_mask=(torch.arange(TEXT_LEN) < valid[:, None]).long(),
        pooled=randn(batch, cfg["pooled_projection_dim"]),
        guidance=torch.tensor([10000.0, 6000.0][:batch]) if cfg["guidance_embeds"] else None,
        image=randn(batch, IMAGE_TOKENS, cfg["image_proj_dim"]) if image else None,
    )


def run_ours(model: PackedTransformer, inp: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp.release_kwargs())


def run_reference(model: nn.Module, inp: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp.diffusers_kwargs()).sample


def conditioning(inp: Inputs) -> tuple:
    """The arguments of `forward_packed` after the history, in order."""
    return inp.timestep, inp.text, inp.text_mask, inp.pooled, inp.guidance, inp.image


def single(inp: Inputs, i: int) -> Inputs:
    """Sample `i` of a batch, alone (per-sample `(B, n)` indices become that sample's row)."""

    def take(x: torch.Tensor | None, batched: bool = True) -> torch.Tensor | None:
        return x if x is None or not batched else x[i : i + 1]

    def row(idx: torch.Tensor) -> torch.Tensor:
        return idx[i] if idx.ndim == 2 else idx

    return Inputs(
        noisy=take(inp.noisy),
        noisy_indices=row(inp.noisy_indices),
        history=[HistoryGroup(take(g.latents), row(g.indices), g.kernel) for g in inp.history],
        timestep=take(inp.timestep),
        text=take(inp.text),
        text_mask=take(inp.text_mask),
        pooled=take(inp.pooled),
        guidance=take(inp.guidance),
        image=take(inp.image),
    )


# ---------------------------------------------------------------- 1. conformance with diffusers
@pytest.mark.parametrize("size", [(6, 10), (8, 16)], ids=["6x10-padded", "8x16"])
@pytest.mark.parametrize("order", ["forward", "inverted"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(models, name, batch, order, size):
    ref, ours = models(name)
    inp = make_inputs(CONFIGS[name], batch=batch, size=size, order=order)
    out = run_ours(ours, inp)
    assert out.shape == inp.noisy.shape
    assert_close(out, run_reference(ref, inp), **TOL)


@pytest.mark.parametrize("history", [(1, 3, 5), (3, 1, 4)], ids=str)
def test_matches_diffusers_with_uneven_history(models, history):
    """History lengths that are no multiple of the kernel's time size are replicate-padded in time."""
    ref, ours = models("tiny")
    inp = make_inputs(TINY, batch=2, size=(6, 10), order="inverted", history=history)
    assert_close(run_ours(ours, inp), run_reference(ref, inp), **TOL)


def test_mlp_ratio_applies_to_blocks_not_to_the_token_refiner(models):
    ref, ours = models("mlp-ratio-2")
    inp = make_inputs(MLP_RATIO_2, batch=2, order="inverted")
    assert_close(run_ours(ours, inp), run_reference(ref, inp), **TOL)


def plain_reference(
    name: str, ref: HunyuanVideoFramepackTransformer3DModel
) -> HunyuanVideoTransformer3DModel:
    """The plain HunyuanVideo transformer on `ref`'s weights: the oracle for a call without history."""
    cfg = {
        k: v
        for k, v in ALL_CONFIGS[name].items()
        if k not in ("has_image_proj", "image_proj_dim", "has_clean_x_embedder")
    }
    plain = HunyuanVideoTransformer3DModel(**cfg).eval()
    extra = ("clean_x_embedder.", "image_projection.")
    plain.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith(extra)}, strict=True)
    return plain


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", [*CONFIGS, "bare"])
def test_without_history_matches_plain_hunyuan(models, name, batch):
    ref, ours = models(name)
    inp = make_inputs(ALL_CONFIGS[name], batch=batch, order=None, image=False)
    kw = inp.diffusers_kwargs()
    for key in ("indices_latents", "image_embeds"):
        del kw[key]
    with torch.no_grad():
        expected = plain_reference(name, ref)(**kw).sample
    assert_close(run_ours(ours, inp), expected, **TOL)


def test_empty_history_runs_and_history_matters(models):
    _, ours = models("tiny")
    inp = make_inputs(TINY, batch=2, order="inverted")
    args = conditioning(inp)
    with torch.no_grad():
        empty = ours.forward_packed(inp.noisy, inp.noisy_indices, [], *args)
        zero_frames = [HistoryGroup(g.latents[:, :, :0], g.indices[:0], g.kernel) for g in inp.history]
        skipped = ours.forward_packed(inp.noisy, inp.noisy_indices, zero_frames, *args)
        full = ours.forward_packed(inp.noisy, inp.noisy_indices, inp.history, *args)
    assert empty.shape == inp.noisy.shape and torch.isfinite(empty).all()
    assert torch.equal(empty, skipped)
    assert (empty - full).abs().max() > 1e-3


# ---------------------------------------------------------------- 2. checkpoint formats
def release_config(cfg: dict) -> dict:
    """config.json as the release writes it (lllyasviel/FramePackI2V_HY), for the shape `cfg`."""
    data = {
        "_class_name": "HunyuanVideoTransformer3DModelPacked",
        "_diffusers_version": "0.33.0.dev0",
        "_name_or_path": "hunyuanvideo-community/HunyuanVideo",
        "patch_size": 2,
        "patch_size_t": 1,
        "qk_norm": "rms_norm",
        "rope_theta": 256.0,
        "image_condition_type": None,
    }
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    return data


def test_release_config_loads(models, tmp_path):
    ref, ours = models("tiny")
    save_transformer(ours, tmp_path, class_name="HunyuanVideoTransformer3DModelPacked")
    (tmp_path / "config.json").write_text(json.dumps(release_config(TINY), indent=2))
    loaded = load_transformer(tmp_path)
    assert loaded.config == ours.config
    inp = make_inputs(TINY, batch=2, order="inverted")
    assert_close(run_ours(loaded, inp), run_reference(ref, inp), **TOL)


def test_our_checkpoint_loads_in_diffusers(models, tmp_path):
    ref, ours = models("single-only")
    save_transformer(ours, tmp_path)
    back = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tmp_path).eval()
    assert back.config["_class_name"] == "HunyuanVideoFramepackTransformer3DModel"
    ref_state = ref.state_dict()
    assert back.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in back.state_dict().items())
    inp = make_inputs(CONFIGS["single-only"], batch=2, order="forward")
    assert_close(run_reference(back, inp), run_ours(ours, inp), **TOL)


def test_sharded_checkpoint_loads_identically(models, tmp_path):
    ref, ours = models("tiny")
    save_transformer(ours, tmp_path, max_shard_bytes=256 * 1024)
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(shards) >= 3
    assert set(index["weight_map"]) == set(ours.state_dict())
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    loaded = load_transformer(tmp_path)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.state_dict().items())
    inp = make_inputs(TINY, batch=2, order="inverted")
    assert torch.equal(run_ours(loaded, inp), run_ours(ours, inp))
    back = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tmp_path).eval()
    assert_close(run_reference(back, inp), run_reference(ref, inp), rtol=0, atol=0)


# ---------------------------------------------------------------- 3-4. call conventions
def test_forward_return_conventions(models):
    _, ours = models("tiny")
    inp = make_inputs(TINY, batch=2)
    kw = inp.release_kwargs()
    with torch.no_grad():
        out = ours(**kw)
        as_tuple = ours(**kw, return_dict=False)
        as_object = ours(**kw, return_dict=True)
    assert isinstance(out, torch.Tensor) and out.shape == inp.noisy.shape  # (B, C, T, H, W)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], out)
    assert torch.equal(as_object.sample, out)


def test_batched_indices_equal_shared_indices(models):
    _, ours = models("tiny")
    inp = make_inputs(TINY, batch=2, order="inverted")
    batched = copy.copy(inp)
    batched.noisy_indices = inp.noisy_indices.expand(2, -1)  # (B, T)
    batched.history = [HistoryGroup(g.latents, g.indices.expand(2, -1), g.kernel) for g in inp.history]
    assert_close(run_ours(ours, batched), run_ours(ours, inp), **TOL)


@pytest.mark.parametrize("name", ["tiny", "dual-only"])
def test_per_sample_indices_match_single_runs(models, name):
    """A batch whose samples sit at different places in time: each gets what it gets alone."""
    _, ours = models(name)
    inp = make_inputs(CONFIGS[name], batch=2, order="forward")
    fwd, inv = (
        section_indices("forward", 3, RELEASED_HISTORY),
        section_indices("inverted", 3, RELEASED_HISTORY),
    )
    noisy_idx, *history_idx = (torch.stack(pair) for pair in zip(fwd, inv, strict=True))  # (B, n) each
    inp.noisy_indices = noisy_idx
    inp.history = [
        HistoryGroup(g.latents, idx, g.kernel) for g, idx in zip(inp.history, history_idx, strict=True)
    ]
    out = run_ours(ours, inp)
    for i in range(2):
        assert_close(out[i : i + 1], run_ours(ours, single(inp, i)), **TOL)


def test_forward_packed_equals_forward(models):
    _, ours = models("tiny")
    inp = make_inputs(TINY, batch=2, order="inverted")
    shuffled = [inp.history[i] for i in (2, 0, 1)]  # the list order does not matter
    with torch.no_grad():
        packed = ours.forward_packed(inp.noisy, inp.noisy_indices, shuffled, *conditioning(inp))
    assert torch.equal(packed, run_ours(ours, inp))


# ---------------------------------------------------------------- 5. the released shape
def test_release_spec_has_13b_parameters():
    with torch.device("meta"):
        model = PackedTransformer(get_spec("hunyuan-13b"))
    assert 12.5e9 < sum(p.numel() for p in model.parameters()) < 13.5e9


# ---------------------------------------------------------------- 6. gradient checkpointing
def test_gradient_checkpointing_gives_the_same_gradients(models):
    _, loaded = models("tiny")
    model = copy.deepcopy(loaded).requires_grad_(True)
    inp = make_inputs(TINY, batch=2, order="inverted")
    probe = torch.randn(inp.noisy.shape, generator=torch.Generator().manual_seed(1))
    calls = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        model.zero_grad(set_to_none=True)
        noisy = inp.noisy.clone().requires_grad_(True)
        out = model(**{**inp.release_kwargs(), "hidden_states": noisy})
        (out * probe).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads, noisy.grad

    out, grads, input_grad = run()
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt, input_grad_ckpt = run()
    assert len(calls) == 3  # the checkpointed block ran again in the backward pass

    assert_close(out_ckpt, out, **TOL)
    assert_close(input_grad_ckpt, input_grad, **TOL)
    assert grads_ckpt.keys() == grads.keys()
    assert len(grads) > 0.9 * len(list(model.parameters()))
    for name, grad in grads.items():
        assert_close(grads_ckpt[name], grad, **TOL, msg=name)


# ---------------------------------------------------------------- 7. new kernels from the base one
@pytest.mark.parametrize("latent_size", [(8, 8, 16), (5, 6, 10)], ids=["divisible", "padded"])
@pytest.mark.parametrize("kernel", [(2, 4, 4), (4, 8, 8)], ids=["k2", "k4"])
def test_init_kernel_from_base_equals_pooling_then_base(kernel, latent_size):
    torch.manual_seed(0)
    base = nn.Conv3d(16, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    target = nn.Conv3d(16, 32, kernel_size=kernel, stride=kernel)
    init_kernel_from_base(base, target)
    x = pad_replicate(torch.randn(2, 16, *latent_size), kernel)  # (B, C, T, H, W)
    pool = (kernel[0], kernel[1] // 2, kernel[2] // 2)  # the kernel over the base patch
    with torch.no_grad():
        assert_close(target(x), base(F.avg_pool3d(x, pool)), **TOL)


# ---------------------------------------------------------------- 8. bf16
def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def test_bf16_stays_close_to_fp32(models):
    _, ours = models("tiny")
    inp = make_inputs(TINY, batch=2, order="inverted")
    expected = run_ours(ours, inp)
    low = copy.deepcopy(ours).to(torch.bfloat16)
    out = run_ours(low, inp)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) < 3e-2
    low.fp32_head = True
    out = run_ours(low, inp)
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 3e-2


def test_linear_refuses_mixed_dtypes_on_every_cpu():
    # On a CPU without bf16 units `linear` upcasts bf16 operands; that must not hide a mismatch
    # that CUDA (and CPUs with bf16 units) refuse.
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="input is torch.float32 but the weight is torch.bfloat16"):
        linear(torch.randn(2, 8), w, None)
    assert linear(torch.randn(2, 8, dtype=torch.bfloat16), w, None).dtype == torch.bfloat16


def test_fp32_head_is_the_releases_on_a_bf16_model():
    # The release: norm_out (modulation, layer norm) in bf16, then fp32 hidden states into an fp32
    # proj_out. Worked out here from the model's own parts, captured at the head's input.
    torch.manual_seed(0)
    cfg = get_spec("tiny")
    model = PackedTransformer(cfg).to(torch.bfloat16).eval()
    model.fp32_head = True
    seen = {}  # the last single block's readout (B, N_noisy, D) and norm_out's (scale, shift)
    model.single_transformer_blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("hs", o))
    model.norm_out.register_forward_hook(lambda m, a, o: seen.__setitem__("mod", o))
    with torch.no_grad():
        out = model.forward_packed(**random_packed_inputs(cfg, 8, 8))
    assert out.dtype == torch.float32
    hs, (scale, shift) = seen["hs"], seen["mod"]
    assert hs.dtype == scale.dtype == torch.bfloat16
    normed = F.layer_norm(hs, hs.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]  # bf16
    head = F.linear(normed.float(), model.proj_out.weight.float(), model.proj_out.bias.float())
    expected = head.view(1, 9, 4, 4, -1, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(1, -1, 9, 8, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- 9. bad input
def test_history_of_another_size_is_rejected(models):
    _, ours = models("tiny")
    inp = make_inputs(TINY, order="forward")
    kw = inp.release_kwargs()
    kw["clean_latents_2x"] = torch.randn(1, 16, 2, 6, 12)  # noisy latents are 6 x 10
    with pytest.raises(ValueError, match="history latents"):
        ours(**kw)


@pytest.mark.parametrize(
    "key, length", [("latent_indices", 4), ("clean_latent_indices", 3), ("clean_latent_4x_indices", 15)]
)
def test_index_count_mismatch_is_rejected(models, key, length):
    _, ours = models("tiny")
    kw = make_inputs(TINY, order="forward").release_kwargs()
    kw[key] = torch.arange(length)
    with pytest.raises(ValueError, match="time indices"):
        ours(**kw)


def test_history_without_indices_is_rejected(models):
    _, ours = models("tiny")
    kw = make_inputs(TINY, order="forward").release_kwargs()
    kw["clean_latent_2x_indices"] = None
    with pytest.raises(ValueError, match="without their indices"):
        ours(**kw)
