"""The 13B model under a RAM budget on this machine: peak RSS, wall time and bytes read (issue 19).

    python bench/ram.py                      # build the bundle once, then --ram-budget 12 and below
    python bench/ram.py --budgets 12 8 --record

Builds once (cached in --cache, about 43 GB) a real-size bundle with random weights in the
released layout: the 13B packed transformer in bf16 shards, a LLaMA-3-8B-shaped text encoder, a
CLIP-L text encoder and a SigLIP so400m image encoder in fp16, the HunyuanVideo VAE in fp16, the
demo model's small tokenizers. Then runs `framepack generate` on it at 64x64, one section, one step,
in the release's dtypes (`--dtype release`), under each `--ram-budget` in turn until one is refused,
sampling the RSS of the process (children included) every 50 ms. Reports peak RSS, wall time,
bytes the process read from files (`rchar`) and from the block device (`read_bytes`), and the plan
line the run printed. Not a test: minutes per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "framepack" / "demo_model"
sys.path.insert(0, str(ROOT))
SHARD = 2 * 1024**3  # bytes per safetensors shard


def _write_random(module: torch.nn.Module, directory: Path, dtype: torch.dtype, stem: str, seed: int) -> None:
    """Random weights (std 0.02; 1-d weights 1) for every parameter of a meta-built `module`, in
    shards of about `SHARD` bytes written as they fill (one shard in memory at a time), with their
    index, as `save_pretrained` lays them out."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    total = 0

    def flush() -> None:
        part = directory / f"part-{len(written):05d}.tmp"
        save_file(current, str(part), metadata={"format": "pt"})
        written.append((part, list(current)))
        print(
            f"  {directory.name}: shard {len(written)}, {sum(t.numel() for t in current.values()) / 1e9:.2f} B weights",
            flush=True,
        )
        current.clear()

    size = 0
    for name, p in module.named_parameters():
        if p.dim() == 1 and name.endswith("weight"):
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD:
            flush()
            size = 0
        current[name], size, total = t, size + nbytes, total + nbytes
    if current:
        flush()
    weight_map = {}
    for i, (part, names) in enumerate(written, 1):
        file = f"{stem}-{i:05d}-of-{len(written):05d}.safetensors"
        part.rename(directory / file)
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def build_bundle(path: Path) -> Path:
    """The real-size random bundle at `path` (written once; `done` marks it complete)."""
    if (path / "done").exists():
        return path
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from framepack.io.weights import empty_parameters
    from framepack.model import PackedTransformer, get_spec

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(DEMO / name, path / name)
    (path / "feature_extractor").mkdir()
    processor = json.loads((DEMO / "feature_extractor" / "preprocessor_config.json").read_text())
    processor["size"] = {"height": 384, "width": 384}
    (path / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))

    start = time.perf_counter()
    llama_cfg = LlamaConfig(
        vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    )  # fmt: skip
    clip_cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    )  # fmt: skip
    siglip_cfg = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14,
    )  # fmt: skip
    parts = [
        ("text_encoder", LlamaModel, llama_cfg, torch.float16),
        ("text_encoder_2", CLIPTextModel, clip_cfg, torch.float16),
        ("image_encoder", SiglipVisionModel, siglip_cfg, torch.float16),
    ]
    for seed, (name, cls, cfg, dtype) in enumerate(parts):
        with empty_parameters():
            model = cls(cfg)
        model.config.torch_dtype = dtype
        model.config.save_pretrained(path / name)
        _write_random(model, path / name, dtype, "model", seed)
    with empty_parameters():
        vae = AutoencoderKLHunyuanVideo()  # diffusers' defaults are the release's VAE
    vae.save_config(path / "vae")
    _write_random(vae, path / "vae", torch.float16, "diffusion_pytorch_model", 10)
    with torch.device("meta"):
        transformer = PackedTransformer(get_spec("hunyuan-13b"))
    (path / "transformer").mkdir()
    (path / "transformer" / "config.json").write_text(
        json.dumps(transformer.config.to_diffusers_dict("HunyuanVideoFramepackTransformer3DModel"), indent=2)
    )
    _write_random(transformer, path / "transformer", torch.bfloat16, "diffusion_pytorch_model", 11)
    manifest = json.loads((DEMO / "framepack.json").read_text())
    manifest |= {
        "name": "random-13b",
        "vae_scaling_factor": 0.476986,
        "resolution": 64,
        "vae_temporal_tiles": True,
    }
    (path / "framepack.json").write_text(json.dumps(manifest, indent=2))
    (path / "done").write_text(f"built in {time.perf_counter() - start:.0f} s\n")
    return path


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_once(bundle: Path, budget: str, out: Path, steps: int) -> dict:
    """One `framepack generate` under `--ram-budget budget`: its peak RSS, wall time and reads."""
    image = DEMO / "examples" / "red_circle_moves_right.png"
    cmd = [
        sys.executable, "-m", "framepack", "generate", "--model", str(bundle), "--image", str(image),
        "--prompt", "a red circle moves right", "--sections", "1", "--steps", str(steps),
        "--dtype", "release", "--device", "cpu", "--ram-budget", budget, "--out", str(out),
        "--name", f"ram-{budget}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak, io = [0], [None]

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], _tree_rss(ps))
                io[0] = ps.io_counters()
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - start
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("framepack")]
    return {
        "budget": budget,
        "rc": proc.returncode,
        "peak_rss": peak[0],
        "wall": wall,
        "rchar": io[0].read_chars if io[0] else 0,
        "read_bytes": io[0].read_bytes if io[0] else 0,
        "plan": lines[0] if lines else "",
        "error": lines[-1] if proc.returncode else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "framepack" / "bench-13b")
    parser.add_argument("--budgets", nargs="+", default=["12", "10", "8", "6", "4", "2"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/framepack-bench-ram"))
    parser.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    args = parser.parse_args()
    free = shutil.disk_usage(args.cache.parent if args.cache.parent.exists() else Path.home()).free
    if not (args.cache / "done").exists() and free < 50 * 1024**3:
        print(f"bench/ram.py: the bundle needs about 43 GB of disk; {free / 1024**3:.0f} GB are free.")
        return 2
    t0 = time.perf_counter()
    bundle = build_bundle(args.cache)
    size = sum(f.stat().st_size for f in bundle.rglob("*.safetensors"))
    print(
        f"bundle {bundle}: {size / 1024**3:.1f} GiB of weights ({time.perf_counter() - t0:.0f} s to build or find)"
    )
    rows = []
    for budget in args.budgets:
        r = run_once(bundle, budget, args.out, args.steps)
        gib = lambda n: f"{n / 1024**3:.2f} GiB"  # noqa: E731
        print(
            f"--ram-budget {budget}: rc {r['rc']}, peak RSS {gib(r['peak_rss'])}, {r['wall']:.0f} s, "
            f"read {gib(r['rchar'])} from files ({gib(r['read_bytes'])} from the disk)\n  {r['plan'] or r['error']}",
            flush=True,
        )
        rows.append(r)
        if r["rc"]:
            break
    if args.record:
        _record(rows, size, args.steps)
    return 0


def _record(rows: list[dict], size: int, steps: int) -> None:
    day = time.strftime("%Y-%m-%d")
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        for r in rows:
            result = (
                f"peak RSS {r['peak_rss'] / 1024**3:.2f} GiB, {r['wall']:.0f} s, read {r['rchar'] / 1024**3:.1f} GiB "
                f"from files ({r['read_bytes'] / 1024**3:.1f} GiB from the disk)"
                if not r["rc"]
                else f"refused: {r['error'].removeprefix('framepack: ')}"
            )
            f.write(
                f"| {day} | random 13B bundle ({size / 1024**3:.1f} GiB), 64x64, 1 section, {steps} step, "
                f"release dtypes, CPU | --ram-budget {r['budget']} | {result} | `python bench/ram.py --budgets {r['budget']}` |\n"
            )


if __name__ == "__main__":
    sys.exit(main())
