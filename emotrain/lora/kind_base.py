"""What every adapter kind shares (``kinds.LoraKind`` and the LyCORIS kinds in
``lycoris.py`` build on it; it imports neither, so neither imports the other for it):
a live layer's scale and parameter count, its adapter copied out as a ``LoraModule``, and
the scale ``alpha / rank`` of a module. A kind supplies ``live_tensors``, ``layer_alpha``,
``module`` and ``rank``."""

from __future__ import annotations

from .weights import ADAPTER, LoraModule


class AdapterKind:
    name = ""
    network_module = "lycoris.kohya"  # sd-scripts' ss_network_module

    def after_inject(self, model, adapter: str = ADAPTER) -> None:
        """What peft's injection leaves to do (LoKr's scale of fully full modules)."""

    def layer_scale(self, layer, adapter: str = ADAPTER) -> float:
        return float(layer.scaling[adapter])

    def layer_parameters(self, layer, adapter: str = ADAPTER) -> int:
        return sum(p.numel() for p in self.live_tensors(layer, adapter).values())

    def module_from_layer(self, layer, adapter: str = ADAPTER) -> LoraModule:
        """The layer's adapter, copied out in float32."""
        t = {k: v.detach().float().clone() for k, v in self.live_tensors(layer, adapter).items()}
        return self.module(t, self.layer_alpha(layer, adapter), tuple(layer.get_base_layer().weight.shape))

    def scale(self, m: LoraModule) -> float:
        return m.alpha / self.rank(m)
