"""The packed transformer: config, layers, wiring and checkpoint loading."""

from .config import SPECS, TransformerConfig, get_spec
from .loading import CheckpointError, load_transformer, save_transformer
from .transformer import HistoryGroup, PackedTransformer, TransformerOutput, init_kernel_from_base

__all__ = [
    "CheckpointError",
    "load_transformer",
    "save_transformer",
    "SPECS",
    "TransformerConfig",
    "get_spec",
    "HistoryGroup",
    "PackedTransformer",
    "TransformerOutput",
    "init_kernel_from_base",
]
