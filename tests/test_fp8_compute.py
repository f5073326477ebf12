"""`--fp8-compute` (issue 20): the blocks' linear layers as e4m3 products (`framepack.model.fp8`).

On this CPU the products run emulated (asked for explicitly: `fp8_compute="emulate"`), and torch's
own CPU `_scaled_mm` is checked against the emulation. Quantisation worked by hand; an emulated
layer against the full-precision one; a tiny video against the plain one; streamed blocks travel
and multiply as fp8 (half the bytes, no upcast); LoRAs on the fly and torch.compile around it;
and on a CPU the CLI refuses `--fp8-compute` in one sentence before writing anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack.cli.main import main
from framepack.io import read_video
from framepack.lora import applied_loras, read_lora
from framepack.memory import GIB
from framepack.memory.hooks import release
from framepack.memory.streaming import blocks_of, plan_memory
from framepack.model import SPECS, PackedTransformer
from framepack.model.fp8 import FP8, Fp8Matmul, quantize_tokens, quantize_weight, scaled_matmul
from framepack.model.layers import Linear
from framepack.pipeline.bundle import load_bundle
from framepack.pipeline.fp8_compute import Fp8Compute
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.pipeline.speed import accelerate
from framepack.testing import random_packed_inputs, tight_budget, tiny_bundle_dir

VIDEO_PSNR_FLOOR = 28.0  # dB, emulated e4m3 against fp32 on the tiny random bundle (measured 35.3)


def test_weight_rows_are_scaled_by_a_power_of_two_and_rounded_to_e4m3():
    # amax 3 -> 3/448 = 2^-7.2 -> scale 2^-7: the row becomes [128, -64, 384, 12.8]; 12.8 lies
    # between the e4m3 neighbours 12 and 13 (step 1 in [8, 16)) and rounds to 13.
    q, scale = quantize_weight(torch.tensor([[1.0, -0.5, 3.0, 0.1], [0.0, 0.0, 0.0, 0.0]]))
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (2, 1)
    assert scale[0, 0].item() == 2.0**-7
    assert q[0].float().tolist() == [128.0, -64.0, 384.0, 13.0]
    assert q[1].float().abs().sum().item() == 0.0  # a row of zeros stays zeros (finite scale)


def test_tokens_are_scaled_to_448_and_rounded_to_e4m3():
    # amax 4 -> scale 4/448 = 1/112: [224, -112, 56, 448, 33.6]; 33.6 lies between 32 and 36
    # (step 4 in [32, 64)) and rounds to 32.
    q, scale = quantize_tokens(torch.tensor([[2.0, -1.0, 0.5, 4.0, 0.3]]))
    assert scale.item() == pytest.approx(4 / 448)
    assert q.float().tolist() == [[224.0, -112.0, 56.0, 448.0, 32.0]]


def _operands(seed=0, m=64, k=256, n=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    b = torch.randn(n, generator=g) * 0.1
    return x, w, b


def test_emulated_product_is_within_e4m3_error_of_the_exact_one():
    x, w, b = _operands()
    exact = x @ w.T + b
    xq, xs = quantize_tokens(x)
    wq, ws = quantize_weight(w)
    y = scaled_matmul(xq, xs, wq, ws, b, emulate=True)
    assert y.dtype == torch.bfloat16
    rel = ((y.float() - exact).norm() / exact.norm()).item()
    print(f"emulated e4m3 product: relative error {rel:.4f}")
    assert 0.005 < rel < 0.06  # e4m3 has 3 mantissa bits: a few percent, far above bf16's 0.3%
    # the dequantised operands multiplied exactly give the same, but for the bf16 rounding
    dequant = (xq.float() * xs) @ (wq.float() * ws).T + b
    torch.testing.assert_close(y.float(), dequant, rtol=2**-8, atol=1e-6)


def test_torch_cpu_scaled_mm_equals_the_emulation():
    """torch 2.13's CPU `_scaled_mm` takes e4m3 with row-wise scales: it agrees to bf16 rounding."""
    x, w, b = _operands(seed=1)
    xq, xs = quantize_tokens(x)
    wq, ws = quantize_weight(w)
    emulated = scaled_matmul(xq, xs, wq, ws, b, emulate=True).float()
    try:
        native = scaled_matmul(xq, xs, wq, ws, b, emulate=False).float()
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU _scaled_mm for row-wise e4m3: {e}")
    torch.testing.assert_close(native, emulated, rtol=2**-7, atol=2**-7 * emulated.abs().max().item())


