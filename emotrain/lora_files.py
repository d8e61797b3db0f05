"""LoRA files: the kohya format, the diffusers/peft format, and the model in between.

Everything passes through one normalized structure, ``LoraWeights``: per target module,
named the diffusers way with its component in front (``unet.down_blocks.0.resnets.0.conv1``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2....``),
its down (A) and up (B) tensors and its alpha. Text-encoder names always carry
``text_model.``: that is how both file formats spell them, whichever transformers
version (some flatten CLIPTextModel and drop that level) built the model.

Kohya files name UNet modules the way Stability's SGM code does, because sd-scripts
trains SDXL on that UNet and ComfyUI/A1111 expect those names. The diffusers<->SGM
block mapping is derived from the UNet config, not tabulated, so any UNet with SDXL's
block structure (SDXL itself, the tiny model) maps correctly.

Diffusers files use peft's own key layout (``unet.<module>.lora_A.weight``) plus the
LoraConfig arguments in the header: diffusers 0.42 converts older layouts only when
the first key needs it, which silently drops attention LoRAs in a mixed file, and
without the header it takes alpha to be the rank.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import UserError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
KOHYA_PREFIX_OF = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # the header key diffusers reads LoraConfig arguments from
TEXT_MODEL = "text_model."


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
    source_format: str = ""  # "kohya" or "diffusers" when read from a file

    @property
    def components(self) -> tuple[str, ...]:
        present = {name.split(".", 1)[0] for name in self.modules}
        return tuple(c for c in COMPONENTS if c in present)

    def component(self, component: str) -> dict[str, LoraModule]:
        """The modules of one component, names without the component prefix."""
        prefix = component + "."
        return {n[len(prefix):]: m for n, m in self.modules.items() if n.startswith(prefix)}


# --------------------------------------------------------------------------------------
# diffusers <-> SGM names


RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
RESNET_FROM_SGM = {v: k for k, v in RESNET_TO_SGM.items()}
# Layers outside the block structure: never our targets, but other trainers' files have them.
UNET_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _cfg(config, key, default=None):
    try:
        value = config[key]
    except (KeyError, TypeError):
        value = getattr(config, key, default)
    return default if value is None else value


def sdxl_unet_config() -> dict:
    from .sdxl.meta import load_config
    return load_config("sdxl_unet")


def sgm_block_table(config=None) -> list[tuple[str, str, str]]:
    """(diffusers prefix, SGM prefix, kind) for every block of a UNet with SGM's layout:
    kind is "resnet", "attention" or "module" (a sampler conv, mapped whole).

    SGM numbers input blocks from 1 (0 is conv_in): each down level has layers_per_block
    ResNet(+attention) blocks, then one downsampler block unless it is the last level.
    Output blocks count from 0, layers_per_block + 1 per level, and the level's upsampler
    sits in its last block after the ResNet (index 1) or the attention (index 2)."""
    config = sdxl_unet_config() if config is None else config
    down_types = list(_cfg(config, "down_block_types"))
    up_types = list(_cfg(config, "up_block_types"))
    lpb = _cfg(config, "layers_per_block", 2)
    down_layers = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down_types)
    up_layers = [n + 1 for n in reversed(down_layers)]
    table = []
    idx = 1
    for i, kind in enumerate(down_types):
        for j in range(down_layers[i]):
            table.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet"))
            if "CrossAttn" in kind:
                table.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "attention"))
            idx += 1
        if i < len(down_types) - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", "module"))
            idx += 1
    mid = _cfg(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid:
        table.append(("mid_block.resnets.0", "middle_block.0", "resnet"))
        if "CrossAttn" in mid:
            table.append(("mid_block.attentions.0", "middle_block.1", "attention"))
            table.append(("mid_block.resnets.1", "middle_block.2", "resnet"))
        else:
            table.append(("mid_block.resnets.1", "middle_block.1", "resnet"))
    idx = 0
    for i, kind in enumerate(up_types):
        attn = "CrossAttn" in kind
        for j in range(up_layers[i]):
            table.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", "resnet"))
            if attn:
                table.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", "attention"))
            if j == up_layers[i] - 1 and i < len(up_types) - 1:
                table.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if attn else 1}.conv",
                              "module"))
            idx += 1
    return table


def _split_prefix(name: str, prefix: str) -> str | None:
    if name == prefix:
        return ""
    if name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return None


def unet_name_to_sgm(name: str, table) -> str:
    if name in UNET_TOP_LEVEL:
        return UNET_TOP_LEVEL[name]
    for diff, sgm, kind in table:
        rest = _split_prefix(name, diff)
        if rest is None:
            continue
        if kind == "module":
            if rest:
                break
            return sgm
        if kind == "resnet":
            if rest not in RESNET_TO_SGM:
                break
            rest = RESNET_TO_SGM[rest]
        return f"{sgm}.{rest}" if rest else sgm
    raise UserError(f"UNet module {name} has no place in the SGM layout kohya files use: "
                    "save in diffusers format, or pass the matching UNet config")


def unet_name_from_sgm(name: str, table) -> str | None:
    """SGM name -> diffusers name; None when it is not an SGM name at all."""
    for diff, sgm in UNET_TOP_LEVEL.items():
        if name == sgm:
            return diff
    best = None
    for diff, sgm, kind in table:
        rest = _split_prefix(name, sgm)
        if rest is not None and (best is None or len(sgm) > len(best[1])):
            best = (diff, sgm, kind, rest)
    if best is None:
        return None
    diff, _, kind, rest = best
    if kind == "module":
        return diff if not rest else None
    if kind == "resnet":
        rest = RESNET_FROM_SGM.get(rest)
        if rest is None:
            return None
    return f"{diff}.{rest}" if rest else diff


# Kohya names are module paths with every "." turned into "_"; these are the path
# components that themselves contain "_", so the dots can be put back.
_COMPOUND = {
    "input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "in_layers", "out_layers",
    "emb_layers", "skip_connection", "conv_shortcut", "time_emb_proj", "time_embed", "label_emb",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "conv_in", "conv_out", "conv_norm_out",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "text_projection",
}


def _undo_underscores(flat: str) -> str:
    parts = flat.split("_")
    out, i = [], 0
    while i < len(parts):
        for k in (3, 2, 1):
            token = "_".join(parts[i:i + k])
            if k == 1 or token in _COMPOUND:
                out.append(token)
                i += k
                break
    return ".".join(out)


# --------------------------------------------------------------------------------------
# reading


def _resolve_file(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / DIFFUSERS_WEIGHT_NAME).is_file():
            return p / DIFFUSERS_WEIGHT_NAME
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(f"LoRA folder {p} holds {len(files)} .safetensors files and no {DIFFUSERS_WEIGHT_NAME}: "
                            "pass the file itself")
        return files[0]
    if not p.is_file():
        raise UserError(f"LoRA file {p} does not exist: check the path")
    if p.suffix != ".safetensors":
        raise UserError(f"LoRA file {p} is not .safetensors (pickle formats are never loaded): "
                        "convert it to .safetensors")
    return p


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated, not safetensors at all, bad header: all one problem for the user
        raise UserError(f"LoRA file {p} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
                        "it is corrupt or not a safetensors file; re-save or re-download it") from None
    return tensors, header


def load_lora_file(path, unet_config=None) -> LoraWeights:
    """Read a kohya (SGM or diffusers-named) or diffusers/peft LoRA file, or a folder
    holding one. ``unet_config`` fixes the SGM block layout (default: SDXL's)."""
    p = _resolve_file(path)
    tensors, header = _read_safetensors(p)
    if not tensors:
        raise UserError(f"LoRA file {p} holds no tensors: it is not a LoRA")
    adapter_meta = header.pop(DIFFUSERS_METADATA_KEY, None)
    header.pop("format", None)
    keys = list(tensors)
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        weights = _parse_kohya(tensors, p, unet_config)
    elif any(".lora_A." in k or ".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k
             for k in keys):
        weights = _parse_diffusers(tensors, p, adapter_meta)
    else:
        raise UserError(f"LoRA file {p} has an unknown layout (first key {keys[0]!r}): "
                        "emotrain reads kohya LoRA and diffusers/peft LoRA files")
    weights.metadata = header
    return weights


def _unsupported(p, key):
    raise UserError(f"LoRA file {p} is not a plain LoRA (key {key!r} belongs to LyCORIS/DoRA or another "
                    "network type): only LoRA/LoCon files are supported")


def _parse_kohya(tensors, p, unet_config) -> LoraWeights:
    table = sgm_block_table(unet_config)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        base, _, kind = key.partition(".")
        if kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            _unsupported(p, key)
        groups.setdefault(base, {})[kind] = value
    modules = {}
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise UserError(f"LoRA file {p} is incomplete: {base} lacks its lora_down or lora_up weight; "
                            "re-save or re-download it")
        prefix = next(k for k in KOHYA_PREFIXES if base.startswith(k))
        component = KOHYA_PREFIXES[prefix]
        name = _undo_underscores(base[len(prefix):])
        if component == "unet":
            if name.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks", "out", "time_embed",
                                         "label_emb"):
                mapped = unet_name_from_sgm(name, table)
                if mapped is None:
                    raise UserError(f"LoRA file {p}: {base} is not a module of an SDXL UNet: "
                                    "the LoRA was made for another model architecture")
                name = mapped
        elif not name.startswith(TEXT_MODEL):
            name = TEXT_MODEL + name
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        _check_pair(p, base, down, up)
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        modules[f"{component}.{name}"] = LoraModule(down, up, alpha)
    return LoraWeights(modules, source_format="kohya")


