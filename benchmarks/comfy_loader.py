"""ComfyUI's own LoRA loader on emotrain's files (issue 17): every key of a kohya/LyCORIS
file must be mapped by ComfyUI's key maps, and the weight change ComfyUI applies must
equal emotrain's (``LoraModule.delta``, the change the kind tests check against LyCORIS'
formula and the trained model).

ComfyUI's code used, unchanged, from a snapshot (a folder holding ``comfy/``; the
environment variable ``EMOTRAIN_COMFYUI`` or /work/comfyui-snapshot):
``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` (file key -> model key),
``comfy.utils.unet_to_diffusers`` (diffusers' UNet names -> ComfyUI's), ``comfy.lora.load_lora``
(which weight adapter takes each module: ``comfy/weight_adapter`` lora, loha, lokr and DoRA's
``weight_decompose``; it logs "lora key not loaded" for every key it left) and
``comfy.lora.calculate_weight`` (the patched weight).

What is not ComfyUI's: ``comfy.model_base`` is replaced by an empty module before import
(it pulls in every model ComfyUI knows, torchvision among them; ``comfy.lora`` uses it only
for ``isinstance`` tests against non-SDXL models, which are all false here), ComfyUI's
``--cpu`` switch is set (no CUDA here), and the model handed to the key maps is a small
object with ComfyUI's state-dict names (``diffusion_model.<SGM name>`` through
``unet_to_diffusers``; ``clip_l.transformer.`` / ``clip_g.transformer.`` + the text
encoders' transformers names, as ComfyUI's SDXL CLIP holds them) and the ``unet_config``
``unet_to_diffusers`` reads, derived from the diffusers config (``comfy_unet_config``).
The einops package must be installed (comfy.utils imports it).

    PYTHONPATH=$PWD python benchmarks/comfy_loader.py [--kinds lora,dora,loha,lokr] [--steps 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

DEFAULT_SNAPSHOT = Path("/work/comfyui-snapshot")
KINDS = ("lora", "dora", "loha", "lokr")
EXTRA = {"lokr": ("--lokr-factor", "4")}  # w1 4x4 and a decomposed w2 on the wider layers, full on the narrow


def snapshot_root() -> Path | None:
    """The ComfyUI snapshot to use, or None when there is none (or einops is missing)."""
    root = Path(os.environ.get("EMOTRAIN_COMFYUI") or DEFAULT_SNAPSHOT)
    if not (root / "comfy" / "lora.py").is_file():
        return None
    try:
        import einops  # noqa: F401  (comfy.utils needs it)
    except ImportError:
        return None
    return root


def snapshot_commit(root: Path) -> str:
    f = root / "COMMIT"
    return f.read_text().strip() if f.is_file() else "unknown"


def import_comfy(root: Path):
    """ComfyUI's comfy.lora and comfy.utils, with comfy.model_base left empty (see above)."""
    if "comfy.lora" in sys.modules:
        return sys.modules["comfy.lora"], sys.modules["comfy.utils"]
    sys.path.insert(0, str(root))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # ComfyUI's own switch: model_management asks CUDA otherwise
    empty = types.ModuleType("comfy.model_base")

    def model_class(name):  # every model class ComfyUI names: a type no object here is
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {})
        setattr(empty, name, cls)
        return cls

    empty.__getattr__ = model_class
    sys.modules["comfy.model_base"] = empty
    import comfy
    comfy.model_base = empty
    import comfy.lora
    import comfy.utils
    return comfy.lora, comfy.utils


def comfy_unet_config(cfg) -> dict:
    """The SGM-style ``unet_config`` ComfyUI keeps for a diffusers UNet config (the fields
    ``unet_to_diffusers`` reads): resnets per level, their transformer depths in input
    order, the output blocks' (one more resnet per level), the middle's."""
    levels = len(cfg.block_out_channels)
    per = cfg.layers_per_block
    depth = cfg.transformer_layers_per_block
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    has_attn = ["CrossAttn" in t for t in cfg.down_block_types]
    transformer_depth = [depth[i] if has_attn[i] else 0 for i in range(levels) for _ in range(per)]
    up_depth = list(reversed(depth))
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    output = [up_depth[i] if up_attn[i] else 0 for i in range(levels) for _ in range(per + 1)][::-1]  # popped
    return {"num_res_blocks": [per] * levels, "channel_mult": [c // cfg.block_out_channels[0]
                                                              for c in cfg.block_out_channels],
            "transformer_depth": transformer_depth, "transformer_depth_output": output,
            "transformer_depth_middle": depth[-1]}


class _Model:
    """What ComfyUI's key maps read of a model: ``state_dict()`` and ``model_config.unet_config``."""

    def __init__(self, state: dict, unet_config: dict | None = None):
        self._state = state
        self.model_config = types.SimpleNamespace(unet_config=unet_config or {})

    def state_dict(self):
        return self._state


