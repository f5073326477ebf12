"""Hard inputs through `framepack generate`, one table: each bad input gives exit status 2, one
sentence on stderr (no traceback) and no output file; the inputs that can be handled (16-bit,
CMYK, palette, alpha, animated images, an over-long prompt) give a video, with a warning where
something was dropped. The CLI runs in-process (`main(argv)`), so the table stays fast."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack.cli.main import main
from framepack.io import read_video
from framepack.testing import tiny_bundle_dir


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims `width` x `height` (with a valid CRC) and a one-byte image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00\x00\x00")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every input file of the table, written once."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "start.png")
    good = (d / "start.png").read_bytes()
    (d / "empty.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _png_header_only(d / "huge.png", 20000, 20000)
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    (d / "text.png").write_text("this is not an image\n")
    (d / "doc.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")
    (d / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>')
    (d / "folder.png").mkdir()
    # Images that are unusual but valid: converted to 8-bit RGB.
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(d / "16bit.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgba = np.concatenate([rgb, np.full((64, 96, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(d / "alpha.png")
    frames = [Image.fromarray(np.roll(rgb, 8 * i, axis=1)) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    # Model directories: a missing part, a mismatched part, a pickle checkpoint.
    bundle = tiny_bundle_dir()
    shutil.copytree(bundle, d / "no_vae")
    shutil.rmtree(d / "no_vae" / "vae")
    shutil.copytree(bundle, d / "mismatched")
    cfg = json.loads((d / "mismatched" / "transformer" / "config.json").read_text())
    cfg["num_layers"] = cfg.get("num_layers", 1) + 1
    (d / "mismatched" / "transformer" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(bundle, d / "pickled")
    for f in (d / "pickled" / "vae").glob("*.safetensors"):
        f.unlink()
    (d / "pickled" / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (d / "not_a_bundle").mkdir()
    (d / "a_file").write_text("x")
    return d


LONG_PROMPT = "a cat walks in the rain " * 200  # far over the 256-token limit

# (id, extra argv, what: "error" with a word of the message, or "ok" with a word of a warning or "")
CASES = [
    # ---- images
    ("missing image", ["--image", "{d}/missing.png"], "error", "does not exist"),
    ("empty image", ["--image", "{d}/empty.png"], "error", "empty"),
    ("corrupt image", ["--image", "{d}/corrupt.png"], "error", "corrupt"),
    ("truncated png", ["--image", "{d}/truncated.png"], "error", "corrupt"),
    ("truncated jpeg", ["--image", "{d}/truncated.jpg"], "error", "corrupt"),
    ("huge 20000x20000", ["--image", "{d}/huge.png"], "error", "megapixel"),
    ("tiny 1x1", ["--image", "{d}/tiny.png"], "error", "smaller"),
    ("text as image", ["--image", "{d}/text.png"], "error", "not a readable image"),
    ("pdf as image", ["--image", "{d}/doc.pdf"], "error", "not a readable image"),
    ("svg as image", ["--image", "{d}/vector.svg"], "error", "not a readable image"),
    ("folder as image", ["--image", "{d}/folder.png"], "error", "not a file"),
    ("corrupt end image", ["--end-image", "{d}/corrupt.png"], "error", "corrupt"),
    ("missing keyframe image", ["--keyframe", "0.5:{d}/missing.png"], "error", "does not exist"),
    ("16-bit image", ["--image", "{d}/16bit.png"], "ok", ""),
    ("cmyk image", ["--image", "{d}/cmyk.jpg"], "ok", ""),
    ("palette image", ["--image", "{d}/palette.png"], "ok", ""),
    ("alpha image", ["--image", "{d}/alpha.png"], "ok", "transparen"),
    ("animated image", ["--image", "{d}/animated.gif"], "ok", "only the first"),
    # ---- numbers
    ("zero seconds", ["--seconds", "0"], "error", "second"),
    ("negative seconds", ["--seconds", "-3"], "error", "second"),
    ("endless seconds", ["--seconds", "1e9"], "error", "second"),
    ("nan seconds", ["--seconds", "nan"], "error", "second"),
    ("seconds not a number", ["--seconds", "five"], "error", "seconds"),
    ("zero sections", ["--sections", "0"], "error", "section"),
    ("a million sections", ["--sections", "1000000"], "error", "section"),
    ("zero steps", ["--steps", "0"], "error", "steps"),
    ("a million steps", ["--steps", "1000000"], "error", "steps"),
    ("zero window", ["--window", "0"], "error", "window"),
    ("huge window", ["--window", "1000"], "error", "window"),
    ("zero fps", ["--fps", "0"], "error", "fps"),
    ("huge fps", ["--fps", "100000"], "error", "fps"),
    ("negative seed", ["--seed", "-1"], "error", "seed"),
    ("seed over 64 bits", ["--seed", str(2**64)], "error", "seed"),
    ("seed not a number", ["--seed", "lucky"], "error", "seed"),
    ("width not a multiple of 16", ["--width", "100", "--height", "64"], "error", "16"),
    ("absurd size", ["--width", "160000", "--height", "160000"], "error", "width"),
    ("width without height", ["--width", "64"], "error", "both"),
    ("resolution not a multiple of 16", ["--resolution", "650"], "error", "resolution"),
    ("absurd resolution", ["--resolution", "100000"], "error", "resolution"),
    ("negative cfg", ["--cfg", "-1"], "error", "cfg"),
    ("nan distilled cfg", ["--distilled-cfg", "nan"], "error", "guidance"),
    ("crf out of range", ["--crf", "99"], "error", "crf"),
    # ---- names
    ("unknown order", ["--order", "sideways"], "error", "order"),
    ("unknown sampler", ["--sampler", "dpm"], "error", "sampler"),
    ("unknown cache preset", ["--cache", "warp:0.1"], "error", "cache"),
    ("unknown option", ["--frobnicate"], "error", "frobnicate"),
    # ---- prompts and keyframes
    ("empty prompt", ["--prompt", "  "], "error", "prompt"),
    ("prompt over the token limit", ["--prompt", LONG_PROMPT], "ok", "token"),
    ("timed prompt after the end", ["--prompt", "[0s-1s: a cat] [99s: a dog]"], "error", "99"),
    ("overlapping timed prompts", ["--prompt", "[0s-0.8s: a cat] [0.5s-1s: a dog]"], "error", "overlap"),
    ("bad --prompt-at", ["--prompt-at", "soon:a dog"], "error", "TIME:TEXT"),
    ("keyframe after the end", ["--keyframe", "99:{d}/start.png"], "error", "keyframe"),
    ("keyframe before the start", ["--keyframe", "-1:{d}/start.png"], "error", "keyframe"),
    ("two keyframes at one time", ["--keyframe", "2:{d}/start.png", "--keyframe", "2:{d}/start.png"], "error", "keyframe"),
    ("bad keyframe syntax", ["--keyframe", "soon:{d}/start.png"], "error", "TIME:IMAGE"),
    # ---- models and outputs
    ("no such model", ["--model", "{d}/no/such-model-here"], "error", "such-model-here"),
    ("model folder is not a bundle", ["--model", "{d}/not_a_bundle"], "error", "not a FramePack bundle"),
    ("model lacks its vae", ["--model", "{d}/no_vae"], "error", "vae"),
    ("model parts mismatched", ["--model", "{d}/mismatched"], "error", "transformer"),
    ("pickle checkpoint", ["--model", "{d}/pickled"], "error", "safetensors"),
    ("output under a file", ["--out", "{d}/a_file/out"], "error", "output folder"),
    ("output in a read-only place", ["--out", "/proc/framepack-out"], "error", "output folder"),
]  # fmt: skip


def _argv(files: Path, tmp_path: Path, extra: list[str]) -> list[str]:
    args = {
        "--model": str(tiny_bundle_dir()),
        "--image": str(files / "start.png"),
        "--prompt": "a cat walks",
        "--out": str(tmp_path / "out"),
        "--sections": "1",
        "--steps": "1",
        "--name": "clip",
    }
    rest = []
    extra = [e.replace("{d}", str(files)) for e in extra]
    i = 0
    while i < len(extra):  # options of the case replace the defaults
        flag = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if flag in args and has_value:
            args[flag] = extra[i + 1]
        elif flag in ("--seconds",):
            args.pop("--sections")
            rest += [flag, extra[i + 1]]
        else:
            rest += extra[i : i + 2] if has_value else [flag]
        i += 2 if has_value else 1
    return ["generate", *(x for kv in args.items() for x in kv), *rest]


def _lines(err: str) -> list[str]:
    """stderr without the progress bar."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("section ")]