def _check_pair(p, name, down, up):
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise UserError(f"LoRA file {p}: {name} has mismatched shapes down {tuple(down.shape)} / "
                        f"up {tuple(up.shape)}: the file is damaged")


_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
# The attention-processor spelling of older diffusers files.
_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _diffusers_module(key: str) -> tuple[str, str, str] | None:
    """-> (component, module name, down/up/alpha)."""
    for suffix, kind in _DIFFUSERS_SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    stem = stem.removeprefix("base_model.model.")
    component, _, name = stem.partition(".")
    if component not in COMPONENTS:
        component, name = "unet", stem  # bare UNet keys, as in a plain peft save of the UNet
    if suffix.startswith("_lora."):
        head, _, proc = name.rpartition(".")
        head = head.removesuffix(".processor")
        table = _PROCESSOR_NAMES if component == "unet" else _TEXT_PROCESSOR_NAMES
        if proc not in table:
            return None
        name = f"{head}.{table[proc]}"
    if component != "unet" and not name.startswith(TEXT_MODEL):
        name = TEXT_MODEL + name
    return component, name, kind


def _pattern_value(patterns: dict, name: str):
    # peft's own rule: a pattern matches a module whose name ends with it, at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _parse_diffusers(tensors, p, adapter_meta) -> LoraWeights:
    try:
        config = json.loads(adapter_meta) if adapter_meta else {}
    except json.JSONDecodeError:
        raise UserError(f"LoRA file {p} has a damaged {DIFFUSERS_METADATA_KEY} header: re-save the file") from None
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parsed = _diffusers_module(key)
        if parsed is None:
            if "dora" in key or "magnitude" in key or "lokr" in key:
                _unsupported(p, key)
            raise UserError(f"LoRA file {p} has an unknown key {key!r}: it is not a LoRA emotrain can read")
        component, name, kind = parsed
        groups.setdefault((component, name), {})[kind] = value
    modules = {}
    for (component, name), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise UserError(f"LoRA file {p} is incomplete: {component}.{name} lacks its down or up weight; "
                            "re-save or re-download it")
        down, up = parts["down"], parts["up"]
        _check_pair(p, f"{component}.{name}", down, up)
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"].item())
        elif f"{component}.r" in config:
            alpha = _pattern_value(config.get(f"{component}.alpha_pattern") or {}, name)
            if alpha is None:
                alpha = config.get(f"{component}.lora_alpha", config[f"{component}.r"])
            alpha = float(alpha)
            if config.get(f"{component}.use_rslora"):
                alpha = alpha * rank / math.sqrt(rank)  # scale alpha/sqrt(r) as alpha'/r
        else:
            alpha = float(rank)  # what diffusers assumes for a file without alphas
        modules[f"{component}.{name}"] = LoraModule(down, up, alpha)
    return LoraWeights(modules, source_format="diffusers")


