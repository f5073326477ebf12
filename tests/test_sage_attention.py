"""8-bit attention (`--attention sage`, issue 20): SageAttention's arithmetic, emulated on the CPU
(`framepack.model.sage_numerics`), the backend choice per run, and the refusals where the kernel
cannot run. The package's own kernels need an NVIDIA GPU: `bench/gpu_check.py` compares them with
this emulation there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack.cli.main import main
from framepack.io import read_video
from framepack.model import attention as attn
from framepack.model.sage_numerics import quantize_blocks, sage_attention
from framepack.pipeline.bundle import component_dtypes, load_bundle
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings
from framepack.pipeline.speed import accelerate
from framepack.testing import tiny_bundle_dir

# The tiny bundle's two-section video in the release dtypes: sage-emulate against sdpa measured
# 34.7 dB; the floor leaves room for another CPU's rounding.
VIDEO_PSNR_FLOOR = 32.0


def _exact(q, k, v):
    """Attention in fp64, `(B, L, H, D)` in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2)


def _qkv(lq=300, lk=200, heads=2, dim=64, offset=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, lq, heads, dim, generator=g)
    k = torch.randn(1, lk, heads, dim, generator=g) + offset * torch.randn(1, 1, heads, dim, generator=g)
    v = torch.randn(1, lk, heads, dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_blocks_share_a_scale_of_amax_over_127_and_round_half_away_from_zero():
    # block 1: amax 127, scale 1; block 2: amax 63.5, scale 0.5; block 3: all zero (scale kept 1)
    rows = [127.0, 2.5, -2.5, 0.49, -63.5, 25.4, 0.25, -0.25, 0.0, 0.0]
    ints, scales = quantize_blocks(torch.tensor(rows).view(1, 1, -1, 1), 4)
    assert ints.flatten().tolist() == [127, 3, -3, 0, -127, 51, 1, -1, 0, 0]
    assert scales.flatten().tolist() == [1.0] * 4 + [0.5] * 4 + [1.0] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_attention_is_within_8_bit_error_of_the_exact_one(dtype):
    # lengths that are not multiples of the 128-query and 64-key blocks
    q, k, v = _qkv(dtype=dtype)
    out = sage_attention(q, k, v)
    exact = _exact(q, k, v)
    error = ((out.double() - exact).norm() / exact.norm()).item()
    assert out.dtype == dtype and out.shape == q.shape
    assert 1e-3 < error < 0.03, error  # quantised (not the exact product), and close


def test_smoothing_makes_a_shared_key_offset_harmless():
    """Softmax ignores an offset every key shares; the smoothed keys drop it before quantising, so a
    large offset changes the 8-bit result by rounding only (unsmoothed, it would take the range)."""
    q, k, v = _qkv(offset=0.0)
    shift = 40 * torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(9))
    plain, shifted = sage_attention(q, k, v), sage_attention(q, k + shift, v)
    assert ((plain - shifted).norm() / plain.norm()).item() < 1e-3

    def rounding(keys):  # int8 rounding error, against the size of what tells the keys apart
        ints, scales = quantize_blocks(keys.transpose(1, 2), 64)
        return ((ints * scales - keys.transpose(1, 2)).norm() / k.norm()).item()

    assert rounding(k + shift) > 5 * rounding(k)  # what smoothing saves


def test_the_backend_is_chosen_for_a_block_and_a_key_mask_falls_back_to_sdpa():
    q, k, v = _qkv(lq=40, lk=40)
    before = attn.get_backend()
    with attn.using_backend("sage-emulate"):
        emulated = attn.attention(q, k, v)
        mask = torch.ones(1, 40, dtype=torch.bool)
        mask[:, 30:] = False
        masked = attn.attention(q, k, v, mask)
    assert attn.get_backend() == before
    assert torch.equal(emulated, sage_attention(q, k, v).reshape(1, 40, -1))
    with attn.using_backend("sdpa"):
        assert torch.equal(masked, attn.attention(q, k, v, mask))


def test_unknown_missing_or_cpu_kernels_are_one_sentence():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attn.check_backend("fast")
    for name in ("sage", "flash", "xformers"):  # the package missing, or here, the GPU
        with pytest.raises(ValueError, match=f"attention '{name}' (needs the package|runs on an NVIDIA GPU)"):
            attn.check_backend(name, "cpu")
    attn.check_backend("sage-emulate", "cpu")
    attn.check_backend("sdpa", "cpu")


def _frames(path) -> np.ndarray:
    video = read_video(path)
    return np.asarray(video[0] if isinstance(video, tuple) else video).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))


