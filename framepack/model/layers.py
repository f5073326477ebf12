"""Building blocks of the packed HunyuanVideo transformer (FRAMEPACK.md section 3).

Module and parameter names are those of the released checkpoints (diffusers layout), so a state
dict maps onto these modules one key to one parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .fp8 import fp8_matmul
from .ops import apply_rope, chunked_mlp, linear, modulated_layer_norm, rms_norm

__all__ = [
    "Linear",
    "PatchEmbed",
    "patch_embed",
    "RMSNorm",
    "FeedForward",
    "MLPEmbedder",
    "ConditionEmbedding",
    "TokenRefiner",
    "ImageProjection",
    "DualStreamBlock",
    "SingleStreamBlock",
    "AdaNorm",
    "timestep_sinusoid",
]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def lora_delta(layer: nn.Module):
    """The on-the-fly LoRA update attached to `layer` as its `lora` submodule, or None."""
    return layer._modules.get("lora")


def fp8_product(layer: nn.Module, cols: slice = slice(None), bias: bool = True):
    """`x -> x @ W[:, cols].T (+ b)` through the e4m3 product in `layer`'s `fp8` slot
    (`--fp8-compute`, `framepack.model.fp8`), or None when it has none."""
    fp8 = fp8_matmul(layer)
    if fp8 is None:
        return None
    return lambda x: fp8(x, layer.weight, layer.bias if bias else None, cols)


class Linear(nn.Linear):
    """`nn.Linear` whose bf16 weights stay fast on CPUs without bf16 units (see `ops.linear`).

    A LoRA applied on the fly (`framepack.lora`) sits in the `lora` slot and adds its update;
    `--fp8-compute` puts an e4m3 product in the `fp8` slot (`framepack.model.fp8`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp8 = fp8_matmul(self)
        y = linear(x, self.weight, self.bias) if fp8 is None else fp8(x, self.weight, self.bias)
        delta = lora_delta(self)
        return y if delta is None else y.add_(delta(x))


def patch_embed(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """Apply a stride-equal-kernel `conv` to `(B, C, T, H, W)` as one matrix product -> `(B, L, D)`.

    Tokens come out in (t, h, w) order, as `conv(x).flatten(2).transpose(1, 2)` would give them.
    """
    b, c, t, h, w = x.shape
    kt, kh, kw = conv.kernel_size
    assert t % kt == 0 and h % kh == 0 and w % kw == 0, "pad to the kernel first"
    patches = x.reshape(b, c, t // kt, kt, h // kh, kh, w // kw, kw)
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * kt * kh * kw)  # (B, L, C*k)
    weight = conv.weight.flatten(1)  # (D, C*k), flattened in the same (C, kt, kh, kw) order
    return linear(patches.to(weight.dtype), weight, conv.bias)  # (B, L, D)


class PatchEmbed(nn.Module):
    """The (1, 2, 2) patchify projection of the noisy latents (key `x_embedder.proj`)."""

    def __init__(self, kernel: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_embed(x, self.proj)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _GateProj(nn.Module):
    """Holds `proj` so the feed-forward keys read `net.0.proj` as in the checkpoints."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = Linear(dim, hidden)


class FeedForward(nn.Module):
    """`Linear -> act -> Linear`, keys `net.0.proj` and `net.2`; evaluated in row chunks."""

    def __init__(self, dim: int, hidden: int, act=_gelu_tanh) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GateProj(dim, hidden), nn.Identity(), Linear(hidden, dim)])
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.net[0].proj, self.net[2]
        return chunked_mlp(
            x,
            up.weight,
            up.bias,
            down.weight,
            down.bias,
            self.act,
            delta1=lora_delta(up),
            delta2=lora_delta(down),
            mm1=fp8_product(up),
            mm2=fp8_product(down),
        )


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `(B, dim)` of `t` `(B,)`, cos half first (as the release)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class MLPEmbedder(nn.Module):
    """`linear_2(silu(linear_1(x)))`."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedding(nn.Module):
    """Global `temb` = MLP(sinusoid(t)) + MLP(sinusoid(g)) + MLP(pooled) (FRAMEPACK.md section 3)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None

    def forward(
        self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = pooled.dtype
        temb = self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))  # (B, D)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model embeds the distilled guidance scale: pass `guidance`.")
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance).to(dtype))
        return temb + self.text_embedder(pooled)  # (B, D)


class _SelfAttention(nn.Module):
    """Plain multi-head self-attention with biases, keys `to_q/to_k/to_v/to_out.0`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, mask)  # (B, H, L, Dh)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, L, D)


class _RefinerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), act=F.silu)
        self.norm_out = nn.Module()
        self.norm_out.linear = Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gate_msa, gate_mlp = self.norm_out.linear(F.silu(temb)).chunk(2, dim=1)  # (B, D) x 2
        x = torch.addcmul(x, self.attn(self.norm1(x), mask), gate_msa[:, None])
        return torch.addcmul(x, self.ff(self.norm2(x)), gate_mlp[:, None])  # (B, L, D)