def comfy_model(sdxl_model, comfy_utils):
    """ComfyUI's state-dict names -> the tiny model's tensors, and the UNet's unet_config."""
    unet_config = comfy_unet_config(sdxl_model.unet.config)
    unet_sd = sdxl_model.unet.state_dict(keep_vars=True)
    state = {f"diffusion_model.{theirs}": unet_sd[ours]
             for ours, theirs in comfy_utils.unet_to_diffusers(unet_config).items() if ours in unet_sd}
    for prefix, te in (("clip_l", sdxl_model.text_encoder), ("clip_g", sdxl_model.text_encoder_2)):
        for k, v in te.state_dict(keep_vars=True).items():  # ComfyUI's CLIP: text_model.* and text_projection
            inner = k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"
            state[f"{prefix}.transformer.{inner}"] = v
    return state, unet_config


class _Unloaded(logging.Handler):
    """Collects ComfyUI's "lora key not loaded: KEY" warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.keys.append(msg.removeprefix("lora key not loaded: "))


@torch.no_grad()
def check(lora_path, sdxl_model, root: Path) -> dict:
    """ComfyUI's loading of ``lora_path`` on ``sdxl_model`` against emotrain's delta.
    -> keys (in the file), unloaded (keys ComfyUI left), modules (compared), max_diff
    (largest |ComfyUI's change - emotrain's|), max_delta (largest |emotrain's change|),
    max_weight (largest |base weight|: ComfyUI patches in float32, so W + change is rounded there),
    dora_base_norm_diff (DoRA only: against emotrain's change with the norm of the base
    weight instead of the merged one)."""
    from safetensors.torch import load_file

    from emotrain import sdxl
    from emotrain.lora.formats import load_lora_file
    from emotrain.sdxl.parts import base_weight, component_models

    comfy_lora, comfy_utils = import_comfy(root)
    state, unet_config = comfy_model(sdxl_model, comfy_utils)
    model = _Model(state, unet_config)
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    key_map = comfy_lora.model_lora_keys_clip(model, key_map)
    raw = load_file(str(lora_path))
    handler = _Unloaded()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy_lora.load_lora(raw, key_map)
    finally:
        logging.getLogger().removeHandler(handler)

    ours = load_lora_file(lora_path)
    models = component_models(sdxl_model)
    max_diff = max_delta = max_alt = max_weight = 0.0
    compared = 0
    for full, m in ours.modules.items():
        component, name = full.split(".", 1)
        W = base_weight(models[component], component, name).detach()
        key = key_map[sdxl.kohya_name(full, sdxl_model.unet.config)]
        assert state[key] is W or torch.equal(state[key], W), f"ComfyUI maps {full} to {key}, another weight"
        got = comfy_lora.calculate_weight([(1.0, patches[key], 1.0, None, None)], W.float().clone(), key)
        theirs = got.double() - W.double()
        mine = m.delta(torch.float64, base=W.double()).reshape(W.shape)
        max_diff = max(max_diff, float((theirs - mine).abs().max()))
        max_delta = max(max_delta, float(mine.abs().max()))
        max_weight = max(max_weight, float(W.abs().max()))
        if m.kind == "dora":
            max_alt = max(max_alt, float((theirs - _dora_base_norm(m, W.double())).abs().max()))
        compared += 1
    out = {"keys": len(raw), "unloaded": handler.keys, "modules": compared, "patched": len(patches),
           "max_diff": max_diff, "max_delta": max_delta,
           "max_weight": max_weight}
    if any(m.kind == "dora" for m in ours.modules.values()):
        out["dora_base_norm_diff"] = max_alt
    return out


def _dora_base_norm(m, W):
    """DoRA's change with the row norm of the base weight W in place of W + dLoRA's."""
    from emotrain.lora.kinds import LoraKind
    lora = LoraKind.delta(m.entry, m, torch.float64).reshape(W.shape)  # the LoRA part alone
    norm = W.flatten(1).norm(dim=1).reshape(-1, *[1] * (W.ndim - 1))
    return (W + lora) * (m.extra["dora_scale"].double().reshape(norm.shape) / norm) - W


def train_tiny(kind: str, out: Path, steps: int = 2) -> Path:
    """A tiny-model run of ``kind`` with both text encoders trained -> its lora.safetensors."""
    from typer.testing import CliRunner

    from emotrain.cli import app
    args = ["sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2",
            "--rank", "4", "--lr", "1e-3", "--seed", "0", "--log-with", "none", "--steps", str(steps),
            "--train-text-encoders", "--adapter", kind, *EXTRA.get(kind, ()), "--output", str(out)]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"training {kind} failed: {result.output[-2000:]}")
    return out / "lora.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    root = snapshot_root()
    if root is None:
        sys.exit("no ComfyUI snapshot (set EMOTRAIN_COMFYUI to a folder holding comfy/) or einops is missing")
    from emotrain import sdxl
    model = sdxl.load_sdxl(sdxl.resolve_model("tiny"), torch.float32)
    print(f"ComfyUI {snapshot_commit(root)} at {root}")
    print("| kind | file keys | keys ComfyUI left | modules patched / compared | max abs difference of the change "
          "| max abs change |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            r = check(train_tiny(kind, Path(tmp) / kind, args.steps), model, root)
            extra = f" (against the base-weight norm: {r['dora_base_norm_diff']:.1e})" if kind == "dora" else ""
            print(f"| {kind} | {r['keys']} | {len(r['unloaded'])} | {r['patched']} / {r['modules']} "
                  f"| {r['max_diff']:.1e}{extra} | {r['max_delta']:.1e} |")


if __name__ == "__main__":
    main()
