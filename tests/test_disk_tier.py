"""The disk tier (issue 19): weights that stay in their safetensors files until a run reads them.

Under a RAM budget a bundle loads as placeholders (nothing read), the transformer's streamed blocks
are read from their files at every model call, and the encoders and the VAE visit from their
files; every video is bit-identical to the run that holds everything in memory, in the release's
GPU dtypes (bf16 transformer, fp16 encoders and VAE) and in fp32, and the ledger of weight bytes
in memory never passes the budget.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from framepack.io import read_video
from framepack.io.weights import DiskSource, disk_source, on_disk
from framepack.memory import ByteLedger, WeightStreamer, blocks_of, plan_memory
from framepack.memory.budgets import GIB
from framepack.memory.disk import STATS, disk_backed
from framepack.memory.hooks import release
from framepack.model import PackedTransformer, get_spec, load_transformer, save_transformer
from framepack.model.fp8 import FP8, quantize_weight
from framepack.pipeline.budget import bundle_need
from framepack.pipeline.bundle import component_dtypes, load_bundle
from framepack.pipeline.fp8_compute import Fp8Compute
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.pipeline.tiers import tier_plan
from framepack.testing import random_packed_inputs, tight_budget, tiny_bundle_dir

RELEASE = component_dtypes("cuda")
CFG = get_spec("tiny").replace(num_layers=2, num_single_layers=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny transformer saved in bf16 in small shards (several blocks per shard and across them)."""
    torch.manual_seed(0)
    model = PackedTransformer(CFG).eval().to(torch.bfloat16)
    return save_transformer(model, tmp_path_factory.mktemp("ckpt"), max_shard_bytes=200_000)


def _inputs(dtype):
    inputs = random_packed_inputs(CFG, 4, 6, seed=1)
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def test_a_lazy_transformer_reads_nothing_and_reads_back_every_weight(checkpoint):
    for dtype in (torch.bfloat16, torch.float32):
        eager = dict(load_transformer(checkpoint, dtype=dtype).named_parameters())
        lazy = load_transformer(checkpoint, dtype=dtype, lazy=True)
        params = dict(lazy.named_parameters())
        assert params.keys() == eager.keys()
        for name, p in params.items():
            assert on_disk(p) and p.dtype == dtype and p.shape == eager[name].shape
            assert p.untyped_storage().nbytes() <= p.element_size()  # a placeholder holds one value
            assert torch.isnan(p.float()).all()  # used by mistake, it gives NaN
            got = disk_source(p).read(torch.empty(p.shape, dtype=dtype))
            assert torch.equal(got, eager[name])


def test_a_source_refuses_a_tensor_of_another_shape(checkpoint):
    source = next(iter(disk_source(p) for p in load_transformer(checkpoint, lazy=True).parameters()))
    assert isinstance(source, DiskSource)
    with pytest.raises(ValueError, match="cannot read a tensor of shape"):
        source.read(torch.empty(source.numel + 1))