class _TokenRefinerStack(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float) -> None:
        super().__init__()
        self.refiner_blocks = nn.ModuleList(_RefinerBlock(dim, heads, mlp_ratio) for _ in range(layers))


class TokenRefiner(nn.Module):
    """Refines the LLaMA text states, conditioned on the timestep and their masked mean."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.time_text_embed = ConditionEmbedding(dim, in_dim, guidance=False)
        self.proj_in = Linear(in_dim, dim)
        self.token_refiner = _TokenRefinerStack(dim, heads, layers, mlp_ratio)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            pooled = text.mean(dim=1)  # (B, Din)
            attn_mask = None
        else:
            m = mask.float()[..., None]  # (B, L, 1)
            pooled = ((text * m).sum(dim=1) / m.sum(dim=1)).to(text.dtype)
            valid = mask.bool()
            attn_mask = valid[:, None, None, :] & valid[:, None, :, None]  # (B, 1, L, L)
            attn_mask[:, :, :, 0] = True  # padded queries attend to token 0, avoiding empty rows
        temb = self.time_text_embed(timestep, pooled)  # (B, D)
        x = self.proj_in(text)  # (B, L, D)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb, attn_mask)
        return x


class ImageProjection(nn.Module):
    """SigLIP features `(B, 729, 1152)` to tokens: Linear(1152 -> 3D) - SiLU - Linear(3D -> D)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.up = Linear(in_dim, dim * 3)
        self.down = Linear(dim * 3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class AdaNorm(nn.Module):
    """Holds `linear`: SiLU(temb) -> n modulation vectors (keys `norm1.linear` etc.)."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)  # n x (B, D)


class _JointAttention(nn.Module):
    """Attention projections of a block; `added` ones for the text stream of dual blocks."""

    def __init__(self, dim: int, heads: int, dual: bool) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if dual:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                Linear(dim, dim),
                Linear(dim, dim),
                Linear(dim, dim),
            )
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_out = nn.ModuleList([Linear(dim, dim)])
            self.to_add_out = Linear(dim, dim)

    def qkv(self, x: torch.Tensor, rope: torch.Tensor | None, added: bool = False):
        """Normalised, rotated q, k and v `(B, L, H, Dh)` of one stream."""
        b, n, _ = x.shape
        if added:
            pq, pk, pv, nq, nk = (
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.norm_added_q,
                self.norm_added_k,
            )
        else:
            pq, pk, pv, nq, nk = self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k
        q = nq(pq(x).view(b, n, self.heads, -1))  # (B, L, H, Dh)
        k = nk(pk(x).view(b, n, self.heads, -1))
        v = pv(x).view(b, n, self.heads, -1)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v


class DualStreamBlock(nn.Module):
    """MM-DiT block: image and text streams with their own weights, one joint attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = _JointAttention(dim, heads, dual=True)
        hidden = int(dim * mlp_ratio)
        self.ff, self.ff_context = FeedForward(dim, hidden), FeedForward(dim, hidden)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D) image tokens
        c: torch.Tensor,  # (B, M, D) text tokens
        temb: torch.Tensor,  # (B, D)
        rope: torch.Tensor,  # (B, N, 1, Dh/2) complex
        key_mask: torch.Tensor | None,  # (B, N + M)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[1]
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb)  # (B, D) each
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)

        qi, ki, vi = self.attn.qkv(modulated_layer_norm(x, shift, scale), rope)  # (B, N, H, Dh)
        qt, kt, vt = self.attn.qkv(modulated_layer_norm(c, c_shift, c_scale), None, added=True)
        q, k, v = (torch.cat(pair, dim=1) for pair in ((qi, qt), (ki, kt), (vi, vt)))  # (B, N+M, H, Dh)
        out = attention(q, k, v, key_mask)  # (B, N+M, D)

        x = torch.addcmul(x, self.attn.to_out[0](out[:, :n]), gate[:, None])  # (B, N, D)
        c = torch.addcmul(c, self.attn.to_add_out(out[:, n:]), c_gate[:, None])  # (B, M, D)
        x = torch.addcmul(x, self.ff(modulated_layer_norm(x, shift2, scale2)), gate2[:, None])
        c = torch.addcmul(c, self.ff_context(modulated_layer_norm(c, c_shift2, c_scale2)), c_gate2[:, None])
        return x, c


