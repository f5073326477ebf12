"""Loading and saving packed-transformer checkpoints (safetensors only).

Reads a diffusers-layout directory (config.json + sharded safetensors + index), a single
`.safetensors` file (config from its metadata or inferred from the shapes), or a Hugging Face
repo id through the local hub cache. Every key is mapped explicitly and every shape and dtype is
checked before a tensor is read; the model is built on the `meta` device and filled shard by
shard, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from ..io.weights import (
    FLOAT_DTYPES,
    CheckpointError,
    disk_source,
    header_sources,
    read_header,
    set_disk_source,
)
from ..packing.schedule import Kernel
from .config import RELEASE_CLASS_NAMES, TransformerConfig, default_rope_axes
from .transformer import PackedTransformer

__all__ = [
    "FLOAT_DTYPES",
    "CheckpointError",
    "infer_config",
    "load_transformer",
    "read_header",
    "save_transformer",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Prefixes that community single-file checkpoints put before the diffusers names.
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is a pickle checkpoint, which can run code when loaded and is refused; "
        "convert it to safetensors (safetensors.torch.save_file) and load that."
    )


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def infer_config(shapes: dict[str, tuple[int, ...]]) -> TransformerConfig:
    """A config from a state dict's key -> shape map (for single files without a config)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the model config: the checkpoint has no {key!r}.")
        return shapes[key]

    dim, in_channels = shape("x_embedder.proj.weight")[:2]
    head_dim = shape("single_transformer_blocks.0.attn.norm_q.weight")[0]

    def count(prefix: str) -> int:
        found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    kernels = []
    for key, s in shapes.items():
        m = re.fullmatch(r"clean_x_embedder\.(proj\w*)\.weight", key)
        if m:
            k = Kernel(*s[2:])
            if k.projection_name() != m.group(1):
                raise CheckpointError(f"{key} has kernel {tuple(s[2:])}, which does not fit its name.")
            kernels.append(k)
    kernels.sort(key=lambda k: k.compression)
    image = shapes.get("image_projection.up.weight")
    try:
        return TransformerConfig(
            in_channels=in_channels,
            out_channels=shape("proj_out.weight")[0] // 4,
            num_attention_heads=dim // head_dim,
            attention_head_dim=head_dim,
            num_layers=count("transformer_blocks"),
            num_single_layers=count("single_transformer_blocks"),
            num_refiner_layers=count("context_embedder.token_refiner.refiner_blocks"),
            mlp_ratio=shape("single_transformer_blocks.0.proj_mlp.weight")[0] / dim,
            text_embed_dim=shape("context_embedder.proj_in.weight")[1],
            pooled_projection_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
            rope_axes_dim=default_rope_axes(head_dim),
            has_image_proj=image is not None,
            image_proj_dim=image[1] if image is not None else 1152,
            has_clean_x_embedder=bool(kernels),
            clean_kernels=tuple(k.name for k in kernels) or ("k1", "k2", "k4"),
        )
    except ValueError as e:
        raise CheckpointError(f"cannot infer the model config: {e}") from None