def test_layer_slot_uses_the_quantised_weight_and_its_column_halves():
    x, w, b = _operands(seed=2)
    layer = Linear(256, 128)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    plain = layer(x)
    slot = Fp8Matmul(emulate=True)
    q, scale = quantize_weight(w)
    layer.add_module("fp8", slot)
    layer.weight.data = q
    slot.set_scale(scale)
    y = layer(x)
    assert y.dtype == x.dtype and ((y - plain).norm() / plain.norm()).item() < 0.06
    # a column half (the single block's proj_out) keeps its rows' scales; its tokens get their own
    right = slot(x[:, 96:], layer.weight, b, slice(96, None))
    xq, xs = quantize_tokens(x[:, 96:])
    assert torch.equal(right, scaled_matmul(xq, xs, q[:, 96:], scale, b, emulate=True).float())
    left = slot(x[:, :96], layer.weight, None, slice(0, 96))
    assert ((left + right - plain).norm() / plain.norm()).item() < 0.06


def _frames(path) -> np.ndarray:
    video = read_video(path)
    return np.asarray(video[0] if isinstance(video, tuple) else video).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))


def _run(bundle, image, out, sections=2, **kw):
    settings = GenerationSettings(prompt="a square", sections=sections, steps=2, seed=3, name="v", **kw)
    return open_run(bundle, Request(settings, image=image)).run(out)


def test_tiny_video_with_emulated_fp8_is_close_to_the_plain_one(image, tmp_path):
    bundle = load_bundle(tiny_bundle_dir())
    plain = _run(bundle, image, tmp_path / "plain")
    fp8 = _run(bundle, image, tmp_path / "fp8", fp8_compute="emulate")
    value = _psnr(_frames(fp8.video), _frames(plain.video))
    print(f"emulated fp8 compute against fp32: {value:.1f} dB")
    assert VIDEO_PSNR_FLOOR <= value < 80  # close, and not silently the plain run
    assert fp8.info["fp8_compute"]["fp8_layers"] > 0 and "fp8_compute" not in plain.info
    release(bundle.transformer)  # what the next run does first: the model's weights are its own again
    assert all(p.dtype == torch.float32 for p in bundle.transformer.parameters())
    assert not any(name.endswith(".fp8") for name, _ in bundle.transformer.named_modules())


def test_streamed_blocks_travel_and_multiply_as_fp8(image, tmp_path):
    bundle = load_bundle(tiny_bundle_dir())
    plain = prepare(bundle, GenerationSettings(prompt="a square", sections=2, steps=2), image)
    budget = tight_budget(bundle, plain, fp8=True) / GIB
    resident = _run(bundle, image, tmp_path / "resident", 1, fp8_compute="emulate")
    seen: list[torch.dtype] = []
    model = bundle.transformer
    to_q = blocks_of(model)[-1].attn.to_q  # called inside the block, while it is streamed in
    hook = to_q.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    try:
        streamed = _run(bundle, image, tmp_path / "streamed", 1, fp8_compute="emulate", vram_budget=budget)
    finally:
        hook.remove()
    assert "streamed" in streamed.info["memory_plan"] and streamed.info["fp8_compute"]["fp8_streamed"] > 0
    assert seen and set(seen) == {FP8}  # installed as it came: no upcast
    # the same row rule for resident and streamed products; only the modulations differ (streamed as
    # fp8 copies and upcast, as --fp8-weights does; resident in full precision)
    value = _psnr(_frames(streamed.video), _frames(resident.video))
    print(f"streamed against resident fp8 compute: {value:.1f} dB")
    assert value >= VIDEO_PSNR_FLOOR  # measured 35.0 dB: as far apart as e4m3 products and fp32
    # half the bytes: the same transfer as --fp8-weights, about half the full-precision one
    release(model)
    smallest = (plan_memory(model, None, fp8=True).least_bytes + 1024) / GIB  # every block streamed
    transfers = {}
    for name, fp8, compute in (("bf16", False, False), ("fp8", True, False), ("compute", False, "emulate")):
        run = accelerate(model, "cpu", smallest, fp8=fp8, fp8_compute=compute, reserve=0)
        assert not any(run.streamer.plan.resident)
        with torch.no_grad():
            model.forward_packed(**random_packed_inputs(model.config, 4, 4, window=2, text_tokens=4, seed=1))
        transfers[name] = run.streamer.transfers
        run.detach()
    print(f"bytes copied per forward: {transfers}")
    assert transfers["compute"] == transfers["fp8"] < 0.6 * transfers["bf16"]


def _tiny(seed=0) -> PackedTransformer:
    torch.manual_seed(seed)
    return PackedTransformer(SPECS["tiny"]).eval()


