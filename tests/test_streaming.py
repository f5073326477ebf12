"""Weight streaming on the CPU: every budget gives bit-identical outputs, the byte accounting
stays under the budget, the weights really leave and come back, and the hooks detach cleanly."""

from __future__ import annotations

import pytest
import torch

from framepack.memory import (
    GIB,
    ByteLedger,
    WeightStreamer,
    add_hook,
    blocks_of,
    hooks_of,
    parse_budget,
    plan_memory,
)
from framepack.memory.budgets import format_bytes
from framepack.memory.hooks import release
from framepack.model import PackedTransformer, get_spec
from framepack.pipeline.speed import accelerate
from framepack.testing import random_packed_inputs

CFG = get_spec("tiny").replace(num_layers=2, num_single_layers=3)


@pytest.fixture()
def model() -> PackedTransformer:
    torch.manual_seed(0)
    return PackedTransformer(CFG).eval()


@pytest.fixture(scope="module")
def inputs() -> list[dict]:
    base = random_packed_inputs(CFG, 4, 6, seed=1)
    return [base, {**base, "timestep": torch.tensor([400.0])}]


def run(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.forward_packed(**inp) for inp in inputs]


def budgets(model) -> dict[str, int]:
    plan = plan_memory(model, None)
    total = plan.base_bytes + sum(plan.block_bytes)
    return {
        "everything": total,
        "half": plan.base_bytes + sum(plan.block_bytes) // 2,
        "two blocks": plan.base_bytes + 2 * max(plan.block_bytes),
        "one block": plan.base_bytes + max(plan.block_bytes),
    }


@pytest.mark.parametrize("which", ["everything", "half", "two blocks", "one block"])
def test_every_budget_is_bit_identical_and_within_budget(model, inputs, which):
    expected = run(model, inputs)
    budget = budgets(model)[which]
    plan = plan_memory(model, budget)
    assert plan.peak_bytes <= budget
    if which == "everything":
        assert plan.streamed == () and plan.slots == 0
        return
    assert plan.streamed and plan.slots == {"half": 1, "two blocks": 2, "one block": 1}[which]
    assert any(plan.resident) == (which == "half")
    ledger = ByteLedger()
    streamer = WeightStreamer(model, plan, "cpu", ledger).attach()
    streamed_params = [p for i in plan.streamed for p in blocks_of(model)[i].parameters()]
    assert all(p.numel() == 0 for p in streamed_params)  # really off the "device"
    got = run(model, inputs) + run(model, inputs)
    for a, b in zip(got, expected + expected, strict=True):
        assert torch.equal(a, b)
    assert 0 < ledger.peak <= budget
    assert max(bytes_ for _, bytes_ in ledger.events) == ledger.peak
    assert (
        streamer.transfers >= 4 * sum(plan.block_bytes[i] for i in plan.streamed) - max(plan.block_bytes) * 2
    )
    assert all(p.numel() == 0 for p in streamed_params)  # dropped again after the forward
    streamer.detach()
    assert all(hooks_of(b) == [] and "forward" not in b.__dict__ for b in blocks_of(model))
    assert ledger.current == 0
    for a, b in zip(run(model, inputs), expected, strict=True):
        assert torch.equal(a, b)


def test_streamed_weights_are_really_needed(model, inputs):
    """Without the hooks the placeholders are empty and the forward fails: the test above is real."""
    plan = plan_memory(model, budgets(model)["one block"])
    streamer = WeightStreamer(model, plan, "cpu").attach()
    for h in streamer.handles:
        h.remove()
    with pytest.raises(RuntimeError):
        run(model, inputs)
    with pytest.raises(ValueError, match="streamed already"):
        plan_memory(model, None)


def test_residents_are_spread_and_plan_describes_itself(model):
    cfg = get_spec("tiny").replace(num_layers=0, num_single_layers=8)
    m = PackedTransformer(cfg)
    plan = plan_memory(m, None)
    budget = plan.base_bytes + 2 * max(plan.block_bytes) + 4 * plan.block_bytes[0]
    plan = plan_memory(m, budget)
    assert plan.resident == (False, True) * 4  # evenly between the streamed blocks
    assert "4/8 blocks resident" in plan.describe()


def test_too_small_budget_is_one_sentence(model):
    plan = plan_memory(model, None)
    with pytest.raises(ValueError, match="too small"):
        plan_memory(model, plan.base_bytes + max(plan.block_bytes) - 1)


