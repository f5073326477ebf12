"""The FramePack packed HunyuanVideo transformer: wiring only, blocks live in `layers.py`.

The image stream is `[history tokens, largest kernel first | noisy tokens]`; for the released
layout that is `[k4 | k2 | k1 clean | noisy]` (FRAMEPACK.md section 2). Text and SigLIP image
tokens form the second stream (`[image embeddings | text]`), without RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..packing.rope import pad_replicate, pooled_rope_tables, rope_tables
from ..packing.schedule import Kernel
from .config import TransformerConfig
from .layers import (
    AdaNorm,
    ConditionEmbedding,
    DualStreamBlock,
    ImageProjection,
    Linear,
    PatchEmbed,
    SingleStreamBlock,
    TokenRefiner,
    patch_embed,
)
from .ops import linear, rope_to_complex

__all__ = ["PackedTransformer", "HistoryGroup", "TransformerOutput", "init_kernel_from_base"]


@dataclass
class HistoryGroup:
    """Clean history latents `(B, C, T, H, W)` at time `indices` `(T,)` or `(B, T)`, packed with `kernel`."""

    latents: torch.Tensor
    indices: torch.Tensor
    kernel: str = "k1"


@dataclass
class TransformerOutput:
    sample: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.sample,)[i]


class HistoryEmbedder(nn.Module):
    """One Conv3d input projection per history kernel (`proj`, `proj_2x`, `proj_4x`, ...)."""

    def __init__(self, kernels: Sequence[str], in_channels: int, dim: int) -> None:
        super().__init__()
        self.in_channels, self.dim = in_channels, dim
        for name in kernels:
            self.add_kernel(Kernel.parse(name))

    def add_kernel(self, kernel: Kernel) -> nn.Conv3d:
        """Create (uninitialised) and register the projection for `kernel`."""
        size = (kernel.t, kernel.h, kernel.w)
        conv = nn.Conv3d(self.in_channels, self.dim, kernel_size=size, stride=size)
        self.add_module(kernel.projection_name(), conv)
        return conv

    def forward(self, latents: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        conv = getattr(self, kernel.projection_name(), None)
        if conv is None:
            raise ValueError(f"this model has no input projection for history kernel {kernel.name}.")
        return patch_embed(pad_replicate(latents, (kernel.t, kernel.h, kernel.w)), conv)  # (B, L, D)


@torch.no_grad()
def init_kernel_from_base(base: nn.Conv3d, target: nn.Conv3d) -> None:
    """Initialise a big-kernel projection from the (1, 2, 2) one (FRAMEPACK.md section 2).

    Every base tap is repeated over the kernel ratio and divided by its volume, so at init the big
    kernel equals average-pooling in latent space followed by the base projection.
    """
    rt, rh, rw = (t // b for t, b in zip(target.kernel_size, base.kernel_size, strict=True))
    weight = base.weight.repeat_interleave(rt, 2).repeat_interleave(rh, 3).repeat_interleave(rw, 4)
    target.weight.copy_(weight / (rt * rh * rw))
    target.bias.copy_(base.bias)


class PackedTransformer(nn.Module):
    """FramePack's next-section predictor: velocity for the noisy window given packed history."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        dim, heads = c.inner_dim, c.num_attention_heads
        self.x_embedder = PatchEmbed((c.patch_size_t, c.patch_size, c.patch_size), c.in_channels, dim)
        self.clean_x_embedder = (
            HistoryEmbedder(c.clean_kernels, c.in_channels, dim) if c.has_clean_x_embedder else None
        )
        # The token refiner's MLP ratio is fixed at 4 in the released architecture.
        self.context_embedder = TokenRefiner(c.text_embed_dim, dim, heads, c.num_refiner_layers, 4.0)
        self.image_projection = ImageProjection(c.image_proj_dim, dim) if c.has_image_proj else None
        self.time_text_embed = ConditionEmbedding(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(dim, heads, c.mlp_ratio) for _ in range(c.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, c.mlp_ratio) for _ in range(c.num_single_layers)
        )
        self.norm_out = AdaNorm(dim, 2)
        self.proj_out = Linear(dim, c.patch_size_t * c.patch_size * c.patch_size * c.out_channels)
        self.gradient_checkpointing = False
        # The release's inference runs `proj_out` in fp32 on hidden states cast to fp32; `norm_out`
        # (modulation and layer norm) stays in the model's dtype.
        self.fp32_head = False

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def add_history_kernel(self, name: str) -> None:
        """Give the model an input projection for a new history kernel (e.g. "k8"), for training.

        The new Conv3d is initialised from the k1 projection (`init_kernel_from_base`) and the
        config records the kernel, so a saved checkpoint loads with it.
        """
        if self.clean_x_embedder is None:
            raise ValueError("this model has no history projections to extend.")
        kernel = Kernel.parse(name)
        if kernel.name in self.config.clean_kernels:
            return
        base = self.clean_x_embedder.proj
        conv = self.clean_x_embedder.add_kernel(kernel).to(device=base.weight.device, dtype=base.weight.dtype)
        init_kernel_from_base(base, conv)
        self.config = self.config.replace(clean_kernels=(*self.config.clean_kernels, kernel.name))

    def _rope(
        self, indices: torch.Tensor, t: int, h: int, w: int, kernel: Kernel, batch: int
    ) -> torch.Tensor:
        """Complex RoPE multipliers `(B, L, 1, Dh/2)` for one token group."""
        c = self.config
        indices = indices.to(self.device)
        if indices.shape[-1] != t:
            raise ValueError(f"{indices.shape[-1]} time indices given for {t} latent frames.")
        args = (indices, h // c.patch_size, w // c.patch_size, tuple(c.rope_axes_dim), c.rope_theta, batch)
        if kernel == Kernel(1, 2, 2):
            cos, sin = rope_tables(*args)
        else:
            cos, sin = pooled_rope_tables(indices, args[1], args[2], kernel.pool, *args[3:])
        return rope_to_complex(cos, sin)

    def _run(self, block: nn.Module, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def _image_tokens(
        self, noisy: torch.Tensor, noisy_indices: torch.Tensor, history: Sequence[HistoryGroup]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The image stream `(B, N, D)` and its rope `(B, N, 1, Dh/2)`: the history groups
        (largest kernel first), then the noisy window, whose token count comes last."""
        b, _, t, h, w = noisy.shape
        dtype, base = self.dtype, Kernel(1, 2, 2)
        tokens = [self.x_embedder(noisy.to(self.device, dtype))]  # (B, N_noisy, D)
        ropes = [self._rope(noisy_indices, t, h, w, base, b)]
        groups = sorted(
            ((Kernel.parse(g.kernel), g) for g in history if g.latents.shape[2] > 0),
            key=lambda kg: kg[0].compression,
        )
        for kernel, group in groups:  # ascending compression, each prepended
            if self.clean_x_embedder is None:
                raise ValueError("this model has no history projections (has_clean_x_embedder is off).")
            if group.latents.shape[3:] != (h, w):
                raise ValueError(
                    f"history latents are {tuple(group.latents.shape[3:])}, noisy ones {(h, w)}."
                )
            tokens.insert(0, self.clean_x_embedder(group.latents.to(self.device, dtype), kernel))
            ropes.insert(0, self._rope(group.indices, group.latents.shape[2], h, w, kernel, b))
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]  # (B, N, D)
        rope = torch.cat(ropes, dim=1) if len(ropes) > 1 else ropes[0]  # (B, N, 1, Dh/2)
        n_noisy = tokens[-1].shape[1]
        return x, rope, n_noisy

    def forward_packed(
        self,
        noisy: torch.Tensor,  # (B, C, T, H, W)
        noisy_indices: torch.Tensor,  # (T,) or (B, T)
        history: Sequence[HistoryGroup],
        timestep: torch.Tensor,  # (B,) sigma * 1000
        text: torch.Tensor,  # (B, M, text_embed_dim)
        text_mask: torch.Tensor | None,  # (B, M), 1 for real tokens (a prefix)
        pooled: torch.Tensor,  # (B, pooled_projection_dim)
        guidance: torch.Tensor | None = None,  # (B,) distilled guidance * 1000
        image_embeds: torch.Tensor | None = None,  # (B, 729, image_proj_dim)
    ) -> torch.Tensor:
        """Velocity `(B, C, T, H, W)` for the noisy window, in the model's dtype (fp32 with `fp32_head`)."""
        b, _, t, h, w = noisy.shape
        dtype, c = self.dtype, self.config
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"latent height and width must be even, got {h}x{w}.")
        timestep = timestep.to(self.device).reshape(-1).expand(b)
        if guidance is not None:
            guidance = guidance.to(self.device).reshape(-1).expand(b)

        # 1. Image stream: history groups (largest kernel first), then the noisy window.
        x, rope, n_noisy = self._image_tokens(noisy, noisy_indices, history)

        # 2. Conditioning: global embedding, refined text, SigLIP tokens before the text.
        temb = self.time_text_embed(timestep, pooled.to(self.device, dtype), guidance)  # (B, D)
        text = text.to(self.device, dtype)
        text_mask = None if text_mask is None else text_mask.to(self.device)
        if text_mask is not None:  # crop the padding every row has (exact: masks are prefixes)
            keep = int(text_mask.sum(dim=1).max())
            if b == 1:  # batch 1: no mask needed
                text, text_mask = text[:, :keep], None
            else:
                text, text_mask = text[:, : max(keep, 1)], text_mask[:, : max(keep, 1)]
                text_mask = None if bool(text_mask.all()) else text_mask
        ctx = self.context_embedder(text, timestep, text_mask)  # (B, M, D)
        key_mask = None
        if image_embeds is not None and self.image_projection is None:
            raise ValueError("this model has no image projection; pass image_embeds=None.")
        if image_embeds is not None:  # (None on a model with a projection: no image tokens)
            img = self.image_projection(image_embeds.to(self.device, dtype))  # (B, 729, D)
            ctx = torch.cat([img, ctx], dim=1)
            if text_mask is not None:
                text_mask = F.pad(text_mask, (img.shape[1], 0), value=1)
        if text_mask is not None:  # batch > 1: mask the padded text keys
            key_mask = F.pad(text_mask.to(self.device).bool(), (x.shape[1], 0), value=True)  # (B, N+M)

        # 3. Blocks.
        for block in self.transformer_blocks:
            x, ctx = self._run(block, x, ctx, temb, rope, key_mask)
        hs = torch.cat([x, ctx], dim=1)  # (B, N+M, D)
        last = len(self.single_transformer_blocks) - 1
        for i, block in enumerate(self.single_transformer_blocks):
            hs = self._run(block, hs, temb, rope, key_mask, keep_last=n_noisy if i == last else None)
        if last < 0:
            hs = hs[:, x.shape[1] - n_noisy : x.shape[1]]
        # hs: (B, N_noisy, D)

        # 4. Head on the noisy tokens only (norm_out in the model's dtype, as diffusers' AdaLayerNormContinuous
        # computes it: two roundings, not one fused multiply-add), then unpatchify.
        scale, shift = self.norm_out(temb)  # (B, D) each
        hs = F.layer_norm(hs, hs.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)
        head_dtype = torch.float32 if self.fp32_head else dtype
        w_out, b_out = self.proj_out.weight, self.proj_out.bias
        out = linear(hs.to(head_dtype), w_out.to(head_dtype), b_out.to(head_dtype))  # (B, N_noisy, C*4)
        p = c.patch_size
        out = out.view(b, t, h // p, w // p, -1, 1, p, p)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, -1, t, h, w)  # (B, C, T, H, W)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        latent_indices: torch.Tensor | None = None,
        clean_latents: torch.Tensor | None = None,
        clean_latent_indices: torch.Tensor | None = None,
        clean_latents_2x: torch.Tensor | None = None,
        clean_latent_2x_indices: torch.Tensor | None = None,
        clean_latents_4x: torch.Tensor | None = None,
        clean_latent_4x_indices: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool | None = None,
    ):
        """The release's call signature; returns the velocity `(B, C, T, H, W)`.

        `return_dict=False` gives a 1-tuple and `True` an object with `.sample`, as the release does,
        so code written for it (`model(...)[0]`) runs unchanged.
        """
        t = hidden_states.shape[2]
        if latent_indices is None:
            latent_indices = torch.arange(t)
        history = []
        for latents, indices, kernel in (
            (clean_latents, clean_latent_indices, "k1"),
            (clean_latents_2x, clean_latent_2x_indices, "k2"),
            (clean_latents_4x, clean_latent_4x_indices, "k4"),
        ):
            if latents is not None:
                if indices is None:
                    raise ValueError(f"history latents for {kernel} were given without their indices.")
                history.append(HistoryGroup(latents, indices, kernel))
        out = self.forward_packed(
            hidden_states,
            latent_indices,
            history,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            pooled_projections,
            guidance,
            image_embeddings,
        )
        if return_dict is None:
            return out
        return TransformerOutput(out) if return_dict else (out,)
