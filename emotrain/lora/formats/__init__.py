"""LoRA file formats, in one registry that saving, loading, ``convert``, ``merge --to``
and the command line's choices all go through.

Each format is a module here (``kohya.py``, ``diffusers.py``) with ``detect(keys)``,
``read(...)`` and ``write(...)`` against the normalized ``weights.LoraWeights``, so a
format is added in one place and every path that touches files knows it. The modules are
imported on first use: they need torch and the SDXL key tables, the command line only
the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError


@dataclass(frozen=True)
class Format:
    name: str  # also the module implementing it
    file_name: str  # what a run calls its file in this format, and what goes into a folder
    description: str

    @property
    def ema_file_name(self) -> str:
        """What a run calls the EMA of its LoRA (--ema-decay) in this format: NAME-ema.safetensors."""
        stem, dot, suffix = self.file_name.rpartition(".")
        return f"{stem}-ema{dot}{suffix}"

    @property
    def _impl(self):
        return importlib.import_module(f"{__name__}.{self.name}")

    @property
    def layout_keys(self) -> tuple[str, ...]:
        """Header entries describing this format's layout, not the training."""
        return self._impl.LAYOUT_KEYS

    def accepts(self, weights) -> bool:
        """Whether this format can hold ``weights``' adapter kinds (a run writes only those)."""
        return self._impl.accepts(weights)

    def detect(self, keys) -> bool:
        """Whether a file with these tensor keys is in this format."""
        return self._impl.detect(keys)

    def read(self, tensors: dict, header: dict[str, str], path: Path, unet_config=None):
        """Tensors and header of a file -> LoraWeights (metadata left to ``load_lora_file``)."""
        return self._impl.read(tensors, header, path, unet_config)

    def write(self, path, weights, metadata: dict | None = None, unet_config=None, dtype=None) -> Path:
        """Write ``weights`` to ``path``: a .safetensors file, or else a folder that gets
        ``file_name``. ``unet_config`` fixes the UNet's module names (default SDXL's)."""
        path = Path(path).expanduser()
        if path.suffix != ".safetensors":
            path = path / self.file_name
        return self._impl.write(path, weights, metadata, unet_config=unet_config, dtype=dtype)


FORMATS = {f.name: f for f in (
    Format("kohya", "lora.safetensors", "kohya/sd-scripts keys with SGM names, for ComfyUI and A1111"),
    Format("diffusers", "pytorch_lora_weights.safetensors", "peft keys, for diffusers' load_lora_weights"),
)}
# A folder means what it means to diffusers' load_lora_weights(folder).
FOLDER_FILE = FORMATS["diffusers"].file_name


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown LoRA format {name!r}: use {' or '.join(repr(n) for n in FORMATS)}")
    return FORMATS[name]


def header_passthrough(metadata: dict) -> dict:
    """The header entries a file written from ``metadata`` carries over: its training notes,
    not safetensors' own entry or any format's description of itself."""
    layout = {"format", *(k for f in FORMATS.values() for k in f.layout_keys)}
    return {k: v for k, v in metadata.items() if k not in layout}


def resolve_lora_file(path) -> Path:
    """The LoRA file a path names (a folder may hold one); pure file checks, no torch."""
    if not str(path).strip():
        raise UserError("a LoRA path is empty: pass FILE.safetensors")
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / FOLDER_FILE).is_file():
            return p / FOLDER_FILE
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(f"LoRA folder {p} holds {len(files)} .safetensors files and no {FOLDER_FILE}: "
                            "pass the file itself")
        return files[0]
    if not p.is_file():
        raise UserError(f"LoRA file {p} does not exist: check the path")
    if p.suffix != ".safetensors":
        raise UserError(f"LoRA file {p} is not .safetensors (pickle formats are never loaded): "
                        "convert it to .safetensors")
    return p


def load_lora_file(path, unet_config=None):
    """Read a LoRA file of any registered format, or a folder holding one, into LoraWeights.
    ``unet_config`` fixes the UNet's module names (default: SDXL's)."""
    from . import common

    p = resolve_lora_file(path)
    tensors, header = common.read_safetensors(p)
    if not tensors:
        raise UserError(f"LoRA file {p} holds no tensors: it is not a LoRA")
    bad = common.first_non_finite(tensors)
    if bad:
        raise UserError(f"LoRA file {p} holds non-finite values (nan or inf, first in {bad!r}): it is damaged or "
                        "came from a diverged run; use another file")
    keys = list(tensors)
    fmt = next((f for f in FORMATS.values() if f.detect(keys)), None)
    if fmt is None:
        raise UserError(f"LoRA file {p} has an unknown layout (first key {keys[0]!r}): "
                        f"emotrain reads {' and '.join(FORMATS)} LoRA files")
    weights = fmt.read(tensors, header, p, unet_config)
    weights.metadata = header_passthrough(header)
    return weights


def save_lora_file(path, weights, format: str = "kohya", metadata: dict | None = None, **kwargs) -> Path:
    """Write ``weights`` in ``format`` (see ``Format.write``)."""
    return get_format(format).write(path, weights, metadata, **kwargs)


def convert(in_path, out_path, to: str = "kohya", unet_config=None, dtype=None) -> Path:
    """Rewrite a LoRA file in another format, keeping its training metadata. An output
    path without .safetensors is a folder."""
    fmt = get_format(to)
    return fmt.write(out_path, load_lora_file(in_path, unet_config), unet_config=unet_config, dtype=dtype)
