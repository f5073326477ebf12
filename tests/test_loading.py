"""Checkpoint loading and saving: layouts, the hub cache, bad checkpoints, memory and model state.

Every checkpoint here is a tiny `PackedTransformer` with randomised weights written under tmp_path,
in the layouts the released weights come in (FRAMEPACK.md sections 3 and 8). Nothing touches the
network: the hub tests run against a fake cache with HF_HUB_OFFLINE set and sockets blocked.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from framepack.model import HistoryGroup, PackedTransformer, TransformerConfig, get_spec
from framepack.model.loading import CheckpointError, infer_config, load_transformer, save_transformer

TINY = get_spec("tiny")
CLASS_NAMES = ("HunyuanVideoTransformer3DModelPacked", "HunyuanVideoFramepackTransformer3DModel")
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARD_RE = re.compile(r"diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors")
SHARD_BYTES = 600_000  # the tiny model is 2.7 MB in fp32, so this gives five shards
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- helpers
def random_model(config: TransformerConfig = TINY, seed: int = 0) -> PackedTransformer:
    """A model whose every parameter is random, so a swapped or default-initialised weight shows."""
    torch.manual_seed(seed)
    model = PackedTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal in dtype and value."""
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype, key
        assert torch.equal(got[key], want), key


def assert_one_sentence(error: pytest.ExceptionInfo, *needles: str) -> str:
    """The message is one line, one sentence, no traceback, and names each of `needles`."""
    assert error.type is CheckpointError
    assert isinstance(error.value, ValueError)
    msg = str(error.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert msg[-1] in ".?", msg
    assert not re.search(r"[.!?] +[A-Z]", msg), f"more than one sentence: {msg}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def write_dir(
    directory: Path,
    state: dict[str, torch.Tensor],
    config: TransformerConfig = TINY,
    class_name: str = CLASS_NAMES[0],
) -> Path:
    """A diffusers-layout directory with an arbitrary (possibly broken) state dict in one file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_diffusers_dict(class_name)))
    save_file(state, str(directory / WEIGHTS))
    return directory


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: the hub is offline and sockets refuse to connect."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a loading test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def model() -> PackedTransformer:
    return random_model()


# ---------------------------------------------------------------- 1. diffusers-layout directories
@pytest.mark.parametrize("class_name", CLASS_NAMES)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_diffusers_directory_round_trip(tmp_path, model, class_name, sharded):
    out = save_transformer(model, tmp_path / "ckpt", SHARD_BYTES if sharded else 10**9, class_name)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if SHARD_RE.fullmatch(f)]
    if sharded:
        assert len(shards) > 1
        assert {SHARD_RE.fullmatch(s).group(2) for s in shards} == {f"{len(shards):05d}"}
        index = json.loads((out / INDEX).read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
        assert set(index["weight_map"].values()) == set(shards)
        assert WEIGHTS not in files
    else:
        assert files == ["config.json", WEIGHTS]
    assert json.loads((out / "config.json").read_text())["_class_name"] == class_name

    loaded = load_transformer(out)
    assert loaded.config == TINY
    assert_weights(loaded, state_of(model))


def test_resave_into_the_loaded_directory(tmp_path, model):
    # The loaded tensors may be backed by the checkpoint file; overwriting it must not corrupt them.
    ckpt = save_transformer(model, tmp_path / "ckpt")
    loaded = load_transformer(ckpt)
    save_transformer(loaded, ckpt)
    assert_weights(loaded, state_of(model))
    assert_weights(load_transformer(ckpt), state_of(model))


# ---------------------------------------------------------------- 2. single .safetensors files
def test_infer_config_from_shapes(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert infer_config(shapes) == TINY


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_without_config(tmp_path, model, prefix):
    state = state_of(model)
    save_file({prefix + k: v for k, v in state.items()}, str(tmp_path / "framepack.safetensors"))
    loaded = load_transformer(tmp_path / "framepack.safetensors")
    assert loaded.config == TINY
    assert_weights(loaded, state)


def test_single_file_fp8_loads_as_bf16(tmp_path, model):
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state_of(model).items()}
    save_file(fp8, str(tmp_path / "framepack_fp8_e4m3fn.safetensors"))
    loaded = load_transformer(str(tmp_path / "framepack_fp8_e4m3fn.safetensors"))
    assert_weights(loaded, {k: v.to(torch.bfloat16) for k, v in fp8.items()})


def test_single_file_bf16_loads_as_requested_fp32(tmp_path, model):
    bf16 = {k: v.to(torch.bfloat16) for k, v in state_of(model).items()}
    save_file(bf16, str(tmp_path / "framepack_bf16.safetensors"))
    loaded = load_transformer(tmp_path / "framepack_bf16.safetensors", dtype=torch.float32)
    assert_weights(loaded, {k: v.float() for k, v in bf16.items()})


def test_single_file_fp8_with_fp32_norms_loads_as_one_dtype(tmp_path, model):
    # Community fp8 files keep biases and norm scales (the 1-d tensors) in a wider dtype.
    state = state_of(model)
    mixed = {k: v.to(torch.float8_e4m3fn) if v.ndim > 1 else v for k, v in state.items()}
    save_file(mixed, str(tmp_path / "framepack_fp8.safetensors"))
    loaded = load_transformer(tmp_path / "framepack_fp8.safetensors")
    assert_weights(loaded, {k: v.to(torch.bfloat16) for k, v in mixed.items()})


def test_single_file_config_from_metadata(tmp_path):
    # A config that the shapes cannot tell (rope_theta, a non-default RoPE split) rides in the metadata.
    config = TINY.replace(rope_theta=100.0, rope_axes_dim=(8, 12, 12))
    model = random_model(config)
    meta = {"config": json.dumps(config.to_diffusers_dict())}
    save_file(state_of(model), str(tmp_path / "framepack.safetensors"), metadata=meta)
    loaded = load_transformer(tmp_path / "framepack.safetensors")
    assert loaded.config == config
    assert_weights(loaded, state_of(model))


# ---------------------------------------------------------------- 3. hub repo ids, offline
@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under tmp_path, wired in the way `snapshot_download` reads it."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the env once at import; snapshot_download looks the constant up per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not also a relative path
    return cache


def cache_repo(cache: Path, repo_id: str, source: Path, subfolder: str = "") -> None:
    """Lay `source`'s files out as the hub cache does: blobs, a snapshot of symlinks and refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT / subfolder
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it


