"""The encoded-data cache: one safetensors file per image and variant (and per caption),
named by a hash of everything that determines its content, so a second run and every
resume load instead of encoding, and anything that changed is encoded again.

A latent file's key holds the VAE's identity (config and a sample of every weight), the
image's content hash, the bucket, scale, crop, flip and mask source; a text file's the
text encoders' identity, the caption and the token length. Content hashes are reused
while a file's size and modification time stay the same (``file-hashes.json``). Every
file holds its key and a checksum of its tensors: a file that fails either is encoded
again, never trusted. Without a folder (``--no-disk-cache``) everything stays in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..disk.atomic import atomic_path, write_text
from ..errors import InputLost, UserError
from .cache_folder import check_folder

VERSION = 1  # bump when what a key stands for changes
HASHES = "file-hashes.json"
SAMPLES = 1024  # values of each weight hashed into a model's identity


class Damaged(Exception):
    pass


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def module_identity(*modules) -> str:
    """A model's identity: its config and, for every weight, its name, shape, dtype and an
    even sample of its values (a merged LoRA changes whole matrices, so samples see it)."""
    h = hashlib.sha256()
    for module in modules:
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        # diffusers' own entries (_name_or_path, _diffusers_version, ...) say where the model was
        # loaded from and by which release, not what it computes: a moved model keeps its cache
        # and, since the VAE's sample is seeded from the key, its exact latents.
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // SAMPLES)][:SAMPLES]
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


class Cache:
    def __init__(self, folder: Path | None):
        self.folder = folder
        self.hashes: dict[str, list] = {}
        self._hashes_changed = False
        self.damaged: list[Path] = []
        if folder is not None:
            check_folder(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create cache folder {folder} ({exc.strerror}): pass another --cache-dir "
                                "or --no-disk-cache") from None
            try:
                self.hashes = json.loads((folder / HASHES).read_text())
            except (OSError, ValueError):
                self.hashes = {}  # no index yet, or a damaged one: hashes are computed again

    def content_hash(self, path: Path) -> str:
        """An image's content hash, reused while its size and modification time stay."""
        st = path.stat()
        name = str(path.resolve())
        known = self.hashes.get(name)
        if isinstance(known, list) and known[:2] == [st.st_size, st.st_mtime_ns]:
            return known[2]
        digest = file_hash(path)
        self.hashes[name] = [st.st_size, st.st_mtime_ns, digest]
        self._hashes_changed = True
        return digest

    def save_hashes(self) -> None:
        if self.folder is not None and self._hashes_changed:
            write_text(self.folder / HASHES, json.dumps(self.hashes))
            self._hashes_changed = False

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps({"version": VERSION, **parts}, sort_keys=True).encode()).hexdigest()

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / key[:2] / f"{key}.safetensors"

    def lookup(self, kind: str, key: str):
        """-> a handle of the cached entry, or None (missing, or damaged: counted)."""
        if self.folder is None:
            return None
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            self.read(path, key)
        except Damaged:
            self.damaged.append(path)
            return None
        return path

    def store(self, kind: str, key: str, tensors: dict[str, torch.Tensor]):
        """Keep an encoded entry -> its handle: the file on disk, or the tensors in memory."""
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        if self.folder is None:
            return tensors
        path = self.path(kind, key)
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, tmp, metadata={"key": key, "checksum": _checksum(tensors)})
        except OSError as exc:
            raise UserError(f"cannot write to cache folder {self.folder} ({exc.strerror}): free space, pass "
                            "another --cache-dir, or --no-disk-cache") from None
        return path

    @staticmethod
    def read(handle, key: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of a handle, checked against their key and checksum."""
        if isinstance(handle, dict):
            return handle
        try:
            with safe_open(str(handle), "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            if not Path(handle).is_file():
                raise Damaged("is gone") from None
            raise Damaged(f"is unreadable ({type(exc).__name__})") from None
        if (key is not None and meta.get("key") != key) or meta.get("checksum") != _checksum(tensors):
            raise Damaged("does not match its key or checksum")
        return tensors

    def load(self, handle) -> dict[str, torch.Tensor]:
        """Read during training: a file gone or damaged since the start checked it (the
        cache deleted or cleaned) stops the run at the step (the loop saves a checkpoint)."""
        try:
            return self.read(handle)
        except Damaged as exc:
            raise InputLost(f"cache file {handle} {exc}") from None
