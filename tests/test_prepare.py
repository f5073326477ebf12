"""framepack.training.prepare / data and `framepack prepare`: demo clips -> a latent cache (tiny bundle)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from framepack.io import InputError, write_mp4
from framepack.testing import tiny_bundle, tiny_bundle_dir
from framepack.training.data import LatentCache
from framepack.training.prepare import PrepareWarning, prepare_dataset, resample_indices
from framepack.training.world import render, sample_scene, write_dataset

WINDOW = 2  # one section = the start latent + 2 latents = 9 frames: keeps encoding fast
FRAMES = 13  # 4 latents


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """4 demo clips, one too short, one corrupt, one without a caption."""
    folder = tmp_path_factory.mktemp("videos")
    write_dataset(folder, 4, frames=FRAMES, size=64, seed=0, progress=False)
    scene = sample_scene(99, 5)
    write_mp4(render(scene, 5, 64), folder / "short.mp4")
    (folder / "short.txt").write_text(scene.caption)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (folder / "broken.txt").write_text("a red circle moves left")
    shutil.copy(folder / "clip_00000.mp4", folder / "uncaptioned.mp4")
    return folder


@pytest.fixture(scope="module")
def prepared(source, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prepare_dataset(source, bundle, out, window=WINDOW, progress=False)
    return out, report, [w for w in caught if issubclass(w.category, PrepareWarning)]


def test_folder_source(prepared, source):
    out, report, caught = prepared
    assert (report.encoded, report.reused, report.skipped_short, report.skipped_bad) == (4, 0, 1, 2)
    assert len(caught) == 3 == len(report.problems)
    text = " ".join(str(w.message) for w in caught)
    assert "short.mp4" in text and "broken.mp4" in text and "uncaptioned.txt" in text
    index = json.loads((out / "index.json").read_text())
    assert [e["file"] for e in index["clips"]] == [f"clip_{i:05d}.safetensors" for i in range(4)]
    assert index["settings"]["window"] == WINDOW and index["settings"]["fps"] == 30
    for entry in index["clips"]:
        assert entry["caption"] == (source / entry["file"]).with_suffix(".txt").read_text().strip()
        assert (entry["latent_frames"], entry["frames"], entry["height"], entry["width"]) == (4, 13, 64, 64)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "empty_prompt.safetensors"] + [e["file"] for e in index["clips"]]
    )


def test_plain_caption_cache(prepared, bundle, tmp_path):
    from framepack.pipeline.conditioning import encode_prompt
    from framepack.training.demo import plain_caption_cache

    out, _, _ = prepared
    plain = LatentCache(plain_caption_cache(out, bundle, tmp_path / "plain"))
    full = LatentCache(out)
    assert len(plain) == len(full) and plain.settings == full.settings
    for i, (entry, before) in enumerate(zip(plain.entries, full.entries, strict=True)):
        caption = before["caption"].split(" on a ")[0]
        assert entry == {**before, "caption": caption}
        got, old = plain[i], full[i]
        assert torch.equal(got["latents"], old["latents"]) and torch.equal(
            got["image_embeds"], old["image_embeds"]
        )
        assert torch.equal(got["text"], encode_prompt(bundle, caption).text[0])
        assert not torch.equal(got["text"], old["text"])
    assert torch.equal(plain.empty_prompt()["text"], full.empty_prompt()["text"])


def test_empty_caption_is_stored_for_caption_dropout(prepared, bundle):
    from framepack.pipeline.conditioning import encode_prompt

    out, _, _ = prepared
    empty, expected = LatentCache(out).empty_prompt(), encode_prompt(bundle, "")
    assert set(empty) == {"text", "text_mask", "pooled"}
    assert torch.equal(empty["text"], expected.text[0]) and torch.equal(empty["pooled"], expected.pooled[0])
    assert torch.equal(empty["text_mask"], expected.mask[0]) and int(empty["text_mask"].sum()) >= 1
    (out / "empty_prompt.safetensors").rename(out / "moved.safetensors")
    try:
        with pytest.raises(InputError, match="empty_prompt.safetensors.*framepack prepare"):
            LatentCache(out).empty_prompt()
    finally:
        (out / "moved.safetensors").rename(out / "empty_prompt.safetensors")


def test_cache_file_contents(prepared, bundle):
    out, _, _ = prepared
    path = out / "clip_00000.safetensors"
    tensors = load_file(path)
    m = bundle.manifest
    assert tensors["latents"].shape == (16, (FRAMES + 3) // 4, 64 // 8, 64 // 8)
    assert tensors["text"].shape[0] == m.max_prompt_tokens and tensors["text_mask"].shape == (
        m.max_prompt_tokens,
    )
    assert (
        tensors["text_mask"].sum() > 0 and tensors["pooled"].ndim == 1 and tensors["image_embeds"].ndim == 2
    )
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if k != "text_mask")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["caption"] == sample_scene(0, FRAMES).caption
    assert meta["bucket"] == "64x64" and meta["fps"] == "30" and meta["source"].endswith("clip_00000.mp4")


def test_latent_cache(prepared):
    out, report, _ = prepared
    cache = LatentCache(out)
    assert len(cache) == 4 and cache.caption(1) == sample_scene(1, FRAMES).caption
    item = cache[3]
    assert set(item) == {"latents", "text", "text_mask", "pooled", "image_embeds"}
    assert item["latents"].shape == (16, 4, 8, 8)
    assert cache.groups() == {(4, 64, 64): [0, 1, 2, 3]}
    assert cache.entries == report.entries
    with pytest.raises(IndexError):
        cache[4]
    with pytest.raises(InputError, match="index.json"):
        LatentCache(out / "nowhere")


def test_jsonl_source_is_deterministic(prepared, source, bundle, tmp_path):
    out, _, _ = prepared
    lists = source / "lists"
    lists.mkdir(exist_ok=True)
    lines = [
        json.dumps({"video": "../clip_00002.mp4", "caption": sample_scene(2, FRAMES).caption}),
        "not json",
        json.dumps({"video": "../clip_00003.mp4"}),
        "",
        json.dumps({"video": "../clip_00001.mp4", "caption": sample_scene(1, FRAMES).caption}),
    ]
    (lists / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(PrepareWarning):
        report = prepare_dataset(lists / "train.jsonl", bundle, tmp_path, window=WINDOW, progress=False)
    assert (report.encoded, report.skipped_bad, report.skipped_short) == (2, 2, 0)
    assert [e["file"] for e in report.entries] == ["clip_00002.safetensors", "clip_00001.safetensors"]
    for name in ("clip_00001.safetensors", "clip_00002.safetensors"):  # same clip, same tensors
        a, b = load_file(tmp_path / name), load_file(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_frame_rate_and_max_frames(bundle, tmp_path):
    scene = sample_scene(5, 18)
    frames = render(scene, 18, 64)
    write_mp4(frames, tmp_path / "src" / "fast.mp4", fps=60)
    write_mp4(np.concatenate([frames, frames]), tmp_path / "src" / "long.mp4", fps=30)
    for name in ("fast", "long"):
        (tmp_path / "src" / f"{name}.txt").write_text(scene.caption)
    report = prepare_dataset(
        tmp_path / "src", bundle, tmp_path / "out", window=WINDOW, max_frames=10, progress=False
    )
    by_name = {e["file"]: e for e in report.entries}
    assert by_name["fast.safetensors"]["frames"] == 9  # 18 frames at 60 fps -> 9 at 30 fps
    assert by_name["long.safetensors"]["frames"] == 9  # 36 frames cut to 10, then to whole latents


def test_resample_indices():
    assert resample_indices(74, 60, 30).tolist() == list(range(0, 74, 2))
    assert resample_indices(10, 30, 30).tolist() == list(range(10))
    up = resample_indices(24, 24, 30)
    assert len(up) == 30 and up[0] == 0 and up[-1] == 23 and (np.diff(up) >= 0).all()
    assert len(resample_indices(300, 30000 / 1001, 30)) == 301  # 29.97 fps: 10.01 s


def test_rerun_reuses_and_notices_changes(prepared, source, bundle, tmp_path):
    # On a copy of the cache, and the caption put back after: the shared source and cache stay as
    # the other tests expect them, whatever the order.
    out = tmp_path / "cache"
    shutil.copytree(prepared[0], out)
    caption = source / "clip_00003.txt"
    original = caption.read_text()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrepareWarning)
            again = prepare_dataset(source, bundle, out, window=WINDOW, progress=False)
            assert (again.encoded, again.reused, again.skipped) == (0, 4, 3)
            caption.write_text("a blue square moves up")  # a changed caption is encoded again
            changed = prepare_dataset(source, bundle, out, window=WINDOW, progress=False)
    finally:
        caption.write_text(original)
    assert (changed.encoded, changed.reused) == (1, 3)
    assert LatentCache(out).caption(3) == "a blue square moves up"


def test_changed_encoder_weights_encode_again(prepared, source, tmp_path):
    """The same bundle folder whose text encoder changed (as `scale_text_encoder` does in place)
    must not reuse the old embeddings: the settings carry a fingerprint of the encoders."""
    from framepack.pipeline.bundle import load_bundle
    from framepack.training.prepare import encoder_fingerprint

    out = tmp_path / "cache"
    shutil.copytree(prepared[0], out)
    changed = load_bundle(tiny_bundle_dir())
    before = encoder_fingerprint(changed)
    with torch.no_grad():
        one = changed.image_encoder.state_dict()[next(iter(changed.image_encoder.state_dict()))]
        one.view(-1)[-1] = torch.nextafter(one.view(-1)[-1], torch.tensor(math.inf, dtype=one.dtype))
        assert encoder_fingerprint(changed) != before  # one value, one step up, in another encoder
        changed.text_encoder.embed_tokens.weight.mul_(2)
    assert encoder_fingerprint(changed) != before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrepareWarning)
        report = prepare_dataset(source, changed, out, window=WINDOW, progress=False)
    assert (report.encoded, report.reused) == (4, 0)
    fresh = load_file(out / "clip_00000.safetensors")
    assert not torch.equal(fresh["text"], load_file(prepared[0] / "clip_00000.safetensors")["text"])


def test_bad_arguments(source, bundle, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", bundle, tmp_path / "out")
    (tmp_path / "list.csv").write_text("x")
    with pytest.raises(InputError, match="neither"):
        prepare_dataset(tmp_path / "list.csv", bundle, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no videos"):
        prepare_dataset(tmp_path / "empty", bundle, tmp_path / "out")
    with pytest.raises(InputError, match="max_frames"):
        prepare_dataset(source, bundle, tmp_path / "out", window=WINDOW, max_frames=5)
    with pytest.raises(InputError, match="Resolution"):
        prepare_dataset(source, bundle, tmp_path / "out", resolution=100)


def _cli(argv):
    from framepack.cli.common import UserError
    from framepack.cli.prepare import add_parser

    parser = argparse.ArgumentParser(prog="framepack")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args, UserError


def test_cli(prepared, source, tmp_path, capsys):
    out, _, _ = prepared
    model = str(tiny_bundle_dir())
    args, user_error = _cli(["prepare", str(source), "--model", model, "--out", str(out), "--window", "2"])
    args.func(args)
    printed = capsys.readouterr()
    assert "4 clips cached" in printed.out and "0 encoded" in printed.out
    assert "skipped: " in printed.err
    args, _ = _cli(["prepare", str(tmp_path / "nope"), "--model", model, "--out", str(tmp_path)])
    with pytest.raises(user_error, match="does not exist") as e:
        args.func(args)
    assert str(e.value).count(". ") == 0