def test_hub_repo_from_cache(hub_cache, tmp_path, model):
    cache_repo(
        hub_cache, "lllyasviel/FramePackI2V_HY", save_transformer(model, tmp_path / "src", SHARD_BYTES)
    )
    loaded = load_transformer("lllyasviel/FramePackI2V_HY")
    assert loaded.config == TINY
    assert_weights(loaded, state_of(model))


def test_hub_repo_subfolder_from_cache(hub_cache, tmp_path, model):
    src = save_transformer(model, tmp_path / "src", SHARD_BYTES)
    cache_repo(hub_cache, "owner/pipeline", src, subfolder="transformer")
    assert_weights(load_transformer("owner/pipeline:transformer"), state_of(model))


def test_hub_repo_not_cached(hub_cache):
    with pytest.raises(CheckpointError) as error:
        load_transformer("owner/not-downloaded")
    assert_one_sentence(error, "owner/not-downloaded", "offline")


# ---------------------------------------------------------------- 4. bad checkpoints
def _sharded(tmp_path: Path) -> tuple[Path, list[Path]]:
    out = save_transformer(random_model(), tmp_path / "ckpt", SHARD_BYTES)
    return out, sorted(p for p in out.iterdir() if SHARD_RE.fullmatch(p.name))


def missing_shard(tmp_path):
    out, shards = _sharded(tmp_path)
    shards[1].unlink()
    return out, [shards[1].name, "missing"]


def truncated_shard(tmp_path):
    out, shards = _sharded(tmp_path)
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    return out, [shards[-1].name, "truncated"]