def _config_from_json(path: Path) -> TransformerConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    name = data.get("_class_name")
    if name is not None and name not in RELEASE_CLASS_NAMES:
        raise CheckpointError(f"{path} describes a {name}, not a FramePack packed transformer.")
    try:
        return TransformerConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _shards_of(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name} is not a valid shard index ({e}).") from None
        shards = sorted(set(weight_map.values()))
        for name in shards:
            if not (directory / name).is_file():
                raise CheckpointError(f"shard {name} named in {index.name} is missing from {directory}.")
        return [directory / s for s in shards]
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    pickles = [p for p in sorted(directory.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refusal(pickles[0])
    raise CheckpointError(f"{directory} has no safetensors weights.")


def _materialise(
    config: TransformerConfig,
    shards: list[Path],
    dtype: torch.dtype | None,
    device: torch.device | str,
    lazy: bool = False,
) -> PackedTransformer:
    with torch.device("meta"):
        model = PackedTransformer(config)
    expected = dict(model.named_parameters())
    seen: set[str] = set()
    for shard in shards:
        header, _, data_start = read_header(shard)
        names = {}
        for key, entry in header.items():  # check everything before reading any tensor
            name = _strip_prefix(key)
            if name not in expected:
                raise CheckpointError(
                    f"{shard.name} has an unexpected key {key!r}; is this a FramePack transformer?"
                )
            if name in seen or name in names.values():
                raise CheckpointError(f"{shard.name} repeats the key {key!r}.")
            if entry.get("dtype") not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{key} in {shard.name} has dtype {entry.get('dtype')}, not a float type."
                )
            want = tuple(expected[name].shape)
            if tuple(entry["shape"]) != want:
                raise CheckpointError(
                    f"{key} in {shard.name} has shape {tuple(entry['shape'])}, the model expects {want}."
                )
            names[key] = name
        sources = header_sources(shard, header, data_start)
        try:
            shard_file = nullcontext() if lazy else open(shard, "rb", buffering=0)  # one open per shard
            with shard_file as f:
                for key, name in names.items():
                    source = sources[key]
                    target = dtype or (torch.bfloat16 if source.stored.itemsize == 1 else source.stored)
                    module_name, _, attr = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    if lazy:  # every weight stays in its file until a run reads it (`framepack.memory.disk`)
                        set_disk_source(module, attr, source, target)
                    else:  # read into a fresh buffer, one tensor at a time: no mapping of the whole file
                        tensor = source.read(torch.empty(source.shape, dtype=source.stored), file=f)
                        value = tensor.to(device=device, dtype=target)
                        setattr(module, attr, nn.Parameter(value, requires_grad=False))
                        del tensor, value
                    seen.add(name)
        except OSError as e:
            raise CheckpointError(f"{shard.name} could not be read ({e}).") from None
    missing = [n for n in expected if n not in seen]
    if missing:
        what = "a weight" if len(missing) == 1 else f"{len(missing)} weights"
        raise CheckpointError(f"the checkpoint lacks {what}, the first is {missing[0]!r}.")
    dtypes = {p.dtype for p in model.parameters()}
    if dtype is None and len(dtypes) > 1:  # mixed storage: unify on the most common dtype
        common = max(dtypes, key=lambda d: sum(p.numel() for p in model.parameters() if p.dtype == d))
        if lazy:
            for name, p in list(model.named_parameters()):
                module_name, _, attr = name.rpartition(".")
                set_disk_source(model.get_submodule(module_name), attr, disk_source(p), common)
        else:
            model.to(common)
    return model.eval().requires_grad_(False)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, sub = repo_id.partition(":")
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    if sub:
        patterns = [f"{sub}/{p}" for p in patterns]
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
            "1",
            "true",
            "yes",
        )
        why = "the hub is offline (HF_HUB_OFFLINE)" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and {why}; download it first or pass a local path."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{repo_id} could not be fetched from the Hugging Face hub ({e}).") from None
    return root / sub if sub else root


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    lazy: bool = False,
) -> PackedTransformer:
    """Load a packed transformer from a directory, a `.safetensors` file or a hub repo id.

    `dtype=None` keeps the stored dtype (fp8 storage becomes bf16). Hub ids may name a subfolder
    as `owner/name:subfolder`. `lazy`: every weight is checked but stays in its file, a
    memory-free placeholder with its `DiskSource` (`framepack.io.weights`) until a run reads it.
    Raises `CheckpointError` with one sentence on a bad checkpoint.
    """
    p = Path(path)
    looks_like_file = p.suffix in (".safetensors", ".json", ".gguf", *PICKLE_SUFFIXES)
    if not p.exists() and not looks_like_file and re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+)?", str(path)):
        p = _from_hub(str(path))
    if p.is_dir():
        config_path = p / "config.json"
        if not config_path.is_file():
            if any(q.suffix in PICKLE_SUFFIXES for q in p.iterdir()):
                raise _pickle_refusal(next(q for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES))
            raise CheckpointError(f"{p} has no config.json; it is not a model directory.")
        return _materialise(_config_from_json(config_path), _shards_of(p), dtype, device, lazy)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(p)
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p.name} is not a .safetensors checkpoint.")
        header, meta, _ = read_header(p)
        if "config" in meta:
            try:
                config = TransformerConfig.from_dict(json.loads(meta["config"]))
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{p.name} carries a bad config in its metadata ({e}).") from None
        else:
            config = infer_config({_strip_prefix(k): tuple(v["shape"]) for k, v in header.items()})
        return _materialise(config, [p], dtype, device, lazy)
    raise CheckpointError(f"{path} does not exist.")


def save_transformer(
    model: PackedTransformer,
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
    class_name: str = "HunyuanVideoFramepackTransformer3DModel",
) -> Path:
    """Write `model` in the diffusers layout: config.json, safetensors shards and their index."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=meta)
        (out / INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(model.config.to_diffusers_dict(class_name), indent=2))
    return out