def test_fp8_host_copies_halve_and_stay_close(model, inputs):
    expected = run(model, inputs)
    plan0 = plan_memory(model, None)
    plan = plan_memory(model, plan0.base_bytes + 2 * max(plan0.block_bytes), fp8=True)
    assert plan.fp8 and plan.peak_bytes <= plan0.base_bytes + 2 * max(plan0.block_bytes)
    ledger = ByteLedger()
    streamer = WeightStreamer(model, plan, "cpu", ledger).attach()
    host = sum(e.host.numel() * e.host.element_size() for es in streamer.entries.values() for e in es)
    full = sum(plan.block_bytes[i] for i in plan.streamed)
    assert host < 0.3 * full  # fp32 weights -> 1 byte each (plus fp32 biases and norms)
    got = run(model, inputs)
    assert ledger.peak <= plan.peak_bytes
    for a, b in zip(got, expected, strict=True):
        err = ((a - b).norm() / b.norm()).item()
        assert 0 < err < 0.02
    streamer.detach()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def test_fp8_streaming_leaves_the_model_bit_identical(inputs):
    """fp8 host copies are rounded: detach gives every tensor its own data back, and a later run
    without fp8 equals a freshly built model's run exactly."""

    def build() -> PackedTransformer:
        torch.manual_seed(0)
        return PackedTransformer(CFG).to(torch.bfloat16).eval()

    model, fresh = build(), build()
    before = _snapshot(model)
    pointers = {k: v.data_ptr() for k, v in model.named_parameters()}
    plan0 = plan_memory(model, None, fp8=True)
    plan = plan_memory(model, plan0.base_bytes + 2 * max(plan0.load_bytes), fp8=True)
    assert plan.fp8 and plan.streamed and plan.fp8_host_bytes > 0
    assert f"+{format_bytes(plan.fp8_host_bytes)} of host memory" in plan.describe()
    streamer = WeightStreamer(model, plan, "cpu").attach()
    run(model, inputs)
    streamer.detach()
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].device == v.device and torch.equal(after[k], v), k
    assert pointers == {k: v.data_ptr() for k, v in model.named_parameters()}  # the same storage, no copy
    for a, b in zip(run(model, inputs), run(fresh, inputs), strict=True):
        assert torch.equal(a, b)


def test_an_fp8_job_leaves_the_api_bundle_cache_as_loaded(bundle, image, tmp_path, monkeypatch):
    """The API keeps bundles loaded: a job with fp8 host copies under a small budget, then a job
    without, gives the second the latents of the same job on a fresh load."""
    from collections import OrderedDict

    import framepack
    from framepack.pipeline import api
    from framepack.pipeline.jobs import JobDir
    from framepack.pipeline.settings import GenerationSettings, prepare
    from framepack.testing import tight_budget, tiny_bundle_dir

    latents: list[torch.Tensor] = []
    commit = JobDir.commit_section

    def record(job, number, window, state):
        latents.append(window.clone())
        return commit(job, number, window, state)

    monkeypatch.setattr(JobDir, "commit_section", record)
    monkeypatch.setattr(api, "LOADED_BUNDLES", OrderedDict())
    model = str(tiny_bundle_dir())
    job = dict(prompt="a cat walks", sections=2, steps=2, seed=3, image=image)
    settings = GenerationSettings(**{k: v for k, v in job.items() if k != "image"})
    budget8 = tight_budget(bundle, prepare(bundle, settings, image=image), fp8=True) / GIB

    framepack.generate(model, tmp_path, name="fp8", vram_budget=budget8, fp8_weights=True, **job)
    (kept,) = api.LOADED_BUNDLES.values()
    latents.clear()
    framepack.generate(model, tmp_path, name="after", **job)
    after, latents[:] = list(latents), []
    assert list(api.LOADED_BUNDLES.values()) == [kept]  # the second job ran on the bundle the first one used
    api.LOADED_BUNDLES.clear()
    framepack.generate(model, tmp_path, name="fresh", **job)
    assert len(after) == len(latents) == 2
    for a, b in zip(after, latents, strict=True):
        assert torch.equal(a, b)


def test_hooks_nest_by_priority_and_detach_in_any_order():
    lin = torch.nn.Linear(2, 2)
    calls = []

    def hook(tag, priority):
        def h(module, forward, *args, **kwargs):
            calls.append(tag)
            return forward(*args, **kwargs)

        h.priority = priority
        return h

    a = add_hook(lin, hook("inner", 0))
    b = add_hook(lin, hook("outer", 10))
    lin(torch.zeros(1, 2))
    assert calls == ["outer", "inner"]
    a.remove()
    lin(torch.zeros(1, 2))
    assert calls[-1] == "outer"
    b.remove()
    b.remove()
    assert "forward" not in lin.__dict__ and hooks_of(lin) == []


@pytest.mark.parametrize(
    ("text", "value"), [("auto", "auto"), ("6", 6.0), ("6GB", 6.0), (" 4.5 gb", 4.5), (None, None)]
)
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("bad", ["six", "-1", "0", "nan"])
def test_bad_budget_is_one_sentence(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_accelerate_reconfigures_the_same_model(model, inputs):
    expected = run(model, inputs)
    plan = plan_memory(model, None)
    small = (plan.base_bytes + max(plan.block_bytes)) / GIB
    first = accelerate(model, "cpu", vram_budget=small)
    assert first.streamer is not None and first.streamer.plan.slots == 1
    assert "streamed" in first.info()["memory_plan"]
    second = accelerate(model, "cpu", vram_budget=None)  # detaches the first
    assert second.streamer is None and all(hooks_of(b) == [] for b in blocks_of(model))
    for a, b in zip(run(model, inputs), expected, strict=True):
        assert torch.equal(a, b)


def test_release_detaches_streaming_and_the_step_cache(model, inputs):
    """`framepack.memory.hooks.release` (what the offloader calls before planning) takes off both
    halves of what `accelerate` attached, from below the caching layer."""
    expected = run(model, inputs)
    plan = plan_memory(model, None)
    small = (plan.base_bytes + max(plan.block_bytes)) / GIB
    speed = accelerate(model, "cpu", vram_budget=small, cache="teacache", threshold=0.0)
    assert speed.streamer is not None and speed.cache is not None
    assert set(speed.info()) >= {"memory_plan", "weights_peak_gib", "device_weights_peak_bytes", "cache"}
    release(model)
    assert all(hooks_of(b) == [] for b in blocks_of(model))
    release(model)  # nothing left to detach
    for a, b in zip(run(model, inputs), expected, strict=True):
        assert torch.equal(a, b)