def _left_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()] if out.exists() else []


@pytest.mark.parametrize("extra,kind,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hard_input(files, tmp_path, capsys, extra, kind, needle):
    code = main(_argv(files, tmp_path, extra))
    captured = capsys.readouterr()
    lines = _lines(captured.err)
    assert "Traceback" not in captured.err
    if kind == "error":
        assert code != 0
        assert len(lines) == 1 and lines[0].startswith("framepack: "), captured.err
        assert needle.lower() in lines[0].lower(), lines[0]
        assert not _left_files(tmp_path / "out")
    else:
        assert code == 0, captured.err
        warnings = [line for line in lines if line.startswith("framepack: warning:")]
        if needle:
            assert len(warnings) == 1 and needle in warnings[0], captured.err
        else:
            assert not warnings, captured.err
        frames, _, _ = read_video(tmp_path / "out" / "clip.mp4")
        assert frames.shape[0] == 4 * 10 - 3


def test_unwritable_output_folder(files, tmp_path, capsys):
    """chmod blocks writes only for other users than root; as root this case is covered by the
    read-only /proc and file-in-the-way rows of the table."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; see the /proc row of the table")
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        code = main(_argv(files, tmp_path, ["--out", str(out)]))
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output folder" in err[0]
    assert not _left_files(out)


def test_disk_full_mid_run_keeps_the_finished_section(files, tmp_path, capsys, monkeypatch):
    """The disk fills while the second section is written: the fsync of its first file fails with
    ENOSPC. One sentence, no temporary file left, the first section's video plays and resumes."""
    import framepack.io.files as files_module

    real = files_module.fsync_path

    def fsync(path: Path) -> None:
        if ".0001." in path.name:  # a file of the second section
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    monkeypatch.setattr(files_module, "fsync_path", fsync)
    argv = _argv(files, tmp_path, ["--sections", "2", "--order", "forward"])
    assert main(argv) == 2
    plan, *err = _lines(capsys.readouterr().err)  # what the run makes, then the one sentence
    assert plan == "framepack: 2 section(s) of 9 latents: 73 frames, 2.43 s at 30 fps.", plan
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    out = tmp_path / "out"
    assert not list(out.rglob("*.tmp"))
    assert read_video(out / "clip.mp4")[0].shape[0] == 4 * 10 - 3  # the first section
    monkeypatch.setattr(files_module, "fsync_path", real)  # space again: the run goes on
    assert main(["generate", "--resume", str(out / "clip.job")]) == 0
    assert read_video(out / "clip.mp4")[0].shape[0] == 4 * 19 - 3


# ---------------------------------------------------------------- safe loading
def test_no_remote_code_or_pickle_loading_in_the_source():
    """Nothing in the package turns on remote code or unpickles (torch.load, pickle.load)."""
    root = Path(__file__).resolve().parent.parent / "framepack"
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for bad in ("trust_remote_code=True", "torch.load(", "pickle.load", "weights_only=False"):
            if bad in text:
                offenders.append(f"{path.relative_to(root)}: {bad}")
    assert not offenders


def _bundle_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir(), copy)
    return copy


