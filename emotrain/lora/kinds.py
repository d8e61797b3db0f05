"""The adapter kinds, one registry entry each (``KINDS``).

An adapter kind says in one place everything the rest of emotrain asks of it: how it is
put into a model (its peft config for a run's targets, ranks and alphas, or one that
reproduces a file exactly), what its tensors are called in the live model, in a
kohya/LyCORIS file and in a diffusers file, how its weight delta is computed (merge,
convert, bake: ``LoraModule.delta``), and how many parameters a layer adds (vram).

Today there is one kind, ``lora`` (LoRA on linear layers and 1x1 convs, LoCon on 3x3
convs). A new kind (DoRA, LoHa, LoKr) is one more entry here; injection (inject.py), the
live model (live.py), the file formats (formats/), stacking and the memory plan go
through the registry. Only this package knows peft's tensor names.
"""

from __future__ import annotations

import math
import re

from ..sdxl import Targets
from .formats.common import mode

ADAPTER = "default"  # peft's name for the one adapter a model carries here


class LoraKind:
    """LoRA: ``delta W = alpha/rank * up @ down`` (a 1x1 conv after a kxk conv for
    convolutions); peft's ``LoraConfig``, kohya's ``lora_down``/``lora_up``/``alpha``."""

    name = "lora"
    description = "LoRA (LoCon on 3x3 convolutions), sd-scripts' networks.lora"
    network_module = "networks.lora"  # sd-scripts' ss_network_module
    kohya_parts = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
    diffusers_parts = {"lora_A.weight": "down", "lora_B.weight": "up"}  # peft's layout
    live_down, live_up = "lora_A", "lora_B"  # a peft layer's ModuleDicts of the factors

    def is_up(self, param_name: str) -> bool:
        """A live parameter of an up (B) factor: what LoRA+ trains at lr x ratio."""
        return f".{self.live_up}." in param_name

    # -- injection ---------------------------------------------------------------------

    def peft_config(self, rank: int, alpha: float, targets: Targets, conv_rank: int | None = None,
                    conv_alpha: float | None = None):
        """The peft config of a fresh adapter on ``targets`` (3x3 convs at their own rank)."""
        from peft import LoraConfig

        patterns = {}
        if targets.conv_pattern is not None:
            patterns = dict(rank_pattern={targets.conv_pattern: rank if conv_rank is None else conv_rank},
                            alpha_pattern={targets.conv_pattern: alpha if conv_alpha is None else conv_alpha})
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets.pattern, init_lora_weights=True,
                          **patterns)

    def exact_config_kwargs(self, modules: dict, peft_targets: dict[str, str]) -> dict:
        """LoraConfig arguments reproducing ``modules`` (name -> LoraModule) exactly: the
        commonest rank and alpha as defaults, the rest as exact-name patterns.
        ``peft_targets``: module name -> the name peft matches."""
        r = mode([m.rank for m in modules.values()])
        alpha = mode([m.alpha for m in modules.values()])
        targets, rank_pattern, alpha_pattern = [], {}, {}
        for name, m in sorted(modules.items()):
            target = peft_targets[name]
            targets.append(target)
            if m.rank != r:
                rank_pattern[re.escape(target)] = m.rank
            if m.alpha != alpha:
                alpha_pattern[re.escape(target)] = m.alpha
        return {"r": r, "lora_alpha": alpha, "target_modules": targets, "rank_pattern": rank_pattern,
                "alpha_pattern": alpha_pattern}

    def exact_config(self, modules: dict, peft_targets: dict[str, str]):
        from peft import LoraConfig
        return LoraConfig(init_lora_weights=True, **self.exact_config_kwargs(modules, peft_targets))

    def install_forward(self, model) -> int:
        """The fused forward under mixed precision (fast.py) on the model's plain layers."""
        from .fast import install
        return install(model, ADAPTER)

    # -- the live model ----------------------------------------------------------------

    def is_layer(self, module, adapter: str | None = ADAPTER) -> bool:
        """Whether ``module`` is a peft layer carrying this kind's ``adapter`` (None: any;
        diffusers' ``load_lora_weights`` names its adapters ``default_0``, ...)."""
        import torch
        down = getattr(module, self.live_down, None)
        return isinstance(down, torch.nn.ModuleDict) and (adapter in down if adapter else len(down) > 0)

    def is_adapter_tensor(self, name: str) -> bool:
        """Whether a parameter or buffer name belongs to an adapter (not the frozen base)."""
        return "lora_" in name

    def factors(self, layer, adapter: str = ADAPTER):
        """The live (down, up) weights of a layer."""
        return getattr(layer, self.live_down)[adapter].weight, getattr(layer, self.live_up)[adapter].weight

    def layer_scale(self, layer, adapter: str = ADAPTER) -> float:
        return float(layer.scaling[adapter])

    def layer_alpha(self, layer, adapter: str = ADAPTER) -> float:
        """The alpha that, over the layer's rank, gives the scale the model computes."""
        r = layer.r[adapter]
        alpha = float(layer.lora_alpha[adapter])
        scaling = self.layer_scale(layer, adapter)
        return alpha if math.isclose(scaling, alpha / r, rel_tol=1e-6) else scaling * r

    def layer_parameters(self, layer, adapter: str = ADAPTER) -> int:
        return sum(p.numel() for p in self.factors(layer, adapter))

    def zero_start(self, layer, adapter: str = ADAPTER) -> list:
        """The weights a fresh adapter starts at zero (peft's ``init_lora_weights=True``:
        up), so that it starts as no change. An optimizer's state can depend on it
        (Prodigy keeps a 0-dim p0 for an all-zero tensor): the memory plan asks here."""
        return [self.factors(layer, adapter)[1]]


KINDS = {k.name: k for k in (LoraKind(),)}
LORA = KINDS["lora"]