@pytest.mark.parametrize("which", ["one block", "two blocks", "half"])
def test_blocks_streamed_from_their_files_are_bit_identical_and_within_budget(checkpoint, which):
    eager = load_transformer(checkpoint, dtype=torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    with torch.no_grad():
        expected = eager.forward_packed(**inputs)
    full = plan_memory(eager, None)
    budget = {
        "one block": full.base_bytes + max(full.block_bytes),
        "two blocks": full.base_bytes + 2 * max(full.block_bytes),
        "half": full.base_bytes + sum(full.block_bytes) // 2,
    }[which]
    model = load_transformer(checkpoint, dtype=torch.bfloat16, lazy=True)
    plan = plan_memory(model, budget)
    ledger = ByteLedger()
    streamer = WeightStreamer(model, plan, "cpu", ledger).attach()
    before = STATS.bytes_read
    with torch.no_grad():
        got = [model.forward_packed(**inputs) for _ in range(2)]
    assert all(torch.equal(g, expected) for g in got)
    assert 0 < ledger.peak <= budget
    streamed = sum(plan.block_bytes[i] for i in plan.streamed)
    assert streamer.disk_bytes >= 2 * streamed - 2 * max(plan.block_bytes)  # every call reads them again
    streamer.detach()  # waits for the read of the next call's first block, started ahead
    assert STATS.bytes_read - before == streamer.disk_bytes
    assert all(on_disk(p) for p in model.parameters() if p.numel() > 1)  # the memory is given back
    assert ledger.current == 0


def _settings(**kw) -> GenerationSettings:
    return GenerationSettings(prompt="an orange square", seconds=1.0, steps=3, seed=5, **kw)


def _frames(path) -> np.ndarray:
    video = read_video(path)
    return np.asarray(video[0] if isinstance(video, tuple) else video)


@pytest.mark.parametrize("precision", ["gpu dtypes", "fp32"])
def test_a_run_under_a_ram_budget_below_the_bundle_is_bit_identical(image, tmp_path, precision):
    dtypes = RELEASE if precision == "gpu dtypes" else None
    eager = load_bundle(tiny_bundle_dir(), dtypes=dtypes)
    expected = open_run(eager, Request(_settings(), image=image)).run(tmp_path / "a")
    # The smallest budget that changes no output: every block streams from its file.
    budget_gib = tight_budget(eager, prepare(eager, _settings(ram_budget=1.0), image)) / GIB
    need = bundle_need(eager, prepare(eager, _settings(ram_budget=1.0), image))
    assert need.weights(round(budget_gib * GIB)) < _bundle_bytes(eager)  # less than the bundle
    lazy = load_bundle(tiny_bundle_dir(), dtypes=dtypes, ram_budget=budget_gib)
    assert all(disk_backed(m) for m in lazy.modules().values())
    assert all(on_disk(p) for m in lazy.modules().values() for p in m.parameters() if p.numel() > 1)
    settings = _settings(ram_budget=budget_gib)
    tiers = tier_plan(lazy, prepare(lazy, settings, image))
    assert tiers.on_cpu and tiers.disk > 0 and tiers.step_read > 0
    before = STATS.bytes_read
    got = open_run(lazy, Request(settings, image=image)).run(tmp_path / "b")
    assert np.array_equal(_frames(got.video), _frames(expected.video))
    assert 0 < got.info["device_weights_peak_bytes"] <= budget_gib * GIB
    assert STATS.bytes_read - before >= tiers.step_read  # the streamed blocks came from the files
    # The encoders and the VAE are back in their files; the transformer's plan stays attached for
    # the next run, and once released every weight is back in its file.
    for module in (lazy.text_encoder, lazy.text_encoder_2, lazy.image_encoder, lazy.vae):
        assert all(on_disk(p) for p in module.parameters() if p.numel() > 1)
    release(lazy.transformer)
    assert all(on_disk(p) for p in lazy.transformer.parameters() if p.numel() > 1)


def test_a_ram_budget_that_fits_keeps_everything_resident(image, tmp_path):
    lazy = load_bundle(tiny_bundle_dir(), dtypes=RELEASE, ram_budget=1.0)  # on a CPU: read at the run
    tiers = tier_plan(lazy, prepare(lazy, _settings(ram_budget=1.0), image))
    assert tiers.disk == 0 and tiers.step_read == 0 and tiers.job_read > 0
    assert "0/" not in tiers.blocks and "0 streamed" in tiers.blocks


def test_cli_refuses_a_ram_budget_too_small_before_loading(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--prompt", "x",
         "--seconds", "1", "--ram-budget", "0.0001", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("framepack: a RAM budget of 0.0001 GiB cannot hold this run at ")
    assert lines[-1].endswith("or more.") and "--ram-budget" in lines[-1]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_states_the_tiers_and_the_sidecar_records_the_budget(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--prompt", "x",
         "--seconds", "1", "--steps", "2", "--ram-budget", "0.8", "--out", str(out), "--name", "v"],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.strip().splitlines()[0]  # the plan goes to stderr, the path to stdout
    assert "weights: RAM " in first and "read from disk: " in first and " per sampling step" in first
    sidecar = json.loads((out / "v.json").read_text())
    assert sidecar["settings"]["ram_budget"] == "0.8"


def _bundle_bytes(bundle) -> int:
    return sum(sum(p.numel() * p.element_size() for p in m.parameters()) for m in bundle.modules().values())


def test_a_lora_is_not_merged_into_weights_on_disk(image, tmp_path):
    from safetensors.torch import save_file

    lazy = load_bundle(tiny_bundle_dir(), ram_budget=0.001)
    layer = lazy.transformer.single_transformer_blocks[0].proj_out
    down, up = torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2)
    name = "transformer.single_transformer_blocks.0.proj_out"
    path = tmp_path / "l.safetensors"
    save_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, str(path))
    request = Request(_settings(ram_budget=0.001, loras=((str(path), 1.0),)), image=image, lora_merge=True)
    with pytest.raises(ValueError, match="cannot be merged into weights that stay in their files"):
        open_run(lazy, request)


