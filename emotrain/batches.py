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
                    cache_text: bool, bucket: bool = True, progress=None) -> list[Encoded]:
    """Encode every distinct image once (repeats share it), like sd-scripts' latent cache:
    the VAE and, when frozen, the text encoders never run inside the loop."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    done: dict[tuple, Encoded] = {}
    out = []
    for example in examples:
        key = (example.image, example.caption)
        if key not in done:
            pixels, original, crop, target = load_image(example.image, resolution, bucket)
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            latents = encode_images(sdxl.vae, pixels[None].to(device),
                                    torch.Generator(device=device).manual_seed(noise_seed))[0].cpu()
            enc = Encoded(latents, time_ids(original, crop, target), example.caption)
            if cache_text:
                embeds, pooled = encode_prompts(sdxl, [example.caption], device)
                enc.prompt_embeds, enc.pooled = embeds[0].float().cpu(), pooled[0].float().cpu()
            done[key] = enc
            if progress:
                progress()
        out.append(done[key])
    return out


class Batches:
    """An endless sequence of batches. Each batch holds examples of one size (one aspect
    bucket); each epoch shuffles within buckets and then the order of the batches, from
    (seed, epoch) alone, so the order after a resume is the order without one."""

    def __init__(self, sizes: list[tuple], batch_size: int, seed: int, epoch: int = 0, position: int = 0,
                 rank: int = 0, world: int = 1):
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.epoch, self.position = epoch, position
        self.rank, self.world = rank, world  # processes take turns along the one order (distributed.py)
        self._batches = self._epoch(epoch)

    def _epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        by_size: dict[tuple, list[int]] = {}
        for i, size in enumerate(self.sizes):
            by_size.setdefault(tuple(size), []).append(i)
        batches = []
        for size in sorted(by_size):
            members = by_size[size]
            order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
            batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def next(self) -> list[int]:
        """This process's next batch; the other processes take the ones around it."""
        turns = [self._advance() for _ in range(self.world)]
        return turns[self.rank]

    def _advance(self) -> list[int]:
        if self.position == len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch)
        self.position += 1
        return self._batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}


def collate(items: list[Encoded], device) -> dict:
    batch = {"latents": torch.stack([e.latents for e in items]).to(device),
             "time_ids": torch.stack([e.time_ids for e in items]).to(device),
             "captions": [e.caption for e in items]}
    if items[0].prompt_embeds is not None:
        batch["prompt_embeds"] = torch.stack([e.prompt_embeds for e in items]).to(device)
        batch["pooled"] = torch.stack([e.pooled for e in items]).to(device)
    return batch
