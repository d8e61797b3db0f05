"""The adapter kinds, one registry entry each (``KINDS``).

An adapter kind says in one place everything the rest of emotrain asks of it: how it is
put into a model (its peft config for a run's targets, ranks and alphas, or one that
reproduces a file exactly), what its tensors are called in the live model, in a
kohya/LyCORIS file and in a diffusers file, how its weight delta is computed (merge,
convert, bake: ``LoraModule.delta``), and how many parameters a layer adds (vram).

``lora`` (LoRA on linear layers and 1x1 convs, LoCon on 3x3 convs) is here; DoRA, LoHa
and LoKr (LyCORIS' algorithms, through peft's implementations) are in ``lycoris.py``; what
they all share, in ``kind_base.py``.
Injection (inject.py), the live model (live.py), the file formats (formats/), stacking and
the memory plan go through the registry. Only this package knows peft's tensor names.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..sdxl import Targets
from .kind_base import AdapterKind
from .lycoris import LohaKind, LokrKind, config_kwargs, exact_kwargs
from .weights import ADAPTER, LoraModule, _KINDS


class LoraKind(AdapterKind):
    """LoRA: ``delta W = alpha/rank * up @ down`` (a 1x1 conv after a kxk conv for
    convolutions); peft's ``LoraConfig``, kohya's ``lora_down``/``lora_up``/``alpha``."""

    name = "lora"
    description = "LoRA (LoCon on 3x3 convolutions), sd-scripts' networks.lora"
    network_module = "networks.lora"  # sd-scripts' ss_network_module
    kohya_parts = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
    diffusers_parts = {"lora_A.weight": "down", "lora_B.weight": "up"}  # peft's layout
    live_down, live_up = "lora_A", "lora_B"  # a peft layer's ModuleDicts of the factors
    diffusers_loads = True  # whether diffusers' load_lora_weights takes this kind (the twin file)
    file_parts = ("lora_down.weight", "lora_up.weight")

    def is_up(self, param_name: str) -> bool:
        """A live parameter of an up (B) factor: what LoRA+ trains at lr x ratio."""
        return f".{self.live_up}." in param_name

    # -- injection ---------------------------------------------------------------------

    def peft_config(self, rank: int, alpha: float, targets: Targets, conv_rank: int | None = None,
                    conv_alpha: float | None = None, **options):
        """The peft config of a fresh adapter on ``targets`` (3x3 convs at their own rank)."""
        from peft import LoraConfig
        return LoraConfig(init_lora_weights=True, **self.config_kwargs(rank, alpha, targets, conv_rank, conv_alpha))

    config_kwargs = staticmethod(config_kwargs)

    def exact_config_kwargs(self, modules: dict, peft_targets: dict[str, str]) -> dict:
        """LoraConfig arguments reproducing ``modules`` (name -> LoraModule) exactly (see
        ``lycoris.exact_kwargs``)."""
        return exact_kwargs(modules, peft_targets, "lora_alpha")

    def exact_config(self, modules: dict, peft_targets: dict[str, str], metadata: dict | None = None):
        from peft import LoraConfig
        return LoraConfig(init_lora_weights=True, **self.exact_config_kwargs(modules, peft_targets))

    def install_forward(self, model) -> int:
        """The fused forward under mixed precision (fast.py) on the model's plain layers."""
        from .fast import install
        return install(model, ADAPTER)

    def owns_config(self, config) -> bool:
        from peft import LoraConfig
        return isinstance(config, LoraConfig) and not config.use_dora

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

    def live_tensors(self, layer, adapter: str = ADAPTER) -> dict:
        """The layer's trainable tensors by role (``LoraModule.tensors``' names)."""
        down, up = self.factors(layer, adapter)
        return {"down": down, "up": up}

    def layer_alpha(self, layer, adapter: str = ADAPTER) -> float:
        """The alpha that, over the layer's rank, gives the scale the model computes."""
        r = layer.r[adapter]
        alpha = float(layer.lora_alpha[adapter])
        scaling = self.layer_scale(layer, adapter)
        return alpha if math.isclose(scaling, alpha / r, rel_tol=1e-6) else scaling * r

    def module(self, tensors: dict, alpha: float, shape=None) -> LoraModule:
        return LoraModule(tensors["down"], tensors["up"], alpha)

    # -- files -------------------------------------------------------------------------

    def file_tensors(self, m: LoraModule) -> dict:
        """kohya/LyCORIS key suffix -> tensor (alpha is written by the format)."""
        return {"lora_down.weight": m.down, "lora_up.weight": m.up}

    def owns_file(self, suffixes: set[str]) -> bool:
        return "lora_down.weight" in suffixes and "dora_scale" not in suffixes

    def from_file(self, parts: dict, alpha: float | None, name: str, where: str) -> LoraModule:
        """A module from its kohya/LyCORIS tensors (suffix -> tensor); ``name``: canonical."""
        unknown = sorted(set(parts) - set(self.file_parts))
        if unknown:
            raise UserError(f"LoRA file {where}: {name} has the key {unknown[0]!r}, which a {self.name} module "
                            "does not have (LyCORIS' Tucker LoCon, or another network type): emotrain reads "
                            f"{', '.join(KINDS)} modules")
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise UserError(f"LoRA file {where} is incomplete: {name} lacks its lora_down.weight or "
                            "lora_up.weight; re-save or re-download it")
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA file {where}: {name} has mismatched shapes down {tuple(down.shape)} / "
                            f"up {tuple(up.shape)}: the file is damaged")
        return self.module({"down": down, "up": up, **{k: v for k, v in parts.items() if "." not in k}},
                           float(down.shape[0]) if alpha is None else alpha)

    def network_args(self, modules: list) -> dict:
        """ss_network_args entries beyond conv_dim/conv_alpha."""
        return {}

    # -- the math ----------------------------------------------------------------------

    def rank(self, m: LoraModule) -> int:
        return m.down.shape[0]

    def is_conv(self, m: LoraModule) -> bool:
        return m.down.ndim == 4

    def kernel_size(self, m: LoraModule) -> int:
        return m.down.shape[-1] if m.down.ndim == 4 else 1

    def delta_shape(self, m: LoraModule) -> tuple:
        return (m.up.shape[0], *m.down.shape[1:])

    def delta(self, m: LoraModule, dtype, base=None):
        """The change to the base weight, shaped like it. A 1x1 conv after a kxk conv is
        one kxk conv whose kernel is up @ down over the flattened (in, kh, kw) axis."""
        down, up = m.down.to(dtype), m.up.to(dtype)
        d = up.flatten(1) @ down.flatten(1)
        return (self.scale(m) * d).reshape(up.shape[0], *down.shape[1:])

    def zero_start(self, layer, adapter: str = ADAPTER) -> list:
        """The weights a fresh adapter starts at zero (peft's ``init_lora_weights=True``:
        up), so that it starts as no change. An optimizer's state can depend on it
        (Prodigy keeps a 0-dim p0 for an all-zero tensor): the memory plan asks here."""
        return [self.factors(layer, adapter)[1]]