# --------------------------------------------------------------------------------------
# writing


def _atomic_save(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> Path:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    return path


def _mode(values, default=None):
    return Counter(values).most_common(1)[0][0] if values else default


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_metadata(weights: LoraWeights) -> dict[str, str]:
    """The ss_*/modelspec header sd-scripts writes, describing what the file holds."""
    unet = weights.component("unet")
    # network_dim/alpha describe the UNet's linear layers (and 1x1 convs), as in sd-scripts;
    # a text-encoder-only file falls back to the text encoders'.
    linear = [m for m in unet.values() if not (m.is_conv and m.down.shape[-1] > 1)]
    linear = linear or [m for m in weights.modules.values() if not m.is_conv]
    conv = [m for m in unet.values() if m.is_conv and m.down.shape[-1] > 1]
    dim = _mode([m.rank for m in linear], _mode([m.rank for m in conv], 0))
    alpha = _mode([m.alpha for m in linear if m.rank == dim], float(dim))
    args = {}
    if conv:
        args["conv_dim"] = str(_mode([m.rank for m in conv]))
        args["conv_alpha"] = _fmt(_mode([m.alpha for m in conv]))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _fmt(alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_network_train_unet_only": str(not any(c != "unet" for c in weights.components)),
        "ss_network_train_text_encoder_only": str("unet" not in weights.components),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    }
    return meta


def _stringify(metadata: dict | None) -> dict[str, str]:
    out = {}
    for k, v in (metadata or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return out


def save_kohya(path, weights: LoraWeights, metadata: dict | None = None, unet_config=None,
               dtype: torch.dtype | None = None) -> Path:
    """Write ``weights`` as a kohya/sd-scripts LoRA (SGM names). ``metadata`` entries
    override the computed ss_* ones; non-string values are JSON-encoded."""
    path = Path(path).expanduser()
    table = sgm_block_table(unet_config)
    tensors = {}
    for full, m in weights.modules.items():
        component, _, name = full.partition(".")
        if component == "unet":
            flat = unet_name_to_sgm(name, table)
        else:
            flat = name if name.startswith(TEXT_MODEL) else TEXT_MODEL + name
        base = KOHYA_PREFIX_OF[component] + flat.replace(".", "_")
        down, up = (m.down, m.up) if dtype is None else (m.down.to(dtype), m.up.to(dtype))
        tensors[f"{base}.lora_down.weight"] = down
        tensors[f"{base}.lora_up.weight"] = up
        tensors[f"{base}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    if not tensors:
        raise UserError("there are no LoRA modules to save: the LoRA is empty")
    header = {**_stringify(_passthrough(weights.metadata)), **kohya_metadata(weights), **_stringify(metadata)}
    return _atomic_save(tensors, header, path)


def _passthrough(metadata: dict) -> dict:
    # A converted file keeps its training notes, not the other format's layout description.
    return {k: v for k, v in metadata.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}


def _model_name(component: str, name: str) -> str:
    """Module names as targets in a peft config: text-encoder names without ``text_model.``
    match both the flattened and the nested CLIP layout (peft matches on name endings)."""
    return name.removeprefix(TEXT_MODEL) if component != "unet" else name


def peft_config_kwargs(modules: dict[str, LoraModule], component: str) -> dict:
    """LoraConfig arguments reproducing these modules exactly: the commonest rank and alpha
    as defaults, the rest as exact-name patterns."""
    ranks = [m.rank for m in modules.values()]
    r = _mode(ranks)
    alpha = _mode([m.alpha for m in modules.values()])
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for name, m in sorted(modules.items()):
        target = _model_name(component, name)
        targets.append(target)
        if m.rank != r:
            rank_pattern[re.escape(target)] = m.rank
        if m.alpha != alpha:
            alpha_pattern[re.escape(target)] = m.alpha
    return {"r": r, "lora_alpha": alpha, "target_modules": targets, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


def lora_config_for(weights: LoraWeights, component: str = "unet"):
    """A peft LoraConfig that injects exactly the file's modules with its ranks and alphas
    (for continuing training from a file); None when the file has nothing for ``component``."""
    from peft import LoraConfig
    modules = weights.component(component)
    if not modules:
        return None
    return LoraConfig(init_lora_weights=True, **peft_config_kwargs(modules, component))


def save_diffusers(path, weights: LoraWeights, metadata: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``weights`` as a diffusers LoRA that ``StableDiffusionXLPipeline.load_lora_weights``
    loads whole. ``path`` is a folder (the file goes in as pytorch_lora_weights.safetensors)
    or a .safetensors file name."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_WEIGHT_NAME
    tensors, adapter_meta = {}, {}
    for component in weights.components:
        modules = weights.component(component)
        for name, m in modules.items():
            down, up = (m.down, m.up) if dtype is None else (m.down.to(dtype), m.up.to(dtype))
            tensors[f"{component}.{name}.lora_A.weight"] = down
            tensors[f"{component}.{name}.lora_B.weight"] = up
        for k, v in peft_config_kwargs(modules, component).items():
            adapter_meta[f"{component}.{k}"] = v
    if not tensors:
        raise UserError("there are no LoRA modules to save: the LoRA is empty")
    header = {**_stringify(_passthrough(weights.metadata)), **_stringify(metadata), "format": "pt",
              DIFFUSERS_METADATA_KEY: json.dumps(adapter_meta, sort_keys=True)}
    return _atomic_save(tensors, header, path)


def save_lora_file(path, weights: LoraWeights, format: str = "kohya", metadata: dict | None = None,
                   **kwargs) -> Path:
    if format == "kohya":
        return save_kohya(path, weights, metadata, **kwargs)
    if format == "diffusers":
        return save_diffusers(path, weights, metadata, **kwargs)
    raise UserError(f"unknown LoRA format {format!r}: use 'kohya' or 'diffusers'")


# --------------------------------------------------------------------------------------
# models


def _component_models(unet, text_encoders) -> dict[str, torch.nn.Module | None]:
    tes = list(text_encoders or ())
    tes += [None] * (2 - len(tes))
    return {"unet": unet, "text_encoder": tes[0], "text_encoder_2": tes[1]}


def _lora_layers(model: torch.nn.Module, component: str, adapter: str) -> dict[str, torch.nn.Module]:
    """Canonical name -> peft LoRA layer carrying ``adapter``."""
    nested = hasattr(model, "text_model")
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            if component != "unet" and not nested:
                name = TEXT_MODEL + name
            out[name] = module
    return out


def _layer_alpha(layer, adapter: str) -> float:
    r = layer.r[adapter]
    alpha = float(layer.lora_alpha[adapter])
    scaling = float(layer.scaling[adapter])
    # The effective scale is what the model computes; alpha is reported so alpha/rank equals it.
    return alpha if math.isclose(scaling, alpha / r, rel_tol=1e-6) else scaling * r


def lora_weights_from_model(unet, text_encoders=None, adapter: str = "default") -> LoraWeights:
    """The LoRA of a peft-injected UNet (and text encoders), copied out in float32."""
    modules = {}
    for component, model in _component_models(unet, text_encoders).items():
        if model is None:
            continue
        for name, layer in _lora_layers(model, component, adapter).items():
            down = layer.lora_A[adapter].weight.detach().float().clone()
            up = layer.lora_B[adapter].weight.detach().float().clone()
            modules[f"{component}.{name}"] = LoraModule(down, up, _layer_alpha(layer, adapter))
    return LoraWeights(modules)


def load_into_model(unet, text_encoders, weights: LoraWeights, adapter: str = "default") -> None:
    """Copy ``weights`` into a model whose LoRA was injected with the same targets, ranks
    and alphas (see ``lora_config_for``). Every module must match both ways."""
    models = _component_models(unet, text_encoders)
    for component, model in models.items():
        wanted = weights.component(component)
        if model is None and wanted:
            raise UserError(f"the LoRA file has {component}.{min(wanted)} but no {component} "
                            "was given to load it into")
    plan = []
    for component, model in models.items():
        if model is None:
            continue
        wanted = weights.component(component)
        layers = _lora_layers(model, component, adapter)
        extra = sorted(set(wanted) - set(layers))
        if extra:
            raise UserError(f"the LoRA file's {component}.{extra[0]} has no LoRA layer in the model: the file "
                            "was trained for other targets or another model; build the LoRA with lora_config_for")
        missing = sorted(set(layers) - set(wanted))
        if missing:
            raise UserError(f"the model's LoRA layer {component}.{missing[0]} is not in the LoRA file: the file "
                            "was trained for other targets; build the LoRA with lora_config_for")
        for name, m in sorted(wanted.items()):
            layer = layers[name]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if tuple(a.shape) != tuple(m.down.shape) or tuple(b.shape) != tuple(m.up.shape):
                raise UserError(f"{component}.{name}: the file's LoRA has shapes {tuple(m.down.shape)}/"
                                f"{tuple(m.up.shape)}, the model's {tuple(a.shape)}/{tuple(b.shape)}: the file "
                                "was trained on another model or with another rank")
            if not math.isclose(float(layer.scaling[adapter]), m.scale, rel_tol=1e-5):
                raise UserError(f"{component}.{name}: the file's alpha/rank is {m.scale:g}, the model's LoRA uses "
                                f"{float(layer.scaling[adapter]):g}: build the LoRA with lora_config_for")
            plan.append((a, m.down))
            plan.append((b, m.up))
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(param.dtype))