def test_code_in_a_model_directory_never_runs(tmp_path):
    """A tokenizer and an encoder that point (auto_map) at Python files in the bundle: the bundle
    loads with the built-in classes or fails with one sentence, and the files never run."""
    from framepack.pipeline.bundle import load_bundle
    from framepack.pipeline.manifest import BundleError

    bundle = _bundle_copy(tmp_path)
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for component, config, key in (
        ("tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
        ("text_encoder", "config.json", {"AutoModel": "evil.EvilModel"}),
    ):
        (bundle / component / "evil.py").write_text(
            payload + "class EvilTokenizer: pass\nclass EvilModel: pass\n"
        )
        data = json.loads((bundle / component / config).read_text())
        data["auto_map"] = key
        (bundle / component / config).write_text(json.dumps(data))
    try:
        load_bundle(bundle)
    except BundleError as e:
        assert "\n" not in str(e)
    assert not marker.exists()


def test_oversized_tensor_header_is_refused_before_allocation(tmp_path):
    """A VAE file whose header promises a 4 TB tensor: refused from the header, nothing allocated."""
    from framepack.pipeline.bundle import load_bundle
    from framepack.pipeline.manifest import BundleError

    bundle = _bundle_copy(tmp_path)
    weights = next((bundle / "vae").glob("*.safetensors"))
    header = json.dumps(
        {
            "encoder.conv_in.conv.weight": {
                "dtype": "F32",
                "shape": [1 << 20, 1 << 20],
                "data_offsets": [0, 1 << 42],
            }
        }
    ).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(BundleError) as error:
        load_bundle(bundle)
    assert "vae" in str(error.value) and "\n" not in str(error.value)


def test_pickle_lora_is_refused_without_unpickling(files, tmp_path, capsys, monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    (tmp_path / "style.pt").write_bytes(b"\x80\x02}q\x00.")
    assert main(_argv(files, tmp_path, ["--lora", str(tmp_path / "style.pt")])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors" in err[0] and not _left_files(tmp_path / "out")


def test_disk_full_at_the_start_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    import framepack.io.files as files_module

    def fsync(path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files_module, "fsync_path", fsync)
    assert main(_argv(files, tmp_path, [])) == 2
    plan, *err = _lines(capsys.readouterr().err)  # what the run makes, then the one sentence
    assert plan.startswith("framepack: 1 section(s) of 9 latents"), plan
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in err[0]
    assert list((tmp_path / "out").iterdir()) == []  # no file, no empty job directory
