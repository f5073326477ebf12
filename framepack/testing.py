"""Tiny bundles for tests: the real layout and the real classes, random weights, CPU-fast.

`make_tiny_bundle(path)` writes every component of a FramePack bundle (FRAMEPACK.md section 8) with
tiny configs: a byte-level BPE LLaMA tokenizer whose merges spell the template's words (so the
template crops like the real one and any prompt tokenizes), a 3-layer `LlamaModel` (so layer -3 is
a real layer), a CLIP tokenizer and `CLIPTextModel`, a `SiglipVisionModel` on 32 px images (4
tokens), an `AutoencoderKLHunyuanVideo` with the real 8x spatial / 4x temporal compression and 16
latent channels, and the `get_spec("tiny")` transformer. The encoders' widths are the transformer's
`text_embed_dim`, `pooled_projection_dim` and `image_proj_dim`. Everything is safetensors.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .pipeline.bundle import Bundle, load_bundle
from .pipeline.manifest import HUNYUAN_PROMPT_TEMPLATE, MANIFEST_NAME, Manifest

__all__ = [
    "TINY_MANIFEST",
    "make_tiny_bundle",
    "random_packed_inputs",
    "tight_budget",
    "tiny_bundle",
    "tiny_bundle_dir",
]

# Generation defaults of the tiny bundles (the template crop is computed per tokenizer).
TINY_MANIFEST = dict(resolution=64, steps=4, window=9)

_LLAMA_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
)
# A few words prompts in tests use, beyond the template's own.
_EXTRA_WORDS = "a the cat dog walks runs in rain city street camera slowly zooms man woman dancing"


def _chain_merges(pieces, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Add left-to-right merges spelling each piece (a list of base symbols) as one token."""
    for symbols in pieces:
        current = symbols[0]
        for s in symbols[1:]:
            if current + s not in vocab:
                vocab[current + s] = len(vocab)
                merges.append((current, s))
            current += s


def _llama_tokenizer(directory: Path):
    """A byte-level BPE tokenizer in the LLaMA-3 style (bos prepended, chat special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {s: i for i, s in enumerate(_LLAMA_SPECIALS)}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    words = HUNYUAN_PROMPT_TEMPLATE
    for s in _LLAMA_SPECIALS:
        words = words.replace(s, " ")
    words += " " + _EXTRA_WORDS + " " + _EXTRA_WORDS.title()
    pieces = [list(p) for p, _ in pre.pre_tokenize_str(words) if len(p) > 1]
    merges: list[tuple[str, str]] = []
    _chain_merges(pieces, vocab, merges)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_LLAMA_SPECIALS))
    bos = _LLAMA_SPECIALS[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<|pad|>"
    )
    tok.save_pretrained(directory)
    return tok


def _clip_tokenizer(directory: Path) -> dict[str, int]:
    """CLIP's layout (vocab.json + merges.txt): byte-level symbols, with and without `</w>`."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    words = sorted(set(_EXTRA_WORDS.split() + "video camera light style motion".split()))
    merges: list[tuple[str, str]] = []
    _chain_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in words if len(w) > 1], vocab, merges)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab


