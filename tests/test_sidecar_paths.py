"""Sidecars name their files so that another folder finds them (issue 18): a CLI run's input
files are recorded as absolute paths, so the GUI (running elsewhere) loads its settings back with
the images and the LoRA; the run's wall time is `wall_seconds`, not the video's `seconds`; and
sidecars written before (relative paths, a top-level `seconds`) still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from framepack.cli.main import main
from framepack.gui.form import form_from_settings, load_sidecar
from framepack.testing import tiny_bundle_dir


def _lora(bundle, path) -> None:
    """A PEFT LoRA file on one layer of the tiny transformer."""
    layer = dict(bundle.transformer.named_modules())["transformer_blocks.0.attn.to_q"]
    down, up = torch.full((2, layer.in_features), 0.01), torch.full((layer.out_features, 2), 0.01)
    name = "base_model.model.transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, str(path))


def test_a_cli_runs_files_load_back_in_the_gui_from_another_folder(
    bundle, image, tmp_path, monkeypatch, capsys
):
    project, gui = tmp_path / "project", tmp_path / "gui"
    inputs, outputs = project / "outputs" / "in", project / "outputs"
    inputs.mkdir(parents=True)
    gui.mkdir()
    Image.fromarray(image).save(inputs / "start.png")
    Image.fromarray(image[:, ::-1].copy()).save(inputs / "end.png")
    Image.fromarray(image[::-1].copy()).save(inputs / "key.png")
    _lora(bundle, inputs / "style.safetensors")

    monkeypatch.chdir(project)  # the CLI names its files relative to its own folder
    code = main(
        ["generate", "--model", str(tiny_bundle_dir()), "--device", "cpu", "--prompt", "a cat walks",
         "--image", "outputs/in/start.png", "--end-image", "outputs/in/end.png",
         "--keyframe", "1.2:outputs/in/key.png", "--lora", "outputs/in/style.safetensors:0.5",
         "--sections", "2", "--steps", "1", "--out", "outputs", "--name", "clip"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = json.loads((outputs / "clip.json").read_text())
    s = info["settings"]
    assert s["image"] == str(inputs / "start.png") and s["end_image"] == str(inputs / "end.png")
    assert s["keyframes"] == [[1.2, str(inputs / "key.png")]]
    assert s["loras"] == [[str(inputs / "style.safetensors"), 0.5]]
    assert "seconds" not in info and info["wall_seconds"] > 0  # the run's time, not the video's length

    monkeypatch.chdir(gui)  # the GUI runs elsewhere, serving the same outputs folder
    for source in (outputs / "clip.json", outputs / "clip.mp4"):
        values = form_from_settings(load_sidecar(source), outputs, bundle.manifest)
        assert np.array_equal(values["image"], image)
        assert np.array_equal(values["end_image"], image[:, ::-1])
        assert values["keyframe_images"] == [str(inputs / "key.png")] and values["keyframe_times"] == "1.2"
        assert values["lora_files"] == [str(inputs / "style.safetensors")] and values["lora_scales"] == "0.5"


def test_a_sidecar_written_before_still_loads(bundle, image, tmp_path, monkeypatch):
    """An older sidecar: paths relative to the run's folder, the wall time as a top-level `seconds`."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    Image.fromarray(image).save(outputs / "start.png")
    old = {
        "settings": {"prompt": "a cat walks", "image": "outputs/start.png", "seconds": 2.4, "loras": []},
        "video": "clip.mp4",
        "seconds": 81.5,
    }
    (outputs / "clip.json").write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)  # from the run's own folder its relative image is found
    values = form_from_settings(load_sidecar(outputs / "clip.json"), outputs, bundle.manifest)
    assert values["seconds"] == pytest.approx(2.4) and np.array_equal(values["image"], image)
