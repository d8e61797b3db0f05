"""What the loop draws: a batch of cached latents (or freshly encoded random crops), the
caption text of this draw, SDXL's size/crop conditioning and the loss weights.

Every per-draw choice (flip, caption shuffle and dropout, crop position) comes from the
generator the loop passes in, the one its checkpoints save and restore, so a resumed run
draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..disk.atomic import write_text
from ..errors import InputLost, UserError
from ..precision import to_device
from ..sdxl import encode_images, time_ids
from .buckets import Placement
from .captions import draw_caption, fixed_caption
from .images import latent_mask, load_pixels
from .scan import Entry, Example


@dataclass
class Item:
    """An image as the loop shows it; repeats and pairing share one."""
    example: Example
    place: Placement
    latents: dict = field(default_factory=dict)  # flipped? -> cache handle; empty: encoded per draw


@dataclass
class Batch:
    latents: torch.Tensor
    time_ids: torch.Tensor
    captions: list[str]
    prompt_embeds: torch.Tensor | None  # None: the loop encodes ``captions``
    pooled: torch.Tensor | None
    weight: torch.Tensor | None  # per latent pixel [B, 1, h, w], or None for 1 everywhere


class Draws:
    """Random draws from a torch generator."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def random(self) -> float:
        return torch.rand((), generator=self.generator, dtype=torch.float64).item()

    def permutation(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist() if n > 1 else list(range(n))

    def integer(self, high: int) -> int:
        """Uniform in [0, high]."""
        return int(torch.randint(0, high + 1, (), generator=self.generator)) if high > 0 else 0


class DrawLog:
    """draws.jsonl: one line per drawn image. A resumed run drops the lines of steps it
    will draw again, so the file always tells the draws of the run as it stands."""

    def __init__(self, path: Path):
        self.path, self.started = path, False

    def write(self, step: int, records: list[dict]) -> None:
        if not self.started:
            self.started = True
            if self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] < step]
                write_text(self.path, "".join(line + "\n" for line in kept))
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in records)


class TrainingData:
    def __init__(self, entries: list[Entry], items: list[Item], of_entry: list[int], texts: dict, cache, vae,
                 device, batch_sizes: list[int], prior_loss_weight: float = 1.0):
        self.entries, self.items, self.of_entry, self.texts = entries, items, of_entry, texts
        self.cache, self.vae, self.device, self.prior_loss_weight = cache, vae, device, prior_loss_weight
        self.dataset_batch_sizes = batch_sizes
        self.log: DrawLog | None = None

    def record_to(self, path: Path) -> None:
        self.log = DrawLog(path)

    @property
    def keys(self) -> list[tuple]:
        """Each entry's batch group for ``Batches``: its dataset and bucket."""
        return [(e.dataset, *e.place.target) for e in self.entries]

    @property
    def batch_sizes(self) -> dict:
        """The batch size of each group: its dataset's."""
        return {key: self.dataset_batch_sizes[key[0]] for key in set(self.keys)}

    def _latents(self, entry: Entry, item: Item, flip: bool, draws: Draws, generator) -> tuple:
        subset, place = entry.example.subset, item.place
        if not subset.random_crop:
            tensors = self.cache.load(item.latents[flip])
            return tensors["latents"], tensors.get("mask"), place.crop
        crop = (draws.integer(place.scaled[0] - place.target[0]), draws.integer(place.scaled[1] - place.target[1]))
        try:
            pixels, mask = load_pixels(entry.example.image, place, crop=crop, flip=flip, mask=subset.alpha_mask,
                                       mask_file=entry.example.mask)
        except UserError:  # the image (or its mask) changed or went away since the start
            gone = next((p for p in (entry.example.image, entry.example.mask) if p and not p.is_file()), None)
            raise InputLost(f"image {gone} is gone" if gone else
                            f"image {entry.example.image} (or its mask) changed and cannot be read",
                            "put it back as it was") from None
        latents = encode_images(self.vae, pixels[None].to(self.device), generator)[0]
        return latents, None if mask is None else latent_mask(mask), crop

    def batch(self, indices: list[int], generator: torch.Generator, step: int | None = None) -> Batch:
        draws = Draws(generator)
        latents, masks, ids, captions, weights, records = [], [], [], [], [], []
        for i in indices:
            entry, item = self.entries[i], self.items[self.of_entry[i]]
            subset = entry.example.subset
            flip = subset.flip_aug and draws.random() < 0.5
            caption = draw_caption(entry.example.caption, subset, draws) if subset.per_draw_captions \
                else fixed_caption(entry.example.caption, subset)
            lat, mask, crop = self._latents(entry, item, flip, draws, generator)
            latents.append(lat)
            masks.append(mask)
            ids.append(time_ids(item.place.original, item.place.flipped_crop(crop) if flip else crop,
                                item.place.target))
            captions.append(caption)
            weights.append(self.prior_loss_weight if subset.is_reg else 1.0)
            records.append({"image": str(entry.example.image), "caption": caption, "flip": flip,
                            "regularization": subset.is_reg, "crop": list(crop)})
        if self.log is not None and step is not None:
            self.log.write(step, records)
        # Stacked where they are (cached: on the host), then one pinned, non-blocking copy each.
        stacked = to_device(torch.stack(latents), self.device) if all(t.device.type == "cpu" for t in latents) \
            else torch.stack([t.to(self.device) for t in latents])  # random crops encoded on the device
        weight = None
        if any(m is not None for m in masks) or any(w != 1.0 for w in weights):
            weight = to_device(torch.stack([(m if m is not None else torch.ones(1, *stacked.shape[2:])) * w
                                            for m, w in zip(masks, weights)]), self.device)
        embeds = pooled = None
        if self.texts:
            texts = [self.cache.load(self.texts[c]) for c in captions]
            embeds = to_device(torch.stack([t["embeds"] for t in texts]), self.device)
            pooled = to_device(torch.stack([t["pooled"] for t in texts]), self.device)
        return Batch(stacked, to_device(torch.stack(ids), self.device), captions, embeds, pooled, weight)