def test_offloaded_modules_come_from_their_files_and_leave_after(image, tmp_path):
    lazy = load_bundle(tiny_bundle_dir(), dtypes=RELEASE, ram_budget=0.001)
    eager = load_bundle(tiny_bundle_dir(), dtypes=RELEASE)
    settings = _settings(
        ram_budget=tight_budget(eager, prepare(eager, _settings(ram_budget=1.0), image)) / GIB
    )
    open_run(lazy, Request(settings, image=image)).run(tmp_path / "c")
    modules = [
        lazy.text_encoder,
        lazy.text_encoder_2,
        lazy.image_encoder,
        lazy.vae,
        *blocks_of(lazy.transformer),
    ]
    for module in modules:
        assert all(on_disk(p) for p in module.parameters() if p.numel() > 1)


RSS_SCRIPT = """
import ctypes, gc, json, sys
import numpy as np, psutil
import framepack

image = np.zeros((64, 64, 3), np.uint8)
image[16:48, 16:48] = (200, 40, 40)
budget = None if sys.argv[2] == "none" else sys.argv[2]
rss = []
for i in range(6):
    framepack.generate(out_dir=sys.argv[1], image=image, prompt="a red square moves right", sections=2,
                       steps=2, device="cpu", ram_budget=budget, name=f"v{i}")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the allocator keeps is not the process's
    rss.append(psutil.Process().memory_info().rss)
print(json.dumps(rss))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
@pytest.mark.parametrize("budget", ["none", "0.8"])
def test_host_memory_returns_to_its_baseline_after_each_job(tmp_path, budget):
    """Six API jobs on the demo model (33 MB of weights), the bundle kept loaded between them: the
    RSS after the later jobs stays within 48 MiB of the second's (a copy of the weights kept per job
    would add 33 MB each)."""
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path), budget],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = max(rss[2:]) - rss[1]
    assert growth < 48 * 2**20, [f"{r / 2**20:.0f} MiB" for r in rss]


def test_the_gui_queue_runs_jobs_under_the_servers_ram_budget(image, tmp_path):
    from framepack.gui.jobs import DONE, JobQueue

    eager = load_bundle(tiny_bundle_dir())
    budget = tight_budget(eager, prepare(eager, _settings(ram_budget=1.0), image)) / GIB
    expected = open_run(eager, Request(_settings(), image=image)).run(tmp_path / "a")
    queue = JobQueue(load_bundle(tiny_bundle_dir(), ram_budget=budget), tmp_path / "gui", ram_budget=budget)
    try:
        job = queue.wait(queue.submit(_settings(), image=image).id, timeout=300)
    finally:
        queue.close()
    assert job.state == DONE, job.error
    assert np.array_equal(_frames(job.video), _frames(expected.video))
    assert json.loads(job.sidecar.read_text())["settings"]["ram_budget"] == budget


def test_a_host_tier_keeps_some_streamed_blocks_in_memory(checkpoint):
    """On a GPU the RAM budget keeps what it can of the streamed blocks in (pinned) host memory and
    reads only the rest from the files at every call; the same code runs here with an explicit budget."""
    model = load_transformer(checkpoint, dtype=torch.bfloat16, lazy=True)
    eager = load_transformer(checkpoint, dtype=torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    with torch.no_grad():
        expected = eager.forward_packed(**inputs)
    full = plan_memory(eager, None)
    plan = plan_memory(model, full.base_bytes + max(full.block_bytes))  # every block streams
    two = sorted(plan.block_bytes[i] for i in plan.streamed)[:2]
    streamer = WeightStreamer(model, plan, "cpu", host_budget=sum(two)).attach()
    assert 0 < streamer.host_tier <= sum(two)
    with torch.no_grad():
        got = model.forward_packed(**inputs)
    assert torch.equal(got, expected)
    streamed = sum(plan.block_bytes[i] for i in plan.streamed)
    assert streamer.disk_bytes <= streamed - streamer.host_tier + max(plan.block_bytes)  # + the read ahead
    streamer.detach()
    assert all(on_disk(p) for p in model.parameters() if p.numel() > 1)


def test_a_gpu_ram_budget_below_its_staging_and_fp8_under_a_cpu_ram_budget_are_refused(image):
    from framepack.pipeline.budget import check_budget
    from framepack.pipeline.named import read_manifest
    from framepack.pipeline.settings import check_settings

    model = tiny_bundle_dir()
    prepared = check_settings(read_manifest(model), _settings(ram_budget=1e-6), image)
    with pytest.raises(ValueError, match=r"^a RAM budget of .* cannot hold this run's staging on the host"):
        check_budget(model, prepared, "meta")  # any device but the CPU: the host holds the staging
    check_budget(model, check_settings(read_manifest(model), _settings(ram_budget=1.0), image), "meta")
    fp8 = check_settings(read_manifest(model), _settings(ram_budget=1.0, fp8_weights=True), image)
    with pytest.raises(ValueError, match="on a CPU the RAM budget bounds the memory fp8 host copies"):
        check_budget(model, fp8, "cpu")
    check_budget(model, fp8, "meta")  # on a GPU the host keeps fp8 copies of the streamed blocks


def test_fp8_host_copies_made_from_the_files_equal_those_made_in_memory(checkpoint):
    """On a GPU with a RAM budget the host tier keeps fp8 copies made one tensor at a time from the
    files (the bf16 model is never whole in memory); they are the copies the in-memory path makes."""
    eager = load_transformer(checkpoint, dtype=torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    full = plan_memory(eager, None, fp8=True)
    budget = full.base_bytes + max(full.load_bytes)  # every block streams
    plan = plan_memory(eager, budget, fp8=True)
    streamer = WeightStreamer(eager, plan, "cpu").attach()
    with torch.no_grad():
        expected = eager.forward_packed(**inputs)
    streamer.detach()
    lazy = load_transformer(checkpoint, dtype=torch.bfloat16, lazy=True)
    lazy_plan = plan_memory(lazy, budget, fp8=True)
    streamer = WeightStreamer(lazy, lazy_plan, "cpu", host_budget=2**30).attach()
    streamed = sum(lazy_plan.block_bytes[i] for i in lazy_plan.streamed)
    assert sum(lazy_plan.fp8_bytes[i] for i in lazy_plan.streamed) <= streamer.host_tier < 0.6 * streamed
    with torch.no_grad():
        got = lazy.forward_packed(**inputs)
    assert torch.equal(got, expected) and streamer.disk_bytes == 0  # nothing read from disk per call
    streamer.detach()


def test_fp8_compute_makes_the_e4m3_copies_of_blocks_read_from_their_files_at_each_call(
    checkpoint, monkeypatch
):
    """`--fp8-compute` under a RAM budget: a streamed block outside the host tier is read from its
    files in full precision at every call and made into its fp8 copy on the device, by the host
    tier's row rule (`framepack.memory.streaming`): the output is bit-identical to the run with
    every block in the host tier, and each of its weight matrices is quantised once a call."""
    import framepack.memory.streaming as streaming

    inputs = _inputs(torch.bfloat16)
    eager = load_transformer(checkpoint, dtype=torch.bfloat16)
    full = plan_memory(eager, None, fp8_compute=True)
    budget = full.base_bytes + max(full.load_bytes)  # every block streams
    quantised: list[torch.Size] = []
    monkeypatch.setattr(
        streaming, "quantize_weight", lambda w: quantised.append(w.shape) or quantize_weight(w)
    )
    got, seen = {}, []  # the dtypes of the last block's to_q: it comes last into the host tier
    for name, host_budget in (("host tier", 2**30), ("files", max(full.block_bytes))):
        model = load_transformer(checkpoint, dtype=torch.bfloat16, lazy=True)
        streamer = WeightStreamer(
            model, plan_memory(model, budget, fp8_compute=True), "cpu", host_budget=host_budget
        )
        fp8 = Fp8Compute(model, streamer.attach(), emulate=True).attach()
        from_files = [i for i, entries in streamer.entries.items() if any(e.on_disk for e in entries)]
        hook = blocks_of(model)[-1].attn.to_q.register_forward_pre_hook(
            lambda m, a: seen.append(m.weight.dtype)
        )
        quantised.clear(), seen.clear()
        with torch.no_grad():
            got[name] = [model.forward_packed(**inputs) for _ in range(2)]
        hook.remove()
        fp8.detach()
        streamer.detach()
        matrices = sum(p.dim() >= 2 for i in from_files for p in blocks_of(eager)[i].parameters())
        assert len(quantised) == 2 * matrices and seen == [FP8, FP8]
        assert (streamer.disk_bytes > 0) == (name == "files") and fp8.streamed == fp8.layers > 0
    assert 0 < len(from_files) < len(blocks_of(eager)) and len(blocks_of(eager)) - 1 in from_files
    assert all(torch.equal(a, b) for a, b in zip(got["files"], got["host tier"], strict=True))


@pytest.mark.parametrize("slots", [1, 2])
def test_staged_reads_run_ahead_of_the_copies_and_stay_bit_identical(checkpoint, slots):
    """The CUDA way of reading (into two reused host buffers, ahead of the copies: block i+2 read
    while i+1 is copied and i computes) run here on the CPU: the same output bit for bit, every
    block read once per call, and each block's read started before the block ahead of it ran."""
    eager = load_transformer(checkpoint, dtype=torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    with torch.no_grad():
        expected = eager.forward_packed(**inputs)
    full = plan_memory(eager, None)
    budget = full.base_bytes + slots * max(full.load_bytes)  # every block streams
    model = load_transformer(checkpoint, dtype=torch.bfloat16, lazy=True)
    plan = plan_memory(model, budget)
    assert plan.slots == slots and len(plan.streamed) == len(blocks_of(model))
    streamer = WeightStreamer(model, plan, "cpu", staged_reads=True).attach()
    started: list[int] = []
    running: list[int] = []
    read_ahead = streamer.reader.read_ahead

    def watched(key, sources):
        started.append(key)
        return read_ahead(key, sources)

    streamer.reader.read_ahead = watched
    for i, block in enumerate(blocks_of(model)):
        block.register_forward_pre_hook(lambda module, args, i=i: running.append(i))
    before = STATS.bytes_read
    with torch.no_grad():
        got = [model.forward_packed(**inputs) for _ in range(3)]
    assert all(torch.equal(g, expected) for g in got)
    streamer.detach()
    n = len(plan.streamed)
    assert STATS.bytes_read - before == streamer.disk_bytes
    assert streamer.disk_bytes <= 3 * sum(plan.block_bytes) + 2 * max(plan.block_bytes)  # once a call
    assert started[: n - slots] == list(range(slots, n))  # the first call: block k + slots at block k
    assert len(running) == 3 * n
    assert all(on_disk(p) for p in model.parameters() if p.numel() > 1)
