"""Cost of a LoRA applied on the fly vs merged into the weights, on the packed transformer.

Medium config (inner dim 512, 2 dual + 6 single blocks), a rank-16 LoRA on every Linear layer of
the blocks (the raw-weight MLP layers included), 30x40 latents with window 9 and the released
packed history, batch 1, fp32, interleaved runs. Prints the median time of one forward pass for
the base model, the LoRA on the fly and the LoRA merged, and the max difference between the two
LoRA outputs.

    python bench/lora.py [--repeats 5] [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from framepack.lora import applied_loras, lora_targets, merge_loras, read_lora
from framepack.model import PackedTransformer, get_spec
from framepack.testing import random_packed_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    cfg = get_spec("medium")
    torch.manual_seed(0)
    model = PackedTransformer(cfg).eval()
    merged = PackedTransformer(cfg).eval()
    merged.load_state_dict(model.state_dict())
    tensors = {}
    for name, layer in lora_targets(model).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(args.rank, layer.in_features) * 0.02
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, args.rank) * 0.02
        tensors[f"{key}.alpha"] = torch.tensor(float(args.rank))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(tensors, str(path))
        lora = read_lora(path, model)
    merge_loras(merged, [(lora, 1.0)])
    a = random_packed_inputs(cfg, 30, 40, window=9, text_tokens=64)
    a["image_embeds"] = torch.randn(1, 729, cfg.image_proj_dim)

    def forward(m) -> torch.Tensor:
        with torch.no_grad():
            return m.forward_packed(
                a["noisy"], a["noisy_indices"], a["history"], a["timestep"], a["text"], a["text_mask"],
                a["pooled"], a["guidance"], a["image_embeds"],
            )  # fmt: skip

    times: dict[str, list[float]] = {"base": [], "on the fly": [], "merged": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for label in times:
            if label == "on the fly":
                with applied_loras(model, [(lora, 1.0)]):
                    t0 = time.perf_counter()
                    fly = forward(model)
                    times[label].append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                out = forward(merged if label == "merged" else model)
                times[label].append(time.perf_counter() - t0)
                if label == "merged":
                    merged_out = out
    base = statistics.median(times["base"][1:])
    print(f"medium config, rank {args.rank} on {len(lora.layers)} layers, {torch.get_num_threads()} threads")
    for label, ts in times.items():
        t = statistics.median(ts[1:])
        print(f"  {label:<11} {t * 1000:8.1f} ms  ({t / base:.3f}x base)")
    print(f"  max |on the fly - merged| = {(fly - merged_out).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
