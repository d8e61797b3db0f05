"""The one shape every LoRA takes between a file and a model.

Formats differ in key names, where alpha lives and what the header says; an adapter
itself is, per target module, its kind's tensors and an alpha: for LoRA (and DoRA) a down
(A) and an up (B) factor, for DoRA also the magnitude (``dora_scale``), for LoHa and LoKr
their LyCORIS tensors (``hada_w1_a``..., ``lokr_w1``...) under those names in ``extra``.
Readers produce this, writers and the model code consume it, so each format is written
once against it instead of once per other format. Modules are named canonically: the
component, then the module's diffusers path (see ``emotrain.sdxl.canonical_name``). What a
kind's tensors mean (rank, delta) is its registry entry's business (``kinds.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

ADAPTER = "default"  # peft's name for the one adapter a model carries here
_KINDS: dict = {}  # name -> kind; filled by kinds.py (which imports this module, not the reverse)


def kind_named(name: str):
    if not _KINDS:
        importlib.import_module(f"{__package__}.kinds")
    return _KINDS[name]


@dataclass
class LoraModule:
    down: torch.Tensor | None  # A: (r, in) for linear layers, (r, in, kh, kw) for convolutions
    up: torch.Tensor | None  # B: (out, r) for linear layers, (out, r, 1, 1) for convolutions
    alpha: float
    kind: str = "lora"  # a kinds.KINDS name
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the kind's other tensors, by LyCORIS name

    shape: tuple[int, ...] | None = None  # the base weight's shape where the tensors leave it open (LoHa/LoKr convs)

    @property
    def entry(self):
        """The kind's registry entry (kinds.KINDS)."""
        return kind_named(self.kind)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the module by role: ``down``/``up`` and the ``extra`` names."""
        base = {} if self.down is None else {"down": self.down, "up": self.up}
        return {**base, **self.extra}

    @property
    def rank(self) -> int:
        return self.entry.rank(self)

    @property
    def scale(self) -> float:
        return self.entry.scale(self)

    @property
    def is_conv(self) -> bool:
        return self.entry.is_conv(self)

    @property
    def is_conv3x3(self) -> bool:
        """A convolution with a kernel larger than 1x1 (the conv rank/alpha applies)."""
        return self.entry.is_conv(self) and self.entry.kernel_size(self) > 1

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of the base weight it changes (LoHa/LoKr convs: flattened where the
        file leaves the kernel open)."""
        return tuple(self.entry.delta_shape(self))

    @property
    def delta_numel(self) -> int:
        n = 1
        for d in self.delta_shape:
            n *= d
        return n

    def delta(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """The change to the base weight, shaped like it. ``base``: the base weight, which
        DoRA's change depends on (the other kinds ignore it)."""
        return self.entry.delta(self, dtype, base)


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

    @property
    def kinds(self) -> tuple[str, ...]:
        """The adapter kinds present, sorted."""
        return tuple(sorted({m.kind for m in self.modules.values()}))

    @property
    def kind(self) -> str:
        """The one adapter kind of the file ("lora" when empty); mixed files are refused
        where one kind is needed (continuing training)."""
        from ..errors import UserError
        kinds = self.kinds
        if len(kinds) > 1:
            raise UserError(f"the LoRA file mixes adapter kinds ({', '.join(kinds)}): training can continue only "
                            "from a file of one kind; merge it into the model (merge --model) instead")
        return kinds[0] if kinds else "lora"

    def component(self, component: str) -> dict[str, LoraModule]:
        """The modules of one component, names without the component prefix."""
        prefix = component + "."
        return {n[len(prefix):]: m for n, m in self.modules.items() if n.startswith(prefix)}
