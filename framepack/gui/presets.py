"""Named presets of the form: `<outputs>/presets/<name>.json`, one JSON object of field values.

Pure file handling (no Gradio). A preset holds the form's settings, not its uploads (images,
videos, LoRA files): those belong to one video. Names are plain file names
(`framepack.io.check_file_name`), so a preset never names a file outside its folder. Reading a
preset keeps only the known fields whose values have the field's type, so a hand-edited or older
file loads what it can.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import check_file_name, write_bytes_atomic

__all__ = ["PRESET_FIELDS", "delete_preset", "list_presets", "load_preset", "preset_path", "save_preset"]

# The form fields a preset holds, with the types a loaded value must have.
PRESET_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "seconds": (int, float),
    "seed": (str, int),
    "random_seed": (bool,),
    "steps": (int, float),
    "distilled_cfg": (int, float),
    "cfg": (int, float),
    "window": (int, float),
    "order": (str,),
    "resolution": (int, float),
    "crf": (int, float),
    "gif": (bool,),
    "cache": (str,),
    "cache_threshold": (int, float),
    "vram_budget": (str,),
    "sampler": (str,),
    "png": (bool,),
    "t2v_colour": (str,),
    "loop": (bool,),
    "one_frame": (bool,),
    "one_frame_index": (int, float),
    "one_frame_groups": (list,),
    "keyframe_times": (str,),
    "loras": (list,),
    "lora_scales": (str,),
}
SUFFIX = ".json"


def preset_path(outputs: str | Path, name: str) -> Path:
    """The file of preset `name` (checked: a plain file name); raises ValueError."""
    name = check_file_name((name or "").strip(), "the preset name")
    return Path(outputs) / "presets" / f"{name}{SUFFIX}"


def list_presets(outputs: str | Path) -> list[str]:
    """The saved presets' names, sorted."""
    folder = Path(outputs) / "presets"
    return sorted(p.stem for p in folder.glob(f"*{SUFFIX}") if p.is_file()) if folder.is_dir() else []


def save_preset(outputs: str | Path, name: str, values: dict) -> Path:
    """Write the preset fields of `values` as preset `name` (replacing one of that name)."""
    path = preset_path(outputs, name)
    kept = {k: values[k] for k in PRESET_FIELDS if k in values and _typed(k, values[k])}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic((json.dumps(kept, indent=2) + "\n").encode("utf-8"), path)
    return path


def load_preset(outputs: str | Path, name: str) -> dict:
    """The known, well-typed field values of preset `name`; raises ValueError (one sentence)."""
    path = preset_path(outputs, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"there is no preset named {path.stem!r}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"the preset {path.stem!r} cannot be read as JSON.") from None
    if not isinstance(data, dict):
        raise ValueError(f"the preset {path.stem!r} is not a JSON object of form fields.")
    return {k: v for k, v in data.items() if k in PRESET_FIELDS and _typed(k, v)}


def delete_preset(outputs: str | Path, name: str) -> bool:
    """Delete preset `name`; False when there was none."""
    path = preset_path(outputs, name)
    if not path.is_file():
        return False
    path.unlink()
    return True


def _typed(key: str, value) -> bool:
    types = PRESET_FIELDS[key]
    if isinstance(value, bool) and bool not in types:
        return False
    if isinstance(value, list):
        return list in types and all(isinstance(v, str) for v in value)
    return isinstance(value, types)
