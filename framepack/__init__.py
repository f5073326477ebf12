"""FramePack: next-section video diffusion with packed frame context.

Public API (imported lazily, so `import framepack` stays cheap and side-effect free):
`generate`, `generate_iter`, `load_bundle`, `GenerationSettings`, `load_transformer`,
`save_transformer`, `PackedTransformer`, `TransformerConfig`, `CheckpointError`.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_transformer": "framepack.model.loading",
    "save_transformer": "framepack.model.loading",
    "CheckpointError": "framepack.model.loading",
    "PackedTransformer": "framepack.model.transformer",
    "HistoryGroup": "framepack.model.transformer",
    "TransformerConfig": "framepack.model.config",
    "get_spec": "framepack.model.config",
    "generate": "framepack.pipeline.api",
    "generate_iter": "framepack.pipeline.api",
    "load_bundle": "framepack.pipeline.bundle",
    "GenerationSettings": "framepack.pipeline.settings",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'framepack' has no attribute {name!r}")
