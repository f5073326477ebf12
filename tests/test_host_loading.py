"""Loading for a small device: under a VRAM budget the weights load onto the host, and only the
memory planner moves them (issue 5).

The CPU has no second device, so loading targets `meta`, a device type of its own: with a budget
not one weight lands there. (Parking swaps a tensor's data between the host and the device, which
torch allows between the CPU and CUDA but not `meta`; the planner's budget is checked on the CPU
by test_offload.py and by the budgeted generation through the API below.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import framepack
from framepack.io import read_video
from framepack.memory.budgets import GIB
from framepack.memory.offload import module_bytes
from framepack.model import load_transformer
from framepack.model.loading import save_transformer
from framepack.pipeline import api
from framepack.pipeline.bundle import component_dtypes, load_bundle, weights_home
from framepack.pipeline.manifest import BundleError
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.testing import tight_budget, tiny_bundle_dir

META = torch.device("meta")


@pytest.fixture(scope="module")
def host_loaded():
    return load_bundle(tiny_bundle_dir(), device="meta", vram_budget=1)


def _bytes_on(bundle, device: torch.device) -> int:
    """Weight bytes of the bundle's modules that sit on `device` (each tensor once)."""
    seen, total = set(), 0
    for m in bundle.modules().values():
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen and t.device == device:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def test_a_budget_loads_every_weight_onto_the_host(host_loaded):
    assert host_loaded.device == META  # where runs compute
    assert _bytes_on(host_loaded, META) == 0
    assert all(p.device.type == "cpu" for m in host_loaded.modules().values() for p in m.parameters())
    assert host_loaded.dtypes() == component_dtypes("meta")  # the target's dtypes, kept on the host
    plain = load_bundle(tiny_bundle_dir(), device="meta")  # no budget: everything on the device
    assert plain.device == META
    assert all(p.device == META for m in plain.modules().values() for p in m.parameters())
    assert weights_home("cuda", "auto") == torch.device("cpu") and weights_home("cuda", None).type == "cuda"
    with pytest.raises(BundleError, match="VRAM budget"):
        load_bundle(tiny_bundle_dir(), device="meta", vram_budget="lots")


class _HostStorages(TorchDispatchMode):
    """The peak bytes of live host storages that ops create (a storage counts until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                if s.nbytes() and s.data_ptr() not in self.refs:
                    self.refs[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


def test_shard_by_shard_loading_holds_one_copy_on_the_host(host_loaded, tmp_path):
    model = host_loaded.transformer
    size = module_bytes(model)
    save_transformer(model, tmp_path, max_shard_bytes=size // 4)
    assert len(list(tmp_path.glob("*.safetensors"))) >= 4
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    with _HostStorages() as live:
        same = load_transformer(tmp_path, device="cpu")  # stored dtype: read straight into place
    assert module_bytes(same) == size and live.peak <= size
    with _HostStorages() as live:
        wide = load_transformer(tmp_path, dtype=torch.float32, device="cpu")  # one tensor converting
    assert live.peak <= module_bytes(wide) + largest
    with _HostStorages() as live:  # the oracle: a state-dict copy holds everything twice
        torch.nn.Module.load_state_dict(same, {k: v.clone() for k, v in same.state_dict().items()})
    assert live.peak >= 2 * size - largest


def test_api_caches_a_bundle_per_place_its_weights_wait(tmp_path, monkeypatch):
    loads = []

    def counting(model, device, vram_budget=None, ram_budget=None, **options):
        loads.append((device, vram_budget))
        return load_bundle(model, device=device, vram_budget=vram_budget, ram_budget=ram_budget, **options)

    monkeypatch.setattr("framepack.pipeline.bundle.load_bundle", counting)
    monkeypatch.setattr(api, "LOADED_BUNDLES", type(api.LOADED_BUNDLES)())
    model = str(tiny_bundle_dir())
    host = api.loaded_bundle(model, "meta", 2)
    assert api.loaded_bundle(model, "meta", "auto") is host and host.device == META
    assert _bytes_on(host, META) == 0
    resident = api.loaded_bundle(model, "meta", None)  # loaded onto the device: the host copy is dropped
    assert resident is not host and _bytes_on(resident, META) > 0
    assert list(api.LOADED_BUNDLES) == [(model, "meta", "meta")]
    assert api.loaded_bundle(model, "cpu", 2) is api.loaded_bundle(model, "cpu", None)  # on a CPU: one place
    assert len(loads) == 3


def test_a_budgeted_generation_through_the_api_equals_the_plain_one(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "LOADED_BUNDLES", type(api.LOADED_BUNDLES)())
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (200, 40, 40)
    base = dict(prompt="a red square", sections=2, steps=2, image=image)
    model = tiny_bundle_dir()
    plain = framepack.generate(model, tmp_path, name="plain", **base)
    bundle = api.loaded_bundle(str(model), "cpu", None)
    settings = GenerationSettings(prompt=base["prompt"], sections=2, steps=2)
    budget = tight_budget(bundle, prepare(bundle, settings, image=image))
    done = framepack.generate(model, tmp_path, name="tight", vram_budget=budget / GIB, **base)
    assert np.array_equal(read_video(done.video)[0], read_video(plain.video)[0])
    assert 0 < json.loads(done.sidecar.read_text())["device_weights_peak_bytes"] <= budget


def test_the_gui_queue_gives_jobs_without_a_budget_the_servers(tmp_path):
    from framepack.gui.jobs import JobQueue
    from framepack.pipeline.settings import GenerationSettings

    bundle = load_bundle(tiny_bundle_dir(), device="cpu", vram_budget=2)
    queue = JobQueue(bundle, tmp_path, start=False, vram_budget=2)
    image = np.zeros((64, 64, 3), np.uint8)
    budgets = []
    for own in (None, "none", 0.5):
        job = queue.submit(GenerationSettings(prompt="a cat", sections=1, vram_budget=own), image)
        assert job.error is None, job.error
        budgets.append(job.settings.vram_budget)
    assert budgets == [2, "none", 0.5]  # "none": every weight on the device for that job
    queue.close(timeout=1)


def test_cli_refuses_a_bad_budget_in_one_sentence(tmp_path, capsys):
    from framepack.cli.main import main

    assert (
        main(
            [
                "serve",
                "--model",
                str(tiny_bundle_dir()),
                "--outputs",
                str(tmp_path / "o"),
                "--vram-budget",
                "lots",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "VRAM budget" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_generate_under_a_budget_loads_on_the_host_and_keeps_to_it(tmp_path, monkeypatch):
    from PIL import Image

    import framepack.pipeline.bundle as bundle_module
    from framepack.cli.main import main

    seen = []
    real = bundle_module.load_bundle

    def recording(*args, **kwargs):
        seen.append(kwargs.get("vram_budget"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bundle_module, "load_bundle", recording)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "start.png")
    bundle = load_bundle(tiny_bundle_dir())
    image = np.full((64, 64, 3), 90, np.uint8)
    prepared = prepare(bundle, GenerationSettings(prompt="a cat", sections=1, steps=2), image=image)
    budget = tight_budget(bundle, prepared) / GIB
    args = ["generate", "--model", str(tiny_bundle_dir()), "--image", str(tmp_path / "start.png")]
    args += ["--prompt", "a cat", "--sections", "1", "--steps", "2", "--out", str(tmp_path / "out")]
    assert main([*args, "--vram-budget", str(budget), "--device", "cpu", "--name", "b"]) == 0
    assert seen == [str(budget)]
    info = json.loads((tmp_path / "out" / "b.json").read_text())
    assert 0 < info["device_weights_peak_bytes"] <= budget * GIB
