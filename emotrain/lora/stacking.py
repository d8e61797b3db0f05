"""Stacking LoRAs: baking them into a model, and combining several into one LoRA.

A LoRA's change to a weight is ``weight * alpha/rank * up @ down`` (for convolutions,
over the flattened in-channel x kernel axis: a 1x1 conv after a kxk conv is one kxk
conv). Every function here works on that delta, so a ``:0.5`` stack entry is half the
change whatever the file's alpha, rank or format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import sdxl
from ..disk.atomic import atomic_path
from ..errors import UserError
from ..options import parse_lora_spec
from .formats import load_lora_file
from .weights import LoraModule, LoraWeights

WeightedLoras = list[tuple[LoraWeights, float]]


def load_weighted(specs, unet_config=None) -> WeightedLoras:
    """``["a.safetensors:0.7", "b/"]`` -> [(LoraWeights, 0.7), (LoraWeights, 1.0)]."""
    out = []
    for spec in specs:
        if isinstance(spec, tuple):
            path, weight = spec
        else:
            path, weight = parse_lora_spec(str(spec))
        out.append((load_lora_file(path, unet_config), float(weight)))
    return out


# --------------------------------------------------------------------------------------
# into the base weights


@torch.no_grad()
def merge_into_base(model, loras: WeightedLoras) -> None:
    """Add ``weight * delta`` of every LoRA to the base weights, in place. ``model`` is an
    SDXL (emotrain.sdxl.SDXL or a pipeline) or a (unet, text_encoders) pair."""
    targets = sdxl.component_models(model)
    updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for weights, scale in loras:
        for full, m in weights.modules.items():
            component, _, name = full.partition(".")
            target = targets.get(component)
            if target is None:
                raise UserError(f"the LoRA has {full} but no {component} was given to merge it into")
            weight = sdxl.base_weight(target, component, name)
            if m.delta_numel != weight.numel():
                raise UserError(f"{full}: the LoRA changes a {tuple(m.delta_shape)} weight, the model's is "
                                f"{tuple(weight.shape)}: the LoRA was made for another model")
            delta = m.delta(torch.float32, base=weight.float())  # DoRA's change depends on the base weight
            if tuple(delta.shape) != tuple(weight.shape):
                raise UserError(f"{full}: the LoRA changes a {tuple(delta.shape)} weight, the model's is "
                                f"{tuple(weight.shape)}: the LoRA was made for another model")
            # Sum every LoRA's change in float32 first and round to the weight's dtype once.
            acc = updates.get(id(weight))
            total = scale * delta.to(weight.device) + (acc[1] if acc else 0)
            updates[id(weight)] = (weight, total)
    for weight, total in updates.values():
        weight.copy_((weight.float() + total).to(weight.dtype))


def apply_base_loras(unet, text_encoders, loras: WeightedLoras) -> None:
    """For stacked training: bake the base LoRAs into the frozen weights, before the new
    LoRA is injected, so the new one learns on top of them at no extra cost per step."""
    merge_into_base((unet, text_encoders), loras)


def save_merged_pipeline(model_source: str, loras: WeightedLoras, output_dir, dtype: torch.dtype | None = None) -> Path:
    """Load ``model_source`` (anything --model accepts), bake ``loras`` in and write a
    diffusers SDXL folder. Written next to ``output_dir`` under a temporary name and
    renamed into place, so a crash never leaves half a model under the real name."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"output {output_dir} already exists: remove it or choose another folder")
    pipe, _ = sdxl.load_pipeline(model_source)
    merge_into_base(pipe, loras)
    if dtype is not None:
        pipe.to(dtype=dtype)
    with atomic_path(output_dir, directory=True) as tmp:  # replaces an empty folder
        pipe.save_pretrained(tmp, safe_serialization=True)
    return output_dir


# --------------------------------------------------------------------------------------
# one LoRA from several


@dataclass
class CombineReport:
    """Relative Frobenius error ||combined delta - exact delta|| / ||exact delta|| that a
    rank reduction introduced, per module and over all modules together."""
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    exact: bool = True

    def as_dict(self) -> dict:
        return {"exact": self.exact, "overall_relative_error": self.overall, "max_relative_error": self.max_error,
                "modules": {n: {"rank": self.ranks[n], "relative_error": self.errors[n]} for n in self.ranks}}

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def summary(self) -> str:
        if self.exact:
            return f"exact combine: {len(self.ranks)} modules, ranks {min(self.ranks.values(), default=0)}-" \
                   f"{max(self.ranks.values(), default=0)}, no error"
        worst = max(self.errors, key=self.errors.get) if self.errors else "-"
        return (f"SVD combine: {len(self.ranks)} modules, overall relative error {self.overall:.3e}, "
                f"worst {self.max_error:.3e} ({worst})")


def _parts(loras: WeightedLoras) -> dict[str, list[tuple[LoraModule, float]]]:
    by_module: dict[str, list[tuple[LoraModule, float]]] = {}
    for weights, scale in loras:
        for name, m in weights.modules.items():
            by_module.setdefault(name, []).append((m, scale))
    for name, parts in by_module.items():
        shapes = {tuple(m.delta_shape) for m, _ in parts}
        if len(shapes) > 1:
            raise UserError(f"{name} has different shapes in the LoRAs being combined ({sorted(shapes)}): "
                            "they were made for different models")
    order = {c: i for i, c in enumerate(sdxl.COMPONENTS)}
    return dict(sorted(by_module.items(), key=lambda kv: (order[kv[0].split(".", 1)[0]], kv[0])))


