"""Input images and output files: resolution buckets, robust image loading, atomic mp4/GIF/PNG/JSON.

PyAV (the `video` extra) is imported only when a video is written or read.
"""

from __future__ import annotations

from framepack.io.errors import InputError, InputWarning
from framepack.io.files import (
    MAX_NAME_BYTES,
    atomic_write,
    check_file_name,
    write_bytes_atomic,
    write_json_atomic,
)
from framepack.io.images import (
    BUCKETS_640,
    buckets,
    crop_start,
    fit_to_bucket,
    load_image,
    pick_bucket,
    prepare_image,
)
from framepack.io.video import concat_mp4, read_video, write_gif, write_mp4, write_png_frames

__all__ = [
    "BUCKETS_640",
    "MAX_NAME_BYTES",
    "InputError",
    "InputWarning",
    "atomic_write",
    "buckets",
    "check_file_name",
    "concat_mp4",
    "crop_start",
    "fit_to_bucket",
    "load_image",
    "pick_bucket",
    "prepare_image",
    "read_video",
    "write_bytes_atomic",
    "write_gif",
    "write_json_atomic",
    "write_mp4",
    "write_png_frames",
]
