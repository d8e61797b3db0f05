"""LyCORIS' LoHa and LoKr as adapter kinds, trained through peft's implementations
(``LoHaConfig``, ``LoKrConfig``) and written with LyCORIS' tensor names, which peft's
layers already use and ComfyUI, A1111/Forge and sd-scripts (through LyCORIS) load.

The math, per module, in LyCORIS' definitions (``lycoris/modules/loha.py``, ``lokr.py``):

- LoHa: ``delta W = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha/rank``
  (Hadamard product), convolutions over the flattened (in, kh, kw) axis.
- LoKr: ``delta W = kron(w1, w2) * scale``, ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``,
  ``w2 = lokr_w2`` or ``lokr_w2_a @ lokr_w2_b``; ``scale = alpha/rank`` with rank the
  inner dimension of the decomposed factor, and 1 when both factors are full matrices
  (LyCORIS then ignores alpha). Each dimension is split by LyCORIS' ``factorization``
  (``--lokr-factor``, -1: the pair nearest its square root).

Not read: Tucker decompositions (``hada_t1``/``lokr_t2``, LyCORIS' ``use_tucker``).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from ..sdxl import weight_shape
from .formats.common import mode
from .kind_base import AdapterKind
from .weights import ADAPTER, LoraModule

FULL_RANK = 1 << 20  # a rank beyond any layer's size/2: peft's LoKr then keeps w2 a full matrix


def config_kwargs(rank, alpha, targets, conv_rank=None, conv_alpha=None, alpha_key="lora_alpha") -> dict:
    """peft config arguments of a fresh adapter on ``targets`` (sdxl.Targets): 3x3 convs at
    their own rank and alpha (``alpha_key``: LoraConfig's lora_alpha, LoHa/LoKr's alpha)."""
    patterns = {}
    if targets.conv_pattern is not None:
        patterns = dict(rank_pattern={targets.conv_pattern: rank if conv_rank is None else conv_rank},
                        alpha_pattern={targets.conv_pattern: alpha if conv_alpha is None else conv_alpha})
    return {"r": rank, alpha_key: alpha, "target_modules": targets.pattern, **patterns}


def exact_kwargs(modules: dict, peft_targets: dict[str, str], alpha_key: str, rank_of=None) -> dict:
    """peft config arguments reproducing ``modules`` (name -> LoraModule) exactly: the
    commonest rank and alpha as defaults, the rest as exact-name patterns.
    ``peft_targets``: module name -> the name peft matches."""
    rank_of = rank_of or (lambda m: m.rank)
    r = mode([rank_of(m) for m in modules.values()])
    alpha = mode([m.alpha for m in modules.values()])
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for name, m in sorted(modules.items()):
        target = peft_targets[name]
        targets.append(target)
        if rank_of(m) != r:
            rank_pattern[re.escape(target)] = rank_of(m)
        if m.alpha != alpha:
            alpha_pattern[re.escape(target)] = m.alpha
    return {"r": r, alpha_key: alpha, "target_modules": targets, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


class _Steady:
    """Mixed in before peft's LoHa/LoKr layer classes: their forward without peft's
    module-dropout test, which in training draws ``torch.rand(1)`` from the global RNG and
    compares it on the host, per layer and forward, even at module dropout 0 (and then
    leaves the adapter out when the draw is exactly 0.0). emotrain never sets peft's
    module dropout; where one is set, peft's forward runs. The sum is peft's:
    ``base(x) + delta(x)`` per active adapter, in the input's dtype. Without the test the
    step has no value-dependent branch, so the memory plan and the op count can trace it."""

    def forward(self, x, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self._available_adapters]
        if self.disable_adapters or self.merged or any(self.module_dropout[a] for a in active):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            result = result + self._get_delta_activations(adapter, x, *args, **kwargs)
        return result.to(x.dtype)


_STEADY: dict[type, type] = {}


def _steady(cls: type) -> type:
    if issubclass(cls, _Steady):
        return cls
    if cls not in _STEADY:
        _STEADY[cls] = type(f"Steady{cls.__name__}", (_Steady, cls), {})
    return _STEADY[cls]


class _LycorisKind(AdapterKind):
    """What LoHa and LoKr share: peft ParameterDicts named as LyCORIS' keys, alpha."""

    name = ""
    prefix = ""
    roles: tuple[str, ...] = ()
    tucker = ""  # the Tucker core's name, which emotrain neither trains nor reads
    diffusers_loads = False  # diffusers' load_lora_weights has no LoHa/LoKr

    def _config_class(self):
        raise NotImplementedError

    def _config_extra(self, **options) -> dict:
        return {}

    def peft_config(self, rank, alpha, targets, conv_rank=None, conv_alpha=None, **options):
        kwargs = config_kwargs(rank, alpha, targets, conv_rank, conv_alpha, alpha_key="alpha")
        return self._config_class()(init_weights=self._init, **kwargs, **self._config_extra(**options))

    def exact_config(self, modules: dict, peft_targets: dict[str, str], metadata: dict | None = None):
        return self._config_class()(init_weights=self._init, **self._exact_kwargs(modules, peft_targets, metadata))

    def _exact_kwargs(self, modules, peft_targets, metadata):
        return exact_kwargs(modules, peft_targets, "alpha")

    def owns_config(self, config) -> bool:
        return isinstance(config, self._config_class())

    def after_inject(self, model, adapter: str = ADAPTER) -> None:
        """The layers' forward without peft's per-layer module-dropout draw (``_Steady``)."""
        for layer in model.modules():
            if self.is_layer(layer, adapter):
                layer.__class__ = _steady(type(layer))

    # -- the live model ----------------------------------------------------------------

    def is_layer(self, module, adapter: str | None = ADAPTER) -> bool:
        first = getattr(module, self.roles[0], None)
        if not isinstance(first, torch.nn.ParameterDict):
            return False
        present = set().union(*(getattr(module, r).keys() for r in self.roles))
        return adapter in present if adapter else bool(present)

    def is_adapter_tensor(self, name: str) -> bool:
        return self.prefix in name

    def live_tensors(self, layer, adapter: str = ADAPTER) -> dict:
        return {r: getattr(layer, r)[adapter] for r in self.roles if adapter in getattr(layer, r)}

    def layer_alpha(self, layer, adapter: str = ADAPTER) -> float:
        return self.layer_scale(layer, adapter) * layer.r[adapter]

    def module(self, tensors: dict, alpha: float, shape=None) -> LoraModule:
        return LoraModule(None, None, float(alpha), kind=self.name, extra=dict(tensors),
                          shape=None if shape is None else tuple(shape))

    # -- files -------------------------------------------------------------------------

    def file_tensors(self, m: LoraModule) -> dict:
        return dict(m.extra)

    def owns_file(self, suffixes: set[str]) -> bool:
        return any(s.startswith(self.prefix) for s in suffixes)

    def from_file(self, parts: dict, alpha: float | None, name: str, where: str) -> LoraModule:
        unknown = sorted(set(parts) - set(self.roles))
        if self.tucker in parts:
            raise UserError(f"LoRA file {where}: {name} uses LyCORIS' Tucker decomposition ({self.tucker}), "
                            "which emotrain does not read: train it without use_tucker")
        if unknown:
            raise UserError(f"LoRA file {where}: {name} has the unknown key {unknown[0]!r} for a {self.name} "
                            "module: the file is damaged or of a newer LyCORIS algorithm")
        tensors = self._check_file(parts, name, where)
        out, flat_in = self._out_in(tensors)
        m = self.module(tensors, 0.0, weight_shape(name, out, flat_in))
        m.alpha = float(self.rank(m) or 1) if alpha is None else alpha
        return m

    def network_args(self, modules: list) -> dict:
        return {"algo": self.name}

    # -- the math ----------------------------------------------------------------------

    def is_conv(self, m: LoraModule) -> bool:
        return m.shape is not None and len(m.shape) == 4

    def kernel_size(self, m: LoraModule) -> int:
        return m.shape[-1] if self.is_conv(m) else 1

    def delta_shape(self, m: LoraModule) -> tuple:
        return tuple(m.shape) if m.shape is not None else self._out_in(m.extra)

    def delta(self, m: LoraModule, dtype, base=None):
        d = self._delta(m.extra, dtype) * self.scale(m)
        return d.reshape(self.delta_shape(m) if base is None else base.shape)


