"""Reading the latent cache that `framepack prepare` writes (`framepack.training.prepare`)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from framepack.io import InputError

__all__ = ["TENSOR_NAMES", "LatentCache"]

TENSOR_NAMES = ("latents", "text", "text_mask", "pooled", "image_embeds")


class LatentCache(Dataset):
    """The clips of a prepared cache, in `index.json` order.

    `cache[i]` is a dict of CPU tensors: `latents` (16, t, h, w) float32 (times the VAE scaling
    factor), `text` (L, D_text), `text_mask` (L,), `pooled` (D_pooled,), `image_embeds`
    (N, D_img). `entries[i]` is the clip's index entry (file, caption, latent_frames, height,
    width, fps, source). Clips differ in size (buckets, lengths): batch within `groups()`.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / "index.json"
        if not index.is_file():
            raise InputError(f"{self.directory} has no index.json; run `framepack prepare` into it first.")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"The cache index {index} cannot be read ({type(e).__name__}).") from None
        clips = data.get("clips") if isinstance(data, dict) else None
        if not isinstance(clips, list) or not all(isinstance(c, dict) and "file" in c for c in clips):
            raise InputError(f"The cache index {index} does not list clips; is it a framepack cache?")
        self.entries: list[dict[str, Any]] = clips
        self.settings: dict[str, Any] = data.get("settings", {})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        entry = self.entries[i]  # IndexError past the end, as a sequence should
        path = self.directory / entry["file"]
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise InputError(f"Cache file {path} cannot be loaded ({type(e).__name__}).") from None
        missing = [n for n in TENSOR_NAMES if n not in tensors]
        if missing:
            raise InputError(f"Cache file {path} lacks the tensor {missing[0]!r}.")
        return tensors

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """`text`, `text_mask`, `pooled` of the empty caption (written by `framepack prepare`)."""
        from safetensors.torch import load_file

        path = self.directory / "empty_prompt.safetensors"
        if not path.is_file():
            raise InputError(
                f"{self.directory} has no empty_prompt.safetensors, which caption_dropout needs; "
                "run `framepack prepare` into it again (it reuses the encoded clips)."
            )
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise InputError(f"Cache file {path} cannot be loaded ({type(e).__name__}).") from None

    def caption(self, i: int) -> str:
        return self.entries[i]["caption"]

    def groups(self) -> dict[tuple[int, int, int], list[int]]:
        """Clip indices by latent shape (latent frames, height, width): each group can be batched."""
        out: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            out[(e["latent_frames"], e["height"], e["width"])].append(i)
        return dict(out)