def _velocity(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_packed(**inputs)


def test_lora_on_the_fly_is_applied_beside_the_fp8_products(tmp_path):
    from test_lora_inference import LAYERS, factors, write

    model = _tiny()
    inputs = random_packed_inputs(SPECS["tiny"], 4, 4, window=2, text_tokens=4, seed=1)
    lora = read_lora(write("kohya", tmp_path / "a.safetensors", factors(model, seed=1)), model)
    with applied_loras(model, [(lora, 1.0)]):
        exact = _velocity(model, inputs)
        fp8 = Fp8Compute(model, emulate=True).attach()
        with_lora = _velocity(model, inputs)
        fp8.detach()
    fp8 = Fp8Compute(model, emulate=True).attach()
    without = _velocity(model, inputs)
    fp8.detach()
    err = ((with_lora - exact).norm() / exact.norm()).item()
    moved = ((without - exact).norm() / exact.norm()).item()
    print(f"fp8 + LoRA against fp32 + LoRA: {err:.4f}; fp8 without the LoRA: {moved:.4f}")
    assert err < 0.1 and moved > 3 * err and len(LAYERS) > 0


def test_compiled_blocks_run_the_fp8_products():
    model = _tiny(seed=1)
    inputs = random_packed_inputs(SPECS["tiny"], 4, 4, window=2, text_tokens=4, seed=2)
    eager_run = accelerate(model, "cpu", fp8_compute="emulate")
    eager = _velocity(model, inputs)
    eager_run.detach()
    compiled_run = accelerate(model, "cpu", fp8_compute="emulate", compile=True)
    try:
        compiled = _velocity(model, inputs)
        assert compiled_run.info()["compile"]["graphs_compiled"] >= 1
    finally:
        compiled_run.detach()
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02)  # bf16 rounding inside


def test_cli_refuses_fp8_compute_on_a_cpu_before_writing_anything(image, tmp_path, capsys, monkeypatch):
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "start.png")
    monkeypatch.chdir(tmp_path)
    model = str(tiny_bundle_dir())  # written once per process: its progress bars are not the CLI's
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["generate", "--model", model, "--image", "start.png", "--prompt", "a cat",
            "--device", "cpu", "--fp8-compute", "--out", "out", "--events", "events.jsonl"]  # fmt: skip
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("framepack: fp8 compute needs an NVIDIA GPU of compute capability 8.9")
    assert "this run's device is cpu" in lines[0] and lines[0].count(". ") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_api_and_accelerate_refuse_fp8_compute_on_a_cpu():
    import framepack

    with pytest.raises(ValueError, match="compute capability 8.9"):
        framepack.generate(model=str(tiny_bundle_dir()), prompt="a cat", device="cpu", fp8_compute=True)
    with pytest.raises(ValueError, match="compute capability 8.9"):
        accelerate(_tiny(), "cpu", fp8_compute=True)


def test_a_bad_fp8_compute_value_is_the_same_sentence_from_the_settings_and_the_run(image):
    from framepack.pipeline.named import read_manifest
    from framepack.pipeline.settings import check_settings

    manifest = read_manifest(tiny_bundle_dir())
    message = r"^fp8_compute must be true, false or 'emulate', got 'yes'\.$"
    with pytest.raises(ValueError, match=message):
        check_settings(manifest, GenerationSettings(prompt="a cat", fp8_compute="yes"), image)
    with pytest.raises(ValueError, match=message):
        accelerate(_tiny(), "cpu", fp8_compute="yes")
    check_settings(
        manifest, GenerationSettings(prompt="a cat", fp8_compute=True), image
    )  # the device: at the run


def test_serve_refuses_fp8_compute_on_a_cpu_before_loading(tmp_path, capsys):
    model = str(tiny_bundle_dir())
    capsys.readouterr()
    code = main(["serve", "--model", model, "--device", "cpu", "--fp8-compute",
                 "--outputs", str(tmp_path / "out")])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "compute capability 8.9" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_budget_counts_the_e4m3_weights_resident_blocks_hold_beside_their_own():
    """A resident block holds its e4m3 weights beside its own while fp8 compute is attached: the
    plan counts them (a budget that holds the plain model streams some blocks with fp8 compute),
    and the ledger of device bytes, which now includes them, stays within the budget."""
    spec = SPECS["tiny"].replace(num_layers=2, num_single_layers=4)
    torch.manual_seed(3)
    model = PackedTransformer(spec).eval()
    inputs = random_packed_inputs(spec, 4, 4, window=2, text_tokens=4, seed=2)
    full = plan_memory(model, None)
    weights = full.base_bytes + sum(full.block_bytes)  # the whole plain model, to the byte
    assert not plan_memory(model, weights).streamed
    plan = plan_memory(model, weights, fp8_compute=True)
    assert plan.streamed and any(plan.resident) and plan.peak_bytes <= weights
    run = accelerate(model, "cpu", vram_budget=(weights + 1) / GIB, fp8_compute="emulate", reserve=1)
    try:
        assert run.streamer is not None and run.streamer.plan.fp8_resident
        _velocity(model, inputs)
        assert run.fp8.added > 0 and run.weights.ledger.peak <= weights
    finally:
        run.detach()
    assert run.weights.ledger.current == 0