class LohaKind(_LycorisKind):
    """LoHa: two low-rank products multiplied element-wise (rank r reaches rank r²)."""

    name = "loha"
    description = "LoHa (LyCORIS' Hadamard product of two low-rank factors)"
    prefix = "hada_"
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    tucker = "hada_t1"
    _init = True  # peft's: kaiming factors, hada_w2_b zero (LyCORIS: normal, hada_w2_a zero)

    def _config_class(self):
        from peft import LoHaConfig
        return LoHaConfig

    def rank(self, m: LoraModule) -> int:
        return m.extra["hada_w1_b"].shape[0]

    def _check_file(self, parts, name, where):
        missing = [r for r in self.roles if r not in parts]
        if missing:
            raise UserError(f"LoRA file {where} is incomplete: {name} lacks its {missing[0]}; re-save or "
                            "re-download it")
        a1, b1, a2, b2 = (parts[r] for r in self.roles)
        if any(t.ndim != 2 for t in (a1, b1, a2, b2)) or a1.shape != a2.shape or b1.shape != b2.shape \
                or a1.shape[1] != b1.shape[0]:
            raise UserError(f"LoRA file {where}: {name} has mismatched LoHa shapes {tuple(a1.shape)}, "
                            f"{tuple(b1.shape)}, {tuple(a2.shape)}, {tuple(b2.shape)}: the file is damaged")
        return dict(parts)

    def _out_in(self, t) -> tuple[int, int]:
        return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]

    def _delta(self, t, dtype):
        w = {k: v.to(dtype) for k, v in t.items()}
        return (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])


