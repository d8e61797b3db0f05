"""The one shape every LoRA takes between a file and a model.

Formats differ in key names, where alpha lives and what the header says; a LoRA itself
is, per target module, a down (A) and an up (B) factor and an alpha. Readers produce
this, writers and the model code consume it, so each format is written once against it
instead of once per other format. Modules are named canonically: the component, then the
module's diffusers path (see ``emotrain.sdxl.canonical_name``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraModule:
    down: torch.Tensor  # A: (r, in) for linear layers, (r, in, kh, kw) for convolutions
    up: torch.Tensor  # B: (out, r) for linear layers, (out, r, 1, 1) for convolutions
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The change to the base weight, shaped like it. A 1x1 conv after a kxk conv is
        one kxk conv whose kernel is up @ down over the flattened (in, kh, kw) axis."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        d = up.flatten(1) @ down.flatten(1)
        return (self.scale * d).reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraWeights:
    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # the file header's free-form entries (ss_* ...)
    source_format: str = ""  # the FORMATS name it was read from; "" when made in memory

    @property
    def components(self) -> tuple[str, ...]:
        """The components present, in the model's order."""
        from .. import sdxl  # here, not at the top: the SDXL package imports diffusers, stacking's users need not
        present = {name.split(".", 1)[0] for name in self.modules}
        return tuple(c for c in sdxl.COMPONENTS if c in present)

    def component(self, component: str) -> dict[str, LoraModule]:
        """The modules of one component, names without the component prefix."""
        prefix = component + "."
        return {n[len(prefix):]: m for n, m in self.modules.items() if n.startswith(prefix)}