def truncated_file(tmp_path):
    save_file(state_of(random_model()), str(tmp_path / "framepack.safetensors"))
    data = (tmp_path / "framepack.safetensors").read_bytes()
    (tmp_path / "framepack.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "framepack.safetensors", ["framepack.safetensors", "truncated"]


def lfs_pointer(tmp_path):
    # What a `git clone` without git-lfs leaves in place of the weights.
    out = write_dir(tmp_path / "ckpt", state_of(random_model()))
    (out / WEIGHTS).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 5\n")
    return out, [WEIGHTS, "not a safetensors file"]


def wrong_shape(tmp_path):
    state = state_of(random_model())
    state["proj_out.weight"] = torch.zeros(8, 8)
    return write_dir(tmp_path / "ckpt", state), ["proj_out.weight", WEIGHTS, "shape"]


def extra_key(tmp_path):
    state = state_of(random_model())
    state["lora_unet.up.weight"] = torch.zeros(2)
    return write_dir(tmp_path / "ckpt", state), ["lora_unet.up.weight", WEIGHTS]


def missing_key(tmp_path):
    state = state_of(random_model())
    del state["single_transformer_blocks.0.proj_mlp.bias"]
    return write_dir(tmp_path / "ckpt", state), ["single_transformer_blocks.0.proj_mlp.bias"]


def repeated_key(tmp_path):
    # The same weight under two names that map to one model key.
    state = state_of(random_model())
    state["model.diffusion_model.proj_out.bias"] = state["proj_out.bias"].clone()
    return write_dir(tmp_path / "ckpt", state), ["proj_out.bias", WEIGHTS]


def integer_tensor(tmp_path):
    state = state_of(random_model())
    state["proj_out.bias"] = torch.zeros_like(state["proj_out.bias"], dtype=torch.int64)
    return write_dir(tmp_path / "ckpt", state), ["proj_out.bias", WEIGHTS, "I64"]


def empty_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    return tmp_path / "ckpt", [str(tmp_path / "ckpt"), "config.json"]


def config_without_weights(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(TINY.to_diffusers_dict()))
    return tmp_path / "ckpt", [str(tmp_path / "ckpt"), "safetensors"]


def other_class(tmp_path):
    out = save_transformer(random_model(), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"_class_name": "HunyuanVideoTransformer3DModel"}))
    return out, ["config.json", "HunyuanVideoTransformer3DModel"]


def invalid_json(tmp_path):
    out = save_transformer(random_model(), tmp_path / "ckpt")
    (out / "config.json").write_text('{"in_channels": 16,')
    return out, ["config.json", "JSON"]


def unknown_config_key(tmp_path):
    out = save_transformer(random_model(), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"num_experts": 8}))
    return out, ["config.json", "num_experts"]


def foreign_single_file(tmp_path):
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(tmp_path / "vae.safetensors"))
    return tmp_path / "vae.safetensors", ["x_embedder.proj.weight"]


def not_safetensors(tmp_path):
    (tmp_path / "framepack.gguf").write_bytes(b"GGUF" + bytes(60))
    return tmp_path / "framepack.gguf", ["framepack.gguf", ".safetensors"]


def does_not_exist(tmp_path):
    return tmp_path / "no" / "such" / "checkpoint", [str(tmp_path / "no" / "such" / "checkpoint"), "exist"]


BAD = [
    missing_shard,
    truncated_shard,
    truncated_file,
    lfs_pointer,
    wrong_shape,
    extra_key,
    missing_key,
    repeated_key,
    integer_tensor,
    empty_directory,
    config_without_weights,
    other_class,
    invalid_json,
    unknown_config_key,
    foreign_single_file,
    not_safetensors,
    does_not_exist,
]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_checkpoint(tmp_path, make):
    path, needles = make(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_transformer(path)
    assert_one_sentence(error, *needles)


def test_missing_relative_file_is_not_a_hub_id(tmp_path, monkeypatch):
    # A mistyped local file looks like "owner/name" but is no repo: say the file does not exist.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_transformer("weights/framepack.safetensors")
    assert_one_sentence(error, "weights/framepack.safetensors", "does not exist")


@pytest.mark.parametrize(
    "header",
    [b"[]", b'{"proj_out.bias": {"dtype": "F32", "shape": [64]}}', b'{"proj_out.bias": 3}'],
    ids=["list", "no-offsets", "not-an-entry"],
)
def test_corrupt_header(tmp_path, header):
    # A header that is valid JSON but not a safetensors header.
    path = tmp_path / "framepack.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(256))
    with pytest.raises(CheckpointError) as error:
        load_transformer(path)
    assert_one_sentence(error, "framepack.safetensors")


@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


@pytest.mark.parametrize("with_config", [False, True], ids=["bare", "with-config"])
@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "framepack.pt"])
def test_pickle_refused_in_directory(tmp_path, no_torch_load, name, with_config):
    out = tmp_path / "ckpt"
    out.mkdir()
    torch.save(state_of(random_model()), out / name)
    if with_config:
        (out / "config.json").write_text(json.dumps(TINY.to_diffusers_dict()))
    with pytest.raises(CheckpointError) as error:
        load_transformer(out)
    assert_one_sentence(error, name, "pickle", "safetensors")