def test_a_run_in_the_release_dtypes_uses_8_bit_attention_and_gives_the_backend_back(
    image, tmp_path, monkeypatch
):
    bundle = load_bundle(tiny_bundle_dir(), dtypes=component_dtypes("cuda"))
    calls = []
    original = attn.sage_attention
    monkeypatch.setattr(attn, "sage_attention", lambda q, k, v: calls.append(q.dtype) or original(q, k, v))

    def run(name, **kw):
        settings = GenerationSettings(prompt="a square", sections=2, steps=2, seed=3, name=name, **kw)
        return open_run(bundle, Request(settings, image=image)).run(tmp_path)

    plain = run("plain")
    assert not calls and plain.info["attention"] == "sdpa"
    sage = run("sage", attention="sage-emulate")
    assert calls and set(calls) == {torch.bfloat16} and sage.info["attention"] == "sage-emulate"
    value = _psnr(_frames(sage.video), _frames(plain.video))
    print(f"sage-emulate against sdpa, release dtypes: {value:.1f} dB")
    assert VIDEO_PSNR_FLOOR <= value < 80  # close, and not silently the plain run
    assert attn.get_backend() == "sage-emulate"  # while the run stays attached
    calls.clear()
    again = run("again")  # the next run detaches the last one: sdpa again, the same video
    assert not calls and attn.get_backend() == "sdpa"
    assert np.array_equal(_frames(again.video), _frames(plain.video))


def test_cli_refuses_a_gpu_kernel_on_a_cpu_before_writing_anything(image, tmp_path, capsys, monkeypatch):
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "start.png")
    monkeypatch.chdir(tmp_path)
    model = str(tiny_bundle_dir())
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["generate", "--model", model, "--image", "start.png", "--prompt", "a cat",
            "--device", "cpu", "--attention", "sage", "--out", "out", "--events", "events.jsonl"]  # fmt: skip
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("framepack: attention 'sage' ") and lines[0].endswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    code = main(["serve", "--model", model, "--device", "cpu", "--attention", "flash",
                 "--outputs", str(tmp_path / "gui")])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "attention 'flash'" in lines[0], lines
    assert not (tmp_path / "gui").exists()


def test_api_and_accelerate_refuse_what_the_device_or_the_model_cannot_take():
    import framepack
    from framepack.model import SPECS, PackedTransformer

    with pytest.raises(ValueError, match="attention 'sage'"):
        framepack.generate(model=str(tiny_bundle_dir()), prompt="a cat", device="cpu", attention="sage")
    with pytest.raises(ValueError, match="unknown attention backend 'int4'"):
        framepack.generate(model=str(tiny_bundle_dir()), prompt="a cat", device="cpu", attention="int4")
    model = PackedTransformer(SPECS["tiny"])
    with pytest.raises(ValueError, match="attention 'sage'"):
        accelerate(model, "cpu", attention="sage")
    assert attn.get_backend() == "sdpa"


def test_the_gui_queue_runs_every_job_with_the_servers_attention(bundle, image, tmp_path):
    import json

    from framepack.gui.jobs import DONE, JobQueue
    from framepack.gui.settings_tab import server_html

    queue = JobQueue(bundle, tmp_path / "out", attention="sage-emulate")
    try:
        job = queue.wait(queue.submit(GenerationSettings(prompt="a cat", sections=1, steps=2), image).id, 120)
        assert job.state == DONE, job.error
        sidecar = json.loads(job.sidecar.read_text())
        assert sidecar["settings"]["attention"] == "sage-emulate", sidecar
        assert "--attention sage-emulate" in server_html(queue, tmp_path / "out", None)
    finally:
        queue.close()


def test_compiled_blocks_call_the_8_bit_attention_and_compile_once(image, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    bundle = load_bundle(tiny_bundle_dir(), dtypes=component_dtypes("cuda"))

    def run(name, prompt, **kw):
        settings = GenerationSettings(
            prompt=prompt, sections=3, steps=2, seed=3, name=name, attention="sage-emulate", **kw
        )
        return open_run(bundle, Request(settings, image=image)).run(tmp_path)

    eager = run("eager", "a square")
    first = run("compiled", "a square", compile=True)
    graphs = counters["stats"]["unique_graphs"]
    second = run("again", "a much longer prompt about a square", compile=True)  # other token counts
    assert counters["stats"]["unique_graphs"] == graphs and first.info["compile"]["graphs_compiled"] > 0
    assert second.info["compile"]["graphs_compiled"] == 0 and second.info["attention"] == "sage-emulate"
    value = _psnr(_frames(first.video), _frames(eager.video))
    print(f"compiled against eager, sage-emulate in the release dtypes: {value:.1f} dB")
    assert value >= 30
    torch._dynamo.reset()
