"""The bundle layout and its manifest, `framepack.json` (FRAMEPACK.md section 8).

A bundle is a directory in the Hugging Face layout::

    framepack.json        the manifest: section order, packing, prompt template, defaults
    tokenizer/            LLaMA fast tokenizer          text_encoder/    LlamaModel
    tokenizer_2/          CLIP tokenizer                text_encoder_2/  CLIPTextModel
    feature_extractor/    SiglipImageProcessor          image_encoder/   SiglipVisionModel
    vae/                  AutoencoderKLHunyuanVideo     transformer/     our PackedTransformer

`framepack.pipeline.named` finds a bundle (a directory or a named bundle) and
`framepack.pipeline.bundle` loads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COMPONENTS",
    "HUNYUAN_PROMPT_TEMPLATE",
    "MANIFEST_NAME",
    "BundleError",
    "Manifest",
    "read_config",
]

MANIFEST_NAME = "framepack.json"
COMPONENTS = (
    "tokenizer",
    "text_encoder",
    "tokenizer_2",
    "text_encoder_2",
    "feature_extractor",
    "image_encoder",
    "vae",
    "transformer",
)
MODEL_ORDERS = ("inverted", "forward")

# diffusers' HunyuanVideo `DEFAULT_PROMPT_TEMPLATE["template"]` (the text the LLaMA encoder reads;
# `{}` takes the prompt). Its first 95 tokens (bos + the system turn + the user header) are cropped.
HUNYUAN_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)


class BundleError(ValueError):
    """A bundle that cannot be found or loaded; the message is one sentence for the user."""


@dataclass(frozen=True)
class Manifest:
    """What a bundle's weights expect and the defaults of a generation (`framepack.json`)."""

    order: str = "inverted"  # section order the transformer was trained for: "inverted" | "forward"
    packing: str = "inverted"  # packing schedule: a preset or a paper name like "f16k4f2k2f1k1_g9"
    prompt_template: str = HUNYUAN_PROMPT_TEMPLATE
    template_crop: int = 95  # template tokens before the prompt (bos included), cropped away
    max_prompt_tokens: int = 256
    text_hidden_layer: int = -3  # LLaMA hidden state read (index into `hidden_states`)
    window: int = 9  # latent frames per section
    fps: int = 30
    resolution: int = 640  # bucket setting
    steps: int = 25
    distilled_guidance: float = 10.0
    cfg: float = 1.0  # real CFG scale by default (1: off, as the release; negative prompt "")
    shift: float | None = None  # None: resolution-dependent shift (FRAMEPACK.md section 5)
    vae_scaling_factor: float = 0.476986
    # True: the VAE codes clips of more than 16 frames in diffusers' overlapping temporal tiles (the
    # release's behaviour, and its memory saving); False: whole clips in one pass, exact for a VAE
    # trained on whole clips (the demo's), and 4-5x faster on a CPU.
    vae_temporal_tiles: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        from ..packing import get_schedule

        if self.order not in MODEL_ORDERS:
            raise ValueError(f"manifest order {self.order!r} is not one of {', '.join(MODEL_ORDERS)}.")
        get_schedule(self.packing)  # raises a ValueError naming the presets
        if not isinstance(self.prompt_template, str) or self.prompt_template.count("{}") != 1:
            raise ValueError("the manifest's prompt_template must hold exactly one '{}' for the prompt.")
        for key in ("template_crop", "max_prompt_tokens", "window", "fps", "resolution", "steps"):
            value = getattr(self, key)
            low = 0 if key == "template_crop" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"manifest {key} must be an integer of at least {low}, got {value!r}.")
        if isinstance(self.text_hidden_layer, bool) or not isinstance(self.text_hidden_layer, int):
            raise ValueError(
                f"manifest text_hidden_layer must be an integer, got {self.text_hidden_layer!r}."
            )
        if self.resolution % 16:
            raise ValueError(f"manifest resolution must be a multiple of 16, got {self.resolution}.")
        for key in ("distilled_guidance", "vae_scaling_factor", "shift", "cfg"):
            value = getattr(self, key)
            if value is None and key == "shift":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"manifest {key} must be a positive number, got {value!r}.")
        if not isinstance(self.name, str):
            raise ValueError(f"manifest name must be a string, got {self.name!r}.")
        if not isinstance(self.vae_temporal_tiles, bool):
            raise ValueError(
                f"manifest vae_temporal_tiles must be true or false, got {self.vae_temporal_tiles!r}."
            )

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from a dict; an unknown key is an error (a typo must not silently fall back)."""
        if not isinstance(data, dict):
            raise ValueError(f"a manifest is a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"the manifest has unknown key {unknown[0]!r}; known keys are {', '.join(sorted(known))}."
            )
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read `framepack.json` (`path` is the file or the bundle directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} is not a readable JSON manifest ({e}).") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `framepack.json` (`path` is the file or the bundle directory); returns the file."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return p


def read_config(component: str, directory: Path) -> dict:
    """The `config.json` of `component` in `directory`; `BundleError` (one sentence) when it is
    missing, not JSON or not a JSON object."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"the {component} component in {directory} has no config.json.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"the {component} component's config.json is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise BundleError(f"the {component} component's config.json does not hold a JSON object.")
    return data