def _stacked(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated factors of the weighted sum: up (out, R) with the scales folded in,
    down (R, in, ...). up @ down is the exact combined delta."""
    down = torch.cat([m.down.float() for m, _ in parts], dim=0)
    up = torch.cat([(w * m.scale) * m.up.float() for m, w in parts], dim=1)
    return up, down


def combine(loras: WeightedLoras, rank: int | None = None, conv_rank: int | None = None
            ) -> tuple[LoraWeights, CombineReport]:
    """One LoRA equal to the weighted sum of ``loras``. Without ``rank`` it is exact: ranks
    add up (down factors stacked, up factors side by side with the scales folded in, alpha
    = the new rank). With ``rank`` each module is refactored by SVD to at most that rank
    (``conv_rank`` for 3x3 convolutions) and the report gives the error it introduced."""
    if rank is not None and rank < 1 or conv_rank is not None and conv_rank < 1:
        raise UserError("the combined rank must be at least 1")
    if not loras:
        raise UserError("no LoRAs to combine")
    kinds = sorted({k for weights, _ in loras for k in weights.kinds})
    if "dora" in kinds:
        raise UserError("a DoRA's change depends on the base model's weights, so DoRA files cannot be combined "
                        "into one file: merge them into a model (emotrain merge --model M) instead")
    if rank is None and kinds not in ([], ["lora"]):
        raise UserError(f"{' and '.join(kinds)} files cannot be combined into one exactly (a sum of LoHa/LoKr "
                        "changes is no LoHa/LoKr): pass --rank N to compress the summed change to a plain LoRA by "
                        "SVD (the error is reported), or merge them into a model (--model)")
    report = CombineReport(exact=rank is None)
    modules: dict[str, LoraModule] = {}
    lost_sq = total_sq = 0.0
    for name, parts in _parts(loras).items():
        lora_only = all(m.kind == "lora" for m, _ in parts)
        up, down = _stacked(parts) if lora_only else (None, None)
        if rank is None:
            r = down.shape[0]
            modules[name] = LoraModule(down.contiguous(), up.contiguous(), float(r))
            report.ranks[name] = r
            report.errors[name] = 0.0
            continue
        conv3x3 = parts[0][0].is_conv3x3
        target = conv_rank if (conv_rank is not None and conv3x3) else rank
        new_up, new_down, lost, total = _refactor(up, down, target) if lora_only else _dense_refactor(parts, target)
        r = new_down.shape[0]
        modules[name] = LoraModule(new_down, new_up, float(r))
        report.ranks[name] = r
        report.errors[name] = math.sqrt(lost / total) if total > 0 else 0.0
        lost_sq += lost
        total_sq += total
    report.overall = math.sqrt(lost_sq / total_sq) if total_sq > 0 else 0.0
    return LoraWeights(modules, metadata={}), report


def _dense_refactor(parts, rank: int):
    """Best rank-``rank`` LoRA factors of the summed change of modules of any kind (LoHa,
    LoKr: no low-rank form to work on), by SVD of the dense (out, in x kh x kw) delta."""
    shape = tuple(parts[0][0].delta_shape)
    total = sum(w * m.delta(torch.float64).reshape(shape[0], -1) for m, w in parts)
    us, s, vh = torch.linalg.svd(total, full_matrices=False)
    keep = max(1, min(rank, int(s.numel())))
    root = s[:keep].sqrt()
    new_up = (us[:, :keep] * root).float().reshape(shape[0], keep, *[1] * (len(shape) - 2)).contiguous()
    new_down = (root[:, None] * vh[:keep]).float().reshape(keep, *shape[1:]).contiguous()
    return new_up, new_down, float((s[keep:] ** 2).sum()), float((s ** 2).sum())


def _refactor(up: torch.Tensor, down: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of up @ down (Eckart-Young), without forming the full
    matrix: QR both factors, SVD the small R x R core. Returns (up, down, discarded
    squared singular values, total squared singular values)."""
    out, big_r = up.shape[0], down.shape[0]
    u2 = up.reshape(out, big_r).double()
    d2 = down.reshape(big_r, -1).double()
    q1, r1 = torch.linalg.qr(u2)
    q2, r2 = torch.linalg.qr(d2.T)
    us, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    keep = max(1, min(rank, int(s.numel())))
    root = s[:keep].sqrt()
    # Split the singular values evenly between the factors: same convention as training
    # keeps their magnitudes comparable if training continues from the result.
    new_up = (q1 @ us[:, :keep]) * root
    new_down = root[:, None] * (vh[:keep] @ q2.T)
    lost = float((s[keep:] ** 2).sum())
    total = float((s ** 2).sum())
    new_up = new_up.float().reshape(out, keep, *up.shape[2:]).contiguous()
    new_down = new_down.float().reshape(keep, *down.shape[1:]).contiguous()
    return new_up, new_down, lost, total