def test_pickle_refused_as_file(tmp_path, no_torch_load):
    torch.save(state_of(random_model()), tmp_path / "framepack.bin")
    with pytest.raises(CheckpointError) as error:
        load_transformer(tmp_path / "framepack.bin")
    assert_one_sentence(error, "framepack.bin", "pickle", "safetensors")


# ---------------------------------------------------------------- 5. memory
MAKE_CHECKPOINT = """
import sys, torch
from framepack.model import PackedTransformer, get_spec, save_transformer
torch.manual_seed(0)
model = PackedTransformer(get_spec("medium"))
save_transformer(model, sys.argv[1])
save_transformer(model, sys.argv[2], max_shard_bytes=64 * 2**20)
"""

MEASURE_LOAD = """
import json, sys
import safetensors.torch, torch
from framepack.model import load_transformer
import psutil
def peak():  # this process's own high-water mark in KiB (ru_maxrss can carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
# The current size, not the peak: importing torch has a transient peak above what it keeps.
before = psutil.Process().memory_info().rss // 1024
model = load_transformer(sys.argv[1])
for p in model.parameters():  # weights may be mapped lazily: make every page resident
    p.sum()
print(json.dumps({"before": before, "after": peak()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc")
def test_loading_peak_memory(tmp_path):
    # A 230 MB fp32 checkpoint, as one file and as 64 MB shards; loading it must not hold two copies.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    dirs = [tmp_path / "single", tmp_path / "sharded"]
    subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, *map(str, dirs)], check=True, env=env, timeout=60)
    ratios = {}
    for directory in dirs:
        size = sum(f.stat().st_size for f in directory.iterdir())
        assert 150e6 < size < 250e6
        done = subprocess.run(
            [sys.executable, "-c", MEASURE_LOAD, str(directory)],
            check=True,
            env=env,
            timeout=60,
            capture_output=True,
            text=True,
        )
        rss = json.loads(done.stdout.splitlines()[-1])
        ratios[directory.name] = round((rss["after"] - rss["before"]) * 1024 / size, 2)
    print(f"peak RSS growth / checkpoint size: {ratios}")
    assert all(r < 1.5 for r in ratios.values()), f"loading needs this many checkpoints of RAM: {ratios}"


# ---------------------------------------------------------------- 6. the loaded model's state
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_loaded_model_state(tmp_path, model, dtype, device):
    ckpt = save_transformer(model, tmp_path / "ckpt", SHARD_BYTES)
    loaded = load_transformer(ckpt, dtype=dtype, device=device)
    assert isinstance(loaded, PackedTransformer)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(t.is_meta for t in tensors)
    assert {t.device for t in tensors} == {torch.device("cpu")}
    assert {p.dtype for p in loaded.parameters()} == {dtype or torch.float32}
    assert loaded.dtype == (dtype or torch.float32)
    assert_weights(loaded, {k: v.to(dtype or v.dtype) for k, v in state_of(model).items()})


def test_loaded_model_runs(tmp_path, model):
    # Every module was rebuilt off the meta device: a forward pass gives the original's output.
    ckpt = save_transformer(model, tmp_path / "ckpt")
    loaded = load_transformer(ckpt)
    model.eval()
    torch.manual_seed(1)
    c = TINY
    history = [
        HistoryGroup(torch.randn(1, c.in_channels, n, 8, 8), torch.arange(n), kernel)
        for n, kernel in [(4, "k4"), (2, "k2"), (1, "k1")]
    ]
    args = (
        torch.randn(1, c.in_channels, 2, 8, 8),  # noisy (B, C, T, H, W)
        torch.arange(7, 9),  # noisy_indices (T,)
        history,
        torch.tensor([500.0]),  # timestep (B,)
        torch.randn(1, 3, c.text_embed_dim),  # text (B, M, text_embed_dim)
        None,
        torch.randn(1, c.pooled_projection_dim),  # pooled (B, pooled_projection_dim)
        torch.tensor([10000.0]),  # guidance (B,)
        torch.randn(1, 5, c.image_proj_dim),  # image_embeds (B, 5, image_proj_dim)
    )
    with torch.no_grad():
        want = model.forward_packed(*args)
        got = loaded.forward_packed(*args)
    assert want.isfinite().all()
    assert torch.equal(got, want)
