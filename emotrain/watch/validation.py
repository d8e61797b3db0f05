"""Validation loss that means something across runs.

Each validation image is noised at ``--val-timesteps`` timesteps spread over the
schedule (one drawn inside each equal slice), with noise drawn once, from ``--seed``,
when the run starts. The loss is the training loss (same prediction target, same
min-SNR weighting, the image's loss mask if it has one) at those fixed points, under
no_grad: two runs on the same data get the same number at step 0 whatever their
optimizer, and any later difference is the training's. What changes per draw in
training (flips, random crops, caption shuffles and dropout, noise offset, multi-resolution
noise, input perturbation) is left out:
each image is seen as its bucket's centre crop, with its fixed caption.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from ..dataset.captions import fixed_caption
from ..dataset.images import latent_mask, load_pixels
from ..dataset.scan import scan_data
from ..errors import UserError
from ..loss import Objective
from ..sdxl import encode_images, encode_prompts, time_ids

SEED_OFFSET = 0x5EED_7A1  # validation noise is its own stream, not the training noise's start


def _name_key(entry) -> str:
    subset = entry.example.subset
    try:
        name = str(entry.example.image.relative_to(subset.image_dir))
    except (AttributeError, ValueError):
        name = entry.example.image.name
    return hashlib.sha256(name.encode()).hexdigest()


def _distinct(entries) -> list:
    seen, out = set(), []
    for e in entries:
        if e.example.image not in seen:
            seen.add(e.example.image)
            out.append(e)
    return out


def split_validation(cfg, scanned) -> tuple:
    """-> (training data, validation entries). ``--val-split F`` holds out a fraction of
    the distinct training images (regularization images stay), picked by a hash of their
    path inside their folder: the same files whatever the seed, the machine or the
    folder's location; every repeat of a held-out image leaves the training set.
    ``--val-data DIR`` is scanned with --data's conventions."""
    if cfg.val_data:
        val = scan_data(cfg.replace(data=cfg.val_data, reg_data=None, dataset_config=None),
                        ("validate on (--val-data)", "add images with same-named caption files to that folder, "
                         "or leave --val-data out"))
        return scanned, _distinct(val.entries)
    if not cfg.val_split:
        return scanned, []
    train = _distinct(e for e in scanned.entries if not e.example.subset.is_reg)
    count = max(1, round(cfg.val_split * len(train)))
    if count >= len(train):
        raise UserError(f"val_split: {cfg.val_split} of {len(train)} images leaves none to train on: "
                        "use a smaller --val-split or --val-data DIR")
    held = {e.example.image for e in sorted(train, key=_name_key)[:count]}
    kept = [e for e in scanned.entries if e.example.image not in held]
    scanned.summary.setdefault("notes", []).append(
        f"validation: {count} image(s) held out by --val-split {cfg.val_split:g}, never trained on")
    return dataclasses.replace(scanned, entries=kept), _distinct(e for e in scanned.entries if e.example.image in held)


def stratified_timesteps(count: int, total: int, generator: torch.Generator, start: int = 0) -> torch.Tensor:
    """One timestep drawn uniformly inside each of ``count`` equal slices of [start, total)."""
    edges = [start + k * (total - start) // count for k in range(count + 1)]
    return torch.stack([torch.randint(lo, max(hi, lo + 1), (), generator=generator)
                        for lo, hi in zip(edges, edges[1:])])


@dataclasses.dataclass
class ValidationItem:
    latents: torch.Tensor
    time_ids: torch.Tensor
    caption: str
    mask: torch.Tensor | None
    embeds: torch.Tensor | None = None  # cached when the text encoders are frozen
    pooled: torch.Tensor | None = None


class Validation:
    """The validation set, encoded once (the VAE and text encoders still loaded), with its
    fixed noise and timesteps."""

    @torch.no_grad()
    def __init__(self, cfg, sdxl, entries: list, device, advance=None):
        self.cfg, self.objective = cfg, Objective.of(cfg)
        generator = torch.Generator().manual_seed(cfg.seed + SEED_OFFSET)
        self.items = []
        for e in entries:
            subset, place = e.example.subset, e.place
            pixels, mask = load_pixels(e.example.image, place, mask=subset.alpha_mask, mask_file=e.example.mask)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            latents = encode_images(sdxl.vae, pixels[None].to(device), torch.Generator(device=device).manual_seed(seed))
            item = ValidationItem(latents[0].cpu(), time_ids(place.original, place.crop, place.target),
                        fixed_caption(e.example.caption, subset), None if mask is None else latent_mask(mask))
            if not cfg.train_text_encoders:
                embeds, pooled = encode_prompts(sdxl, [item.caption], device, cfg.max_token_length)
                item.embeds, item.pooled = embeds[0].cpu(), pooled[0].cpu()
            self.items.append(item)
            if advance:
                advance()
        start, total = self.objective.timestep_range(sdxl.noise_scheduler)  # the training's range
        self.noise = [torch.randn((cfg.val_timesteps, *item.latents.shape), generator=generator) for item in self.items]
        self.timesteps = [stratified_timesteps(cfg.val_timesteps, total, generator, start) for _ in self.items]
        names = sorted(f"{e.example.image.name}:{e.example.image.stat().st_size}:{e.example.caption}" for e in entries)
        self.description = {
            "images": len(self.items), "timesteps": cfg.val_timesteps, "seed": cfg.seed,
            "images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "data": str(cfg.dataset_config or cfg.data), "source": cfg.val_data or f"val_split {cfg.val_split}",
            "model": str(sdxl.source), "resolution": cfg.resolution, "min_snr_gamma": cfg.min_snr_gamma,
            "objective": {k: v for k, v in self.objective.describe().items()
                          if k not in ("noise_offset", "noise_offset_random_strength", "ip_noise_gamma",
                                       "multires_noise_iterations", "multires_noise_discount")},
        }

    @torch.no_grad()
    def loss(self, run) -> float:
        """The mean weighted loss over every image and timestep, with the live LoRA."""
        cfg, accelerator = self.cfg, run.accelerator
        unet, device = accelerator.unwrap_model(run.models[0]), accelerator.device
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for item, noise, timesteps in zip(self.items, self.noise, self.timesteps):
            if item.embeds is not None:
                embeds, pooled = item.embeds.to(device), item.pooled.to(device)
            else:  # trained text encoders: their live LoRA counts too
                embeds, pooled = (x[0] for x in encode_prompts(run.sdxl, [item.caption], device, cfg.max_token_length))
            for lo in range(0, len(timesteps), cfg.batch_size):
                n = min(cfg.batch_size, len(timesteps) - lo)
                weight = None if item.mask is None else item.mask[None].expand(n, *item.mask.shape)
                with accelerator.autocast():  # the training loss at fixed noise and timesteps
                    per_sample = self.objective.per_sample(
                        unet, run.sdxl.noise_scheduler, item.latents.to(device)[None].expand(n, *item.latents.shape),
                        noise[lo:lo + n], timesteps[lo:lo + n], embeds[None].expand(n, *embeds.shape),
                        pooled[None].expand(n, *pooled.shape), item.time_ids.to(device)[None].expand(n, -1), weight)
                total += per_sample.double().sum()
                count += n
        return float(total / count)