class DoraKind(LoraKind):
    """DoRA: LoRA on the direction, a trained magnitude per output channel (LyCORIS'
    ``dora_wd`` with its default ``wd_on_out``; peft's ``use_dora``, the same axis):
    ``W' = dora_scale * (W + delta_lora) / ||W + delta_lora||``, the norm over each output
    channel's row. Files: the LoRA's keys plus ``dora_scale`` of shape (out, 1[, 1, 1])."""

    name = "dora"
    description = "DoRA (weight-decomposed LoRA: LyCORIS' dora_wd, peft's use_dora)"
    network_module = "lycoris.kohya"
    diffusers_loads = True  # through peft's use_dora (the twin's lora_magnitude_vector)
    live_magnitude = "lora_magnitude_vector"
    file_parts = ("lora_down.weight", "lora_up.weight", "dora_scale")

    def peft_config(self, rank, alpha, targets, conv_rank=None, conv_alpha=None, **options):
        from peft import LoraConfig
        return LoraConfig(init_lora_weights=True, use_dora=True,
                          **self.config_kwargs(rank, alpha, targets, conv_rank, conv_alpha))

    def exact_config(self, modules, peft_targets, metadata=None):
        from peft import LoraConfig
        return LoraConfig(init_lora_weights=True, use_dora=True, **self.exact_config_kwargs(modules, peft_targets))

    def owns_config(self, config) -> bool:
        from peft import LoraConfig
        return isinstance(config, LoraConfig) and bool(config.use_dora)

    def is_layer(self, module, adapter: str | None = ADAPTER) -> bool:
        mags = getattr(module, self.live_magnitude, None)
        return super().is_layer(module, adapter) and mags is not None and (adapter in mags if adapter else len(mags) > 0)

    def is_adapter_tensor(self, name: str) -> bool:
        return "lora_" in name

    def live_tensors(self, layer, adapter: str = ADAPTER) -> dict:
        return {**super().live_tensors(layer, adapter), "dora_scale": getattr(layer, self.live_magnitude)[adapter].weight}

    def module(self, tensors: dict, alpha: float, shape=None) -> LoraModule:
        down = tensors["down"]
        scale = tensors["dora_scale"].reshape(-1, *[1] * (down.ndim - 1))  # LyCORIS' (out, 1[, 1, 1])
        return LoraModule(down, tensors["up"], alpha, kind=self.name, extra={"dora_scale": scale})

    def file_tensors(self, m: LoraModule) -> dict:
        return {**super().file_tensors(m), "dora_scale": m.extra["dora_scale"]}

    def owns_file(self, suffixes: set[str]) -> bool:
        return "lora_down.weight" in suffixes and "dora_scale" in suffixes

    def network_args(self, modules: list) -> dict:
        return {"algo": "lora", "dora_wd": "True"}

    def delta(self, m: LoraModule, dtype, base=None):
        if base is None:
            raise UserError("a DoRA's change depends on the base model's weights: merge it into a model "
                            "(emotrain merge --model) instead")
        w = base.to(dtype)
        merged = w + super().delta(m, dtype)
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1)) + torch.finfo(dtype).eps
        return merged * (m.extra["dora_scale"].to(dtype) / norm) - w


def _register(*kinds) -> dict:
    for k in kinds:
        _KINDS[k.name] = k
    return _KINDS


KINDS = _register(LoraKind(), DoraKind(), LohaKind(), LokrKind())
LORA = KINDS["lora"]
NAMES = tuple(KINDS)


def kind_of_layer(module, adapter: str | None = ADAPTER):
    """The kind whose adapter ``module`` carries, or None (DoRA before LoRA: it is one)."""
    for name in ("dora", "loha", "lokr", "lora"):
        if KINDS[name].is_layer(module, adapter):
            return KINDS[name]
    return None


def kind_of_config(config):
    return next(k for k in KINDS.values() if k.owns_config(config))


def kind_of_file(suffixes: set[str]):
    return next((k for k in KINDS.values() if k.owns_file(suffixes)), None)


def is_adapter_tensor(name: str) -> bool:
    return any(k.is_adapter_tensor(name) for k in KINDS.values())