def _siglip_processor(directory: Path, size: int) -> None:
    """The SigLIP preprocessor config of the release (resize, rescale, normalise to [-1, 1])."""
    config = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _tiny_text_encoders(spec, tok, clip_vocab):
    """The tiny bundle's LLaMA and CLIP text encoders, random (from the caller's RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=spec.text_embed_dim,
            intermediate_size=2 * spec.text_embed_dim,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            rope_theta=500000.0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=spec.pooled_projection_dim,
            intermediate_size=2 * spec.pooled_projection_dim,
            projection_dim=spec.pooled_projection_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=clip_vocab["<|startoftext|>"],
            eos_token_id=clip_vocab["<|endoftext|>"],
            pad_token_id=clip_vocab["<|endoftext|>"],
        )
    )
    return llama, clip


def make_tiny_bundle(
    path: str | os.PathLike, order: str = "inverted", seed: int = 0, **manifest: object
) -> Path:
    """Write a complete tiny bundle at `path` (created; must not hold a bundle yet); returns it.

    `manifest` overrides fields of the manifest (defaults: `TINY_MANIFEST`). Random weights come
    from `seed` without touching the global RNG.
    """
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from .model import PackedTransformer, get_spec, save_transformer
    from .pipeline.conditioning import template_crop_for

    root = Path(path)
    if (root / MANIFEST_NAME).exists():
        raise ValueError(f"{root} already holds a bundle.")
    root.mkdir(parents=True, exist_ok=True)
    spec = get_spec("tiny")

    tok = _llama_tokenizer(root / "tokenizer")
    clip_vocab = _clip_tokenizer(root / "tokenizer_2")
    _siglip_processor(root / "feature_extractor", 32)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama, clip = _tiny_text_encoders(spec, tok, clip_vocab)
        siglip = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=spec.image_proj_dim,
                intermediate_size=2 * spec.image_proj_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
            )
        )
        # Four blocks: three 2x spatial downsamplings (8x) and two 2x temporal ones (4x).
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=16,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
        )
        transformer = PackedTransformer(spec)
    llama.save_pretrained(root / "text_encoder")
    clip.save_pretrained(root / "text_encoder_2")
    siglip.save_pretrained(root / "image_encoder")
    vae.save_pretrained(root / "vae", safe_serialization=True)
    save_transformer(transformer, root / "transformer")

    fields = {
        **TINY_MANIFEST,
        "order": order,
        "packing": order,
        "name": f"tiny-{order}",
        "template_crop": template_crop_for(tok, HUNYUAN_PROMPT_TEMPLATE),
        "vae_scaling_factor": vae.config.scaling_factor,
        **manifest,
    }
    Manifest(**fields).save(root)
    return root


_CACHE: tempfile.TemporaryDirectory | None = None


def _cache_root() -> Path:
    global _CACHE
    if _CACHE is None:
        _CACHE = tempfile.TemporaryDirectory(prefix="framepack-tiny-")
        atexit.register(shutil.rmtree, _CACHE.name, True)
    return Path(_CACHE.name)


@functools.cache
def _cached_dir(order: str, seed: int) -> Path:
    return make_tiny_bundle(_cache_root() / f"{order}-{seed}", order=order, seed=seed)


def tiny_bundle_dir(order: str = "inverted", seed: int = 0) -> Path:
    """A tiny bundle written once per process (in a temporary directory) and reused; do not modify it."""
    return _cached_dir(order, seed)


def tiny_bundle(order: str = "inverted", seed: int = 0) -> Bundle:
    """A freshly loaded tiny bundle (fp32, CPU) from the per-process cache."""
    return load_bundle(tiny_bundle_dir(order, seed))


def random_packed_inputs(
    config, height: int, width: int, window: int = 9, text_tokens: int = 16, seed: int = 0, batch: int = 1
) -> dict:
    """Seeded random `forward_packed` arguments for `config`: the released history (start + 1 at
    k1, 2 at k2, 16 at k4) around a `window` of noisy latents of `height` x `width` (latent units)."""
    from .model import HistoryGroup

    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    c, hw = config.in_channels, (height, width)
    history = [
        HistoryGroup(randn(batch, c, 2, *hw), torch.tensor([0, window + 1]), "k1"),
        HistoryGroup(randn(batch, c, 2, *hw), torch.tensor([window + 2, window + 3]), "k2"),
        HistoryGroup(randn(batch, c, 16, *hw), torch.arange(window + 4, window + 20), "k4"),
    ]
    return dict(
        noisy=randn(batch, c, window, *hw),
        noisy_indices=torch.arange(1, window + 1),
        history=history,
        timestep=torch.full((batch,), 900.0),
        text=randn(batch, text_tokens, config.text_embed_dim),
        text_mask=torch.ones(batch, text_tokens, dtype=torch.long),
        pooled=randn(batch, config.pooled_projection_dim),
        guidance=torch.full((batch,), 10000.0),
        image_embeds=randn(batch, 4, config.image_proj_dim) if config.has_image_proj else None,
    )


def tight_budget(bundle, prepared=None, fp8: bool = False) -> int:
    """Bytes of the smallest VRAM budget for `bundle` that changes no output: the VAE beside the
    transformer's non-block weights and one streamed block (every block streams), plus, for a
    `prepared` run, what that run holds besides weights (`framepack.pipeline.budget.bundle_need`)
    with room for the VAE's default (256-px tile) decode, so the decode tile does not shrink.
    `fp8`: the plan with fp8 host copies (a block plus one tensor's raw copy)."""
    import dataclasses

    from .memory.offload import TILES, module_bytes, vae_decode_bytes
    from .memory.streaming import plan_memory

    weights = module_bytes(bundle.vae) + plan_memory(bundle.transformer, None, fp8=fp8).least_bytes
    if prepared is None:
        return weights
    from .pipeline.budget import bundle_need, decode_shape

    need = bundle_need(bundle, prepared)
    full = vae_decode_bytes(bundle.vae, decode_shape(bundle.vae, prepared), TILES[0])
    need = dataclasses.replace(need, vae_decode=max(need.vae_decode, full))
    return need.smallest(weights)