class LokrKind(_LycorisKind):
    """LoKr: a Kronecker product of a small full matrix and a (low-rank) larger one."""

    name = "lokr"
    description = "LoKr (LyCORIS' Kronecker product of two factors)"
    prefix = "lokr_"
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    tucker = "lokr_t2"
    _init = "lycoris"  # LyCORIS': w1 kaiming, w2 (or lokr_w2_b) zero

    def _config_class(self):
        from peft import LoKrConfig
        return LoKrConfig

    def _config_extra(self, factor: int = -1, full_matrix: bool = False, **options) -> dict:
        return {"decompose_factor": factor}

    def peft_config(self, rank, alpha, targets, conv_rank=None, conv_alpha=None, factor=-1, full_matrix=False,
                    **options):
        if full_matrix:  # every w2 full; the scale is then 1 (LyCORIS' full_matrix)
            rank = FULL_RANK
            conv_rank = None if conv_rank is None else FULL_RANK
        return super().peft_config(rank, alpha, targets, conv_rank, conv_alpha, factor=factor)

    def after_inject(self, model, adapter: str = ADAPTER) -> None:
        """LyCORIS' scale of a module whose factors are both full is 1 whatever alpha (peft
        would use alpha/r); and a --lokr-factor must divide every layer it splits."""
        super().after_inject(model, adapter)
        for name, layer in model.named_modules():
            if not self.is_layer(layer, adapter):
                continue
            t = self.live_tensors(layer, adapter)
            if "lokr_w1" in t and "lokr_w2" in t:
                layer.scaling[adapter] = 1.0

    def check_factor(self, model, factor: int, adapter: str = ADAPTER) -> None:
        if factor <= 0:
            return
        for name, layer in model.named_modules():
            if self.is_layer(layer, adapter):
                w = layer.get_base_layer().weight
                for dim in w.shape[:2]:
                    if dim % factor or factor * factor > dim:
                        raise UserError(f"lokr_factor: {factor} does not split {name} ({dim} channels) as LyCORIS "
                                        "does (it must divide every adapted layer's channel counts and be at most "
                                        "their square root): use -1 (LyCORIS' default) or a smaller power of two")

    def layer_alpha(self, layer, adapter: str = ADAPTER) -> float:
        if layer.r[adapter] >= FULL_RANK or self._both_full(self.live_tensors(layer, adapter)):
            return float(layer.alpha[adapter])  # ignored by every reader: the scale is 1
        return super().layer_alpha(layer, adapter)

    @staticmethod
    def _both_full(t) -> bool:
        return "lokr_w1" in t and "lokr_w2" in t

    def rank(self, m: LoraModule) -> int:
        """The inner dimension of the decomposed factor; 0 when both are full matrices."""
        t = m.extra
        if "lokr_w2_a" in t:
            return t["lokr_w2_a"].shape[1]
        return t["lokr_w1_a"].shape[1] if "lokr_w1_a" in t else 0

    def scale(self, m: LoraModule) -> float:
        return 1.0 if self._both_full(m.extra) else m.alpha / self.rank(m)

    def _factors(self, t, dtype=None):
        cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))
        w1 = cast(t["lokr_w1"]) if "lokr_w1" in t else cast(t["lokr_w1_a"]) @ cast(t["lokr_w1_b"])
        w2 = cast(t["lokr_w2"]) if "lokr_w2" in t else cast(t["lokr_w2_a"]) @ cast(t["lokr_w2_b"])
        return w1, w2

    def _check_file(self, parts, name, where):
        ok1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
        ok2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
        if not (ok1 and ok2):
            raise UserError(f"LoRA file {where} is incomplete: {name} lacks its lokr_w1 or lokr_w2 factor; "
                            "re-save or re-download it")
        try:
            self._factors(parts)
        except RuntimeError:
            raise UserError(f"LoRA file {where}: {name} has mismatched LoKr shapes: the file is damaged") from None
        return dict(parts)

    def _out_in(self, t) -> tuple[int, int]:
        a, c = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:  # (b, d) or, for a convolution, (b, d, kh, kw)
            b, d = t["lokr_w2"].shape[0], t["lokr_w2"][0].numel()
        else:
            b, d = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1]
        return a * b, c * d

    def _delta(self, t, dtype):
        w1, w2 = self._factors(t, dtype)
        while w1.ndim < w2.ndim:
            w1 = w1[..., None]
        return torch.kron(w1, w2)

    def network_args(self, modules: list) -> dict:
        full = all(self._both_full(m.extra) for m in modules)
        return {"algo": "lokr", "factor": str(self._factor(modules)), **({"full_matrix": "True"} if full else {})}

    def _factor(self, modules) -> int:
        """The --lokr-factor that gives every module its w1 shape (LyCORIS' factorization)."""
        from peft.tuners.lokr.layer import factorization
        shapes = [(tuple(self._factors(m.extra)[0].shape[:2]), m.shape) for m in modules if m.shape is not None]
        candidates = [-1] + sorted({d for (w1, _) in shapes for d in w1})
        for f in candidates:
            if all(factorization(s[0], f)[0] == w1[0] and factorization(s[1], f)[0] == w1[1] for w1, s in shapes):
                return f
        raise UserError("the LoKr file's factors follow no single --lokr-factor: emotrain can merge and convert "
                        "it, but not continue training from it")

    def _exact_kwargs(self, modules, peft_targets, metadata):
        def rank_of(m):
            return FULL_RANK if "lokr_w2" in m.extra else self.rank(m)
        kwargs = exact_kwargs(modules, peft_targets, "alpha", rank_of)
        return {**kwargs, "decompose_factor": self._factor(list(modules.values()))}