class SingleStreamBlock(nn.Module):
    """One stream over `[image | text]` tokens; attention and MLP in parallel (Flux-style)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        self.norm = AdaNorm(dim, 3)
        self.attn = _JointAttention(dim, heads, dual=False)
        hidden = int(dim * mlp_ratio)
        self.proj_mlp = Linear(dim, hidden)
        self.proj_out = Linear(dim + hidden, dim)

    def forward(
        self,
        h: torch.Tensor,  # (B, L, D): image tokens (N of them, rotated) then text tokens
        temb: torch.Tensor,  # (B, D)
        rope: torch.Tensor,  # (B, N, 1, Dh/2) complex
        key_mask: torch.Tensor | None,  # (B, L)
        keep_last: int | None = None,  # only compute outputs for these last image tokens
    ) -> torch.Tensor:
        b, length, _ = h.shape
        n = rope.shape[1]
        shift, scale, gate = self.norm(temb)  # (B, D) each
        normed = modulated_layer_norm(h, shift, scale)  # (B, L, D)

        q, k, v = self.attn.qkv(normed, None)  # (B, L, H, Dh)
        q = torch.cat([apply_rope(q[:, :n], rope), q[:, n:]], dim=1)
        k = torch.cat([apply_rope(k[:, :n], rope), k[:, n:]], dim=1)
        rows = slice(0, length)
        if keep_last is not None:  # last block: only the noisy tokens are read out
            rows = slice(n - keep_last, n)
            q, normed, h = q[:, rows], normed[:, rows], h[:, rows]
        out = attention(q, k, v, key_mask)  # (B, R, D)

        w_attn, w_mlp = self.proj_out.weight[:, : self.dim], self.proj_out.weight[:, self.dim :]
        lora_mlp, lora_out = lora_delta(self.proj_mlp), lora_delta(self.proj_out)
        # proj_out(cat[attn, gelu(mlp)]) without the concatenation: the MLP half in cache-sized chunks.
        mixed = chunked_mlp(
            normed,
            self.proj_mlp.weight,
            self.proj_mlp.bias,
            w_mlp,
            self.proj_out.bias,
            _gelu_tanh,
            delta1=lora_mlp,
            delta2=None if lora_out is None else lora_out.columns(self.dim, None),
            mm1=fp8_product(self.proj_mlp),
            mm2=fp8_product(self.proj_out, slice(self.dim, None)),
        )
        attn_fp8 = fp8_product(self.proj_out, slice(0, self.dim), bias=False)
        mixed = mixed + (linear(out, w_attn, None) if attn_fp8 is None else attn_fp8(out))  # (B, R, D)
        if lora_out is not None:
            mixed = mixed + lora_out.columns(0, self.dim)(out)
        return torch.addcmul(h, mixed, gate[:, None])
