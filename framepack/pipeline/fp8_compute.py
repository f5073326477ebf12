"""`--fp8-compute` (issue 20): the transformer blocks' linear layers as e4m3 matrix products.

`Fp8Compute(model, streamer).attach()` puts an `Fp8Matmul` (`framepack.model.fp8`) in the `fp8`
slot of every linear layer inside the blocks whose shape the kernel takes (both sides multiples
of 16), from outside the model as the other speed features attach. The AdaLN modulations
(`AdaNorm.linear`) stay in full precision: they act on one vector per sample (nothing to gain)
and their error would scale and gate whole streams (on a 13B-width block, quantising them too
raised the output's error from 4.8% to 6.5%, `bench/fp8.py`); a streamed block's modulation
weights still travel as fp8 host copies and are upcast on arrival, as with `--fp8-weights`. A resident layer's weight is
quantised once (one power-of-two scale per output row) and its data replaced by the e4m3 values;
the full-precision data is kept beside them and given back by `detach` (so resident blocks hold
half their bytes more on the device while attached: a budget's plan counts them, `plan_memory`). A streamed layer whose block travels as fp8
host copies (`framepack.memory.streaming`, the same row rule) has its copy installed as it
arrives and multiplied as it is (`WeightStreamer.keep_fp8`): half the transfer, no upcast.

Under a RAM budget a streamed block outside the host tier is read from its safetensors files at
every call, in full precision (the files hold bf16), and quantised on the device as it is installed,
by the host copies' rule (`quantize_weight`, the same bits on any device), its modulations too
(rounded to e4m3 and upcast, as a host-tier copy's are): the output is bit-identical whichever
tier a block comes from. On the device, not on the host after the read: the disk reads bf16
either way, and that read, not the copy to the device it overlaps, bounds the call, so fp8 on the
way would save little; a host pass over every weight at every call would sit beside the reads
(this CPU quantises 0.15 GB/s of bf16 on two threads, `quantize_weight` of a 3072x15360 weight in
0.6 s), where a GPU needs a few memory-bound passes (estimated, not measured: about a millisecond
for a 13B block, whose 0.7 GB read takes a tenth of a second or more).

LoRAs: merged ones are in the weights before they are quantised; on-the-fly ones add their
low-rank update beside the e4m3 product, in the activations' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..memory.streaming import ByteLedger, WeightStreamer, blocks_of
from ..model.fp8 import Fp8Matmul, fp8_shape_ok, fp8_unsupported, quantize_weight
from ..model.layers import AdaNorm, Linear

__all__ = ["Fp8Compute", "check_fp8_compute"]


def check_fp8_compute(fp8_compute, device=None) -> None:
    """Refuse (ValueError, one sentence) an `fp8_compute` other than true, false or "emulate" (tests
    and benches: the same arithmetic in fp32, on any device), and with `device`, true on a device
    without e4m3 products. The one rule: the settings check the value, the run the device too."""
    if fp8_compute not in (False, True, "emulate"):
        raise ValueError(f"fp8_compute must be true, false or 'emulate', got {fp8_compute!r}.")
    if fp8_compute is True and device is not None:
        why = fp8_unsupported(device)
        if why:
            raise ValueError(f"{why}; drop --fp8-compute.")


@dataclass
class Fp8Compute:
    """The e4m3 products attached to a model's blocks (`attach` / `detach`)."""

    model: nn.Module
    streamer: WeightStreamer | None = None
    emulate: bool = False
    ledger: ByteLedger | None = None  # the run's device bytes (a budgeted run): the e4m3 weights go on it
    layers: int = 0  # layers given an fp8 slot
    streamed: int = 0  # of them, those whose fp8 host copies are used as they arrive
    kept: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # data before `attach`
    slotted: list[nn.Module] = field(default_factory=list)
    added: int = 0  # device bytes of the resident layers' e4m3 weights and scales (on `ledger`)

    def attach(self) -> Fp8Compute:
        self.added = 0
        for block in blocks_of(self.model):
            modulations = {id(m.linear) for m in block.modules() if isinstance(m, AdaNorm)}
            for layer in block.modules():
                # by the layer's sizes: a streamed weight is an empty placeholder between its calls
                if (
                    isinstance(layer, Linear)
                    and id(layer) not in modulations
                    and fp8_shape_ok(layer.out_features, layer.in_features)
                ):
                    self._attach_layer(layer)
        if self.ledger is not None and self.added:
            self.ledger.add(self.added, "e4m3 weights")
        return self

    def _attach_layer(self, layer: Linear) -> None:
        slot = Fp8Matmul(self.emulate)
        layer.add_module("fp8", slot)
        self.slotted.append(layer)
        self.layers += 1
        weight = layer.weight
        if self.streamer is not None and self.streamer.keep_fp8(weight, slot.set_scale):
            self.streamed += 1
            return
        q, scale = quantize_weight(weight.data)
        self.kept.append((weight, weight.data))
        weight.data = q
        slot.set_scale(scale)
        self.added += q.numel() * q.element_size() + scale.numel() * scale.element_size()

    def info(self) -> dict:
        return {"fp8_layers": self.layers, "fp8_streamed": self.streamed, "emulated": self.emulate}

    def detach(self) -> None:
        """Every weight gets back its data; the slots go (the streamer's sinks go with it)."""
        for weight, data in self.kept:
            weight.data = data
        self.kept.clear()
        if self.ledger is not None and self.added:
            self.ledger.remove(self.added, "e4m3 weights")
        self.added = 0
        for layer in self.slotted:
            layer._modules.pop("fp8", None)
        self.slotted.clear()
