"""Configuration of the packed transformer, and a registry of named specs.

Field names follow the diffusers `config.json` of the released checkpoints, so a config file maps
onto this dataclass key for key (FRAMEPACK.md section 3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["TransformerConfig", "SPECS", "get_spec", "default_rope_axes", "RELEASE_CLASS_NAMES"]

# Class names found in the `_class_name` field of released / diffusers checkpoints.
RELEASE_CLASS_NAMES = ("HunyuanVideoTransformer3DModelPacked", "HunyuanVideoFramepackTransformer3DModel")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a FramePack packed HunyuanVideo transformer (defaults: the released 13B model)."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40  # single-stream blocks
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    has_image_proj: bool = True
    image_proj_dim: int = 1152
    has_clean_x_embedder: bool = True
    # History kernels with their own input projection (names as in `Kernel.parse`). The release
    # has k1, k2 and k4; training may add others (k8 ...), initialised from the k1 projection.
    clean_kernels: tuple[str, ...] = ("k1", "k2", "k4")

    def __post_init__(self) -> None:
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim {tuple(self.rope_axes_dim)} must sum to attention_head_dim "
                f"{self.attention_head_dim}."
            )
        if any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim {tuple(self.rope_axes_dim)} must hold even numbers.")
        if self.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported; the release uses 'rms_norm'.")
        if (self.patch_size_t, self.patch_size) != (1, 2):
            raise ValueError("only the released patch size (1, 2, 2) is supported.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    def to_diffusers_dict(self, class_name: str = "HunyuanVideoFramepackTransformer3DModel") -> dict:
        """The `config.json` content for this config (readable by diffusers and by us)."""
        out = {"_class_name": class_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if tuple(self.clean_kernels) == ("k1", "k2", "k4"):
            del out["clean_kernels"]  # the released layout; keeps the file loadable by diffusers
        out["image_condition_type"] = None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        """Build from a `config.json` dict, ignoring keys that carry no shape information."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and not k.startswith("_"))
        ignorable = {"image_condition_type"}
        bad = [k for k in unknown if k not in ignorable]
        if bad:
            raise ValueError(f"config has unknown key {bad[0]!r}.")
        if data.get("image_condition_type") not in (None, ""):
            raise ValueError(
                f"image_condition_type {data['image_condition_type']!r} is not a FramePack model "
                "(the packed models use image embeddings, not token replacement)."
            )
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("rope_axes_dim", "clean_kernels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for key in ("has_image_proj", "has_clean_x_embedder", "guidance_embeds"):
            if key in kwargs:
                kwargs[key] = bool(kwargs[key])
        return cls(**kwargs)


SPECS: dict[str, TransformerConfig] = {
    # The released FramePack models (FramePackI2V_HY and FramePack_F1_I2V_HY_20250503).
    "hunyuan-13b": TransformerConfig(),
    # The benchmark config of bench/transformer.py.
    "medium": TransformerConfig(
        num_attention_heads=4,
        num_layers=2,
        num_single_layers=6,
        text_embed_dim=256,
        pooled_projection_dim=64,
    ),
    # Milliseconds on a CPU: for tests.
    "tiny": TransformerConfig(
        num_attention_heads=2,
        attention_head_dim=32,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=24,
        pooled_projection_dim=12,
        rope_axes_dim=(4, 14, 14),
        image_proj_dim=20,
    ),
}


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The release's split of a head over (t, h, w): 1/8 to time, the rest halved (128 -> 16, 56, 56)."""
    t = head_dim // 8
    hw = (head_dim - t) // 2
    if t % 2 or hw % 2 or t + 2 * hw != head_dim:
        raise ValueError(
            f"no default RoPE split for head dim {head_dim}; give rope_axes_dim in a config.json."
        )
    return (t, hw, hw)


def get_spec(name: str) -> TransformerConfig:
    """A named config from `SPECS`."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown transformer spec {name!r}; choose one of {', '.join(SPECS)}.") from None
