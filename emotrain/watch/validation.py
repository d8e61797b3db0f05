"""Validation loss that means something across runs.

Each validation image is noised at ``--val-timesteps`` timesteps spread over the
schedule (one drawn inside each equal slice), with noise drawn once, from ``--seed``,
when the run starts. The loss is the training loss (same prediction target, same
min-SNR weighting) at those fixed points, under no_grad: two runs on the same data get
the same number at step 0 whatever their optimizer, and any later difference is the
training's. Noise offset, a training-time augmentation, is left out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..batches import encode_examples
from ..data import resolve_data, scan_folder
from ..errors import UserError
from ..sdxl import encode_prompts, noised_loss

SEED_OFFSET = 0x5EED_7A1  # validation noise is its own stream, not the training noise's start


def _distinct(examples) -> list:
    return list(dict.fromkeys(examples))


def _name_key(image: Path, root: Path) -> str:
    try:
        name = str(image.relative_to(root))
    except ValueError:
        name = image.name
    return hashlib.sha256(name.encode()).hexdigest()


def split_validation(cfg, examples: list) -> tuple[list, list]:
    """-> (training examples, validation examples). ``--val-split F`` holds out a
    fraction of the distinct images, picked by a hash of their path inside the data
    folder: the same files whatever the seed, the machine or the folder's location,
    and every repeat of a held-out image leaves the training set."""
    if cfg.val_data:
        return examples, _distinct(scan_folder(resolve_data(cfg.val_data)))
    if not cfg.val_split:
        return examples, []
    root = resolve_data(cfg.data)
    images = sorted({e.image for e in examples}, key=lambda p: _name_key(p, root))
    count = max(1, round(cfg.val_split * len(images)))
    if count >= len(images):
        raise UserError(f"val_split: {cfg.val_split} of {len(images)} images leaves none to train on: "
                        "use a smaller --val-split or --val-data DIR")
    held = set(images[:count])
    return [e for e in examples if e.image not in held], _distinct(e for e in examples if e.image in held)


def stratified_timesteps(count: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """One timestep drawn uniformly inside each of ``count`` equal slices of [0, total)."""
    edges = [k * total // count for k in range(count + 1)]
    return torch.stack([torch.randint(lo, max(hi, lo + 1), (), generator=generator)
                        for lo, hi in zip(edges, edges[1:])])


class Validation:
    """The validation set, encoded once, with its fixed noise and timesteps."""

    def __init__(self, cfg, sdxl, examples: list, device, progress=None):
        self.cfg = cfg
        self.items = encode_examples(sdxl, examples, cfg.resolution, device, cfg.seed,
                                     cache_text=not cfg.train_text_encoders, bucket=cfg.bucket, progress=progress)
        generator = torch.Generator().manual_seed(cfg.seed + SEED_OFFSET)
        total = sdxl.noise_scheduler.config.num_train_timesteps
        self.noise, self.timesteps = [], []
        for item in self.items:
            self.noise.append(torch.randn((cfg.val_timesteps, *item.latents.shape), generator=generator))
            self.timesteps.append(stratified_timesteps(cfg.val_timesteps, total, generator))
        names = sorted(f"{e.image.name}:{e.image.stat().st_size}:{e.caption}" for e in examples)
        self.description = {
            "images": len(self.items), "timesteps": cfg.val_timesteps, "seed": cfg.seed,
            "images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "data": str(resolve_data(cfg.data)), "source": cfg.val_data or f"val_split {cfg.val_split}",
            "model": str(sdxl.source), "resolution": cfg.resolution, "min_snr_gamma": cfg.min_snr_gamma,
        }

    @torch.no_grad()
    def loss(self, run) -> float:
        """The mean weighted loss over every image and timestep, with the live LoRA."""
        cfg, accelerator = self.cfg, run.accelerator
        unet, device = accelerator.unwrap_model(run.models[0]), accelerator.device
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for item, noise, timesteps in zip(self.items, self.noise, self.timesteps):
            for lo in range(0, len(timesteps), cfg.batch_size):
                n = min(cfg.batch_size, len(timesteps) - lo)
                latents = item.latents.to(device)[None].expand(n, *item.latents.shape)
                if item.prompt_embeds is not None:
                    embeds, pooled = item.prompt_embeds.to(device), item.pooled.to(device)
                else:  # trained text encoders: their live LoRA counts too
                    embeds, pooled = (x[0] for x in encode_prompts(run.sdxl, [item.caption], device))
                with accelerator.autocast():
                    per_sample = noised_loss(unet, run.sdxl.noise_scheduler, latents, noise[lo:lo + n],
                                             timesteps[lo:lo + n], embeds[None].expand(n, *embeds.shape),
                                             pooled[None].expand(n, *pooled.shape),
                                             item.time_ids.to(device)[None].expand(n, -1), cfg.min_snr_gamma)
                total += per_sample.double().sum()
                count += n
        return float(total / count)
