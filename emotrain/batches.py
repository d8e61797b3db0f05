"""What the loop consumes: encoded examples, and a resumable order over them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example, load_image
from .sdxl import encode_images, encode_prompts, time_ids


@dataclass
class Encoded:
    latents: torch.Tensor  # [4, h/8, w/8], already times the VAE scaling factor
    time_ids: torch.Tensor  # [6]
    caption: str
    prompt_embeds: torch.Tensor | None = None  # cached when the text encoders are frozen
    pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_examples(sdxl, examples: list[Example], resolution: int, device, seed: int,
                    cache_text: bool, progress=None) -> list[Encoded]:
    """Encode every distinct image once (repeats share it), like sd-scripts' latent cache:
    the VAE and, when frozen, the text encoders never run inside the loop."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    done: dict[tuple, Encoded] = {}
    out = []
    for example in examples:
        key = (example.image, example.caption)
        if key not in done:
            pixels, original, crop = load_image(example.image, resolution)
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            latents = encode_images(sdxl.vae, pixels[None].to(device),
                                    torch.Generator(device=device).manual_seed(noise_seed))[0].cpu()
            enc = Encoded(latents, time_ids(original, crop, (resolution, resolution)), example.caption)
            if cache_text:
                embeds, pooled = encode_prompts(sdxl, [example.caption], device)
                enc.prompt_embeds, enc.pooled = embeds[0].float().cpu(), pooled[0].float().cpu()
            done[key] = enc
            if progress:
                progress()
        out.append(done[key])
    return out


class Batches:
    """An endless sequence of batches: each epoch a fresh permutation drawn from
    (seed, epoch) alone, so the order after a resume is the order without one."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()

    def next(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self._order[self.position])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}


def collate(items: list[Encoded], device) -> dict:
    batch = {"latents": torch.stack([e.latents for e in items]).to(device),
             "time_ids": torch.stack([e.time_ids for e in items]).to(device),
             "captions": [e.caption for e in items]}
    if items[0].prompt_embeds is not None:
        batch["prompt_embeds"] = torch.stack([e.prompt_embeds for e in items]).to(device)
        batch["pooled"] = torch.stack([e.pooled for e in items]).to(device)
    return batch
