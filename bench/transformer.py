"""Ours vs diffusers' FramePack transformer: same weights, same inputs, interleaved runs.

Medium config (inner dim 512, 2 dual + 6 single blocks), 30x40 latents, window 9 plus the
released packed history (k1: start + 1, k2: 2, k4: 16), 64 text tokens + 729 SigLIP tokens,
batch 1. Prints the median time of each, their ratio and the max output difference, for fp32 and
bf16, and with `--record` appends a row per dtype to bench/RESULTS.md.

    python bench/transformer.py [--repeats 5] [--dtypes fp32 bf16] [--record]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from framepack.model import get_spec, load_transformer


def build_pair(dtype: torch.dtype):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    cfg = get_spec("medium")
    torch.manual_seed(0)
    ref = HunyuanVideoFramepackTransformer3DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        num_refiner_layers=cfg.num_refiner_layers,
        text_embed_dim=cfg.text_embed_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        rope_axes_dim=cfg.rope_axes_dim,
        has_image_proj=True,
        image_proj_dim=cfg.image_proj_dim,
        has_clean_x_embedder=True,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_transformer(tmp)
    return ref.to(dtype).eval(), ours.to(dtype).eval(), cfg


def make_inputs(cfg, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = 30, 40

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(
        hidden_states=rnd(1, 16, 9, h, w),
        timestep=torch.tensor([900.0]),
        encoder_hidden_states=rnd(1, 64, cfg.text_embed_dim),
        encoder_attention_mask=torch.ones(1, 64, dtype=torch.long),
        pooled_projections=rnd(1, cfg.pooled_projection_dim),
        guidance=torch.tensor([10000.0]),
        image_embeds=rnd(1, 729, cfg.image_proj_dim),
        indices_latents=torch.arange(1, 10),
        latents_clean=rnd(1, 16, 2, h, w),
        indices_latents_clean=torch.tensor([0, 10]),
        latents_history_2x=rnd(1, 16, 2, h, w),
        indices_latents_history_2x=torch.tensor([11, 12]),
        latents_history_4x=rnd(1, 16, 16, h, w),
        indices_latents_history_4x=torch.arange(13, 29),
    )


def ours_kwargs(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(
        hidden_states=d["hidden_states"],
        timestep=d["timestep"],
        encoder_hidden_states=d["encoder_hidden_states"],
        encoder_attention_mask=d["encoder_attention_mask"],
        pooled_projections=d["pooled_projections"],
        guidance=d["guidance"],
        latent_indices=d["indices_latents"],
        clean_latents=d["latents_clean"],
        clean_latent_indices=d["indices_latents_clean"],
        clean_latents_2x=d["latents_history_2x"],
        clean_latent_2x_indices=d["indices_latents_history_2x"],
        clean_latents_4x=d["latents_history_4x"],
        clean_latent_4x_indices=d["indices_latents_history_4x"],
        image_embeddings=d["image_embeds"],
    )


def run(dtype_name: str, repeats: int) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ref, ours, cfg = build_pair(dtype)
    inputs = make_inputs(cfg, dtype)
    ref_call = lambda: ref(**inputs).sample  # noqa: E731
    ours_call = lambda: ours(**ours_kwargs(inputs))  # noqa: E731
    times = {"diffusers": [], "ours": []}
    with torch.no_grad():
        out_ref, out_ours = ref_call(), ours_call()  # warm-up, and the outputs compared
        for i in range(repeats):  # interleaved, alternating who goes first
            order = [("diffusers", ref_call), ("ours", ours_call)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    t_ref, t_ours = statistics.median(times["diffusers"]), statistics.median(times["ours"])
    diff = (out_ours.float() - out_ref.float()).abs().max().item()
    scale = out_ref.float().abs().max().item()
    row = dict(dtype=dtype_name, diffusers=t_ref, ours=t_ours, ratio=t_ours / t_ref, diff=diff, scale=scale)
    if dtype != torch.float32:  # how far each low-precision output is from the fp32 one
        with torch.no_grad():
            exact = ref.float()(**make_inputs(cfg, torch.float32)).sample
        row["err_diffusers"] = (out_ref.float() - exact).abs().max().item()
        row["err_ours"] = (out_ours.float() - exact).abs().max().item()
    return row


def errors(r: dict) -> str:
    if "err_ours" not in r:
        return ""
    return f" (vs fp32: diffusers {r['err_diffusers']:.1e}, ours {r['err_ours']:.1e})"


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for name in args.dtypes:
        r = run(name, args.repeats)
        rows.append(r)
        print(
            f"{r['dtype']}: diffusers {r['diffusers']:.3f} s, ours {r['ours']:.3f} s, "
            f"ratio ours/diffusers {r['ratio']:.3f} ({1 / r['ratio']:.2f}x faster), "
            f"max |diff| {r['diff']:.2e} (output max {r['scale']:.2f})"
        )
        if "err_ours" in r:
            print(
                f"  max |error| vs the fp32 output: diffusers {r['err_diffusers']:.2e}, ours {r['err_ours']:.2e}"
            )
    if args.record:
        path = Path(__file__).with_name("RESULTS.md")
        cpu = platform.processor() or platform.machine()
        with path.open("a") as f:
            for r in rows:
                f.write(
                    f"| transformer {r['dtype']} | {time.strftime('%Y-%m-%d')} | {cpu}, {torch.get_num_threads()} threads, "
                    f"torch {torch.__version__} | diffusers {r['diffusers']:.3f} s | ours {r['ours']:.3f} s | "
                    f"**{r['ratio']:.3f}x** time | max diff {r['diff']:.1e}{errors(r)} | `python bench/transformer.py --record` |\n"
                )


if __name__ == "__main__":
    main()
