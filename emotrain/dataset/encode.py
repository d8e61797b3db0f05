"""Before training: every image's latents (both orientations with flips) and every fixed
caption's text embeddings, loaded from the cache or encoded into it one at a time (the
data is never all in memory at once), and the encoders the loop does not need freed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..sdxl import count_tokens, encode_images, encode_prompts
from .cache_folder import cache_folder
from .captions import fixed_caption, with_affixes
from .images import latent_mask, load_pixels
from .latent_cache import Cache, module_identity
from .loader import Item, TrainingData
from .scan import Entry, Scanned

@dataclass
class Counts:
    latents_loaded: int = 0
    latents_encoded: int = 0
    texts_loaded: int = 0
    texts_encoded: int = 0


def _items(entries: list[Entry]) -> tuple[list[Item], list[int]]:
    """Entries that show the same image the same way share one item (repeats, pairing)."""
    index, items, of_entry = {}, [], []
    for e in entries:
        s = e.example.subset
        key = (e.example.image, e.place, s.alpha_mask, s.flip_aug, s.random_crop)
        if key not in index:
            index[key] = len(items)
            items.append(Item(e.example, e.place))
        of_entry.append(index[key])
    return items, of_entry


def _encode_latents(sdxl, item: Item, cache: Cache, vae_id: str, device, counts: Counts) -> None:
    example, subset, place = item.example, item.example.subset, item.place
    mask_source = (f"file:{cache.content_hash(example.mask)}" if example.mask else "alpha") if subset.alpha_mask else None
    image_hash = cache.content_hash(example.image)
    for flip in ((False, True) if subset.flip_aug else (False,)):
        key = cache.key(kind="latents", vae=vae_id, image=image_hash, place=[place.scaled, place.target, place.crop],
                        flip=flip, mask=mask_source)
        handle = cache.lookup("latents", key)
        if handle is None:
            pixels, mask = load_pixels(example.image, place, flip=flip, mask=subset.alpha_mask, mask_file=example.mask)
            # The VAE's sample is drawn from the key: the same image gives the same latents in every run.
            generator = torch.Generator(device=device).manual_seed(int(key[:15], 16))
            tensors = {"latents": encode_images(sdxl.vae, pixels[None].to(device), generator)[0]}
            if mask is not None:
                tensors["mask"] = latent_mask(mask)
            handle = cache.store("latents", key, tensors)
            counts.latents_encoded += 1
        else:
            counts.latents_loaded += 1
        item.latents[flip] = handle


@torch.no_grad()
def _encode_texts(sdxl, captions: set[str], cache: Cache, max_tokens: int, device, counts: Counts, advance) -> dict:
    identity = module_identity(*sdxl.text_encoders) + f"{len(sdxl.tokenizer)}/{len(sdxl.tokenizer_2)}"
    texts = {}
    for caption in sorted(captions):
        key = cache.key(kind="text", encoders=identity, caption=caption, max_tokens=max_tokens)
        handle = cache.lookup("text", key)
        if handle is None:
            embeds, pooled = encode_prompts(sdxl, [caption], device, max_tokens)
            handle = cache.store("text", key, {"embeds": embeds[0], "pooled": pooled[0]})
            counts.texts_encoded += 1
        else:
            counts.texts_loaded += 1
        texts[caption] = handle
        advance()
    return texts


def _check_lengths(sdxl, scanned: Scanned, max_tokens: int) -> None:
    seen = set()
    for e in scanned.entries:
        text = with_affixes(e.example.caption, e.example.subset)
        if text in seen:
            continue
        seen.add(text)
        n = count_tokens(sdxl.tokenizer, text)
        if n > max_tokens:
            scanned.problems.add("truncated_captions", e.example.image, f" ({n} tokens)")


def prepare_data(sdxl, scanned: Scanned, cfg, device, progress, console, keep_encoders: bool = False) -> TrainingData:
    """Latents and text embeddings ready for the loop; frees the VAE and the text
    encoders unless the data changes per draw (or ``keep_encoders``: another set, such
    as a validation set, is still to be prepared). Adds what it did to the summary."""
    def say(line: str) -> None:
        console.print(f"  {line}", markup=False, highlight=False)

    _check_lengths(sdxl, scanned, cfg.max_token_length)  # needs the tokenizer: known once the model is loaded
    if "truncated_captions" in scanned.problems.kinds:
        say(f"warning: {scanned.problems.line('truncated_captions')}")
    scanned.summary["problems"] = scanned.problems.as_dict()
    scanned.problems.enforce(cfg.strict_data)

    cache, counts = Cache(cache_folder(cfg)), Counts()
    items, of_entry = _items(scanned.entries)
    vae_id = module_identity(sdxl.vae)
    with progress.task("encoding images (or loading them from the cache)", total=len(items)) as advance:
        for item in items:
            if not item.example.subset.random_crop:
                _encode_latents(sdxl, item, cache, vae_id, device, counts)
            advance()
    text_per_step = cfg.train_text_encoders or any(e.example.subset.per_draw_captions for e in scanned.entries)
    texts = {}
    if not text_per_step:
        captions = {fixed_caption(e.example.caption, e.example.subset) for e in scanned.entries}
        with progress.task("encoding captions (or loading them from the cache)", total=len(captions)) as advance:
            texts = _encode_texts(sdxl, captions, cache, cfg.max_token_length, device, counts, advance)
    cache.save_hashes()

    crops = sum(1 for item in items if item.example.subset.random_crop)
    notes = _notes(cfg, cache, counts, text_per_step, crops)
    for line in notes:
        say(line)
    if cache.damaged:
        say(f"warning: {len(cache.damaged)} cache file(s) were damaged and were encoded again, e.g. {cache.damaged[0]}")
    scanned.summary.update(notes=notes, cache={"folder": str(cache.folder) if cache.folder else None,
                                               **asdict(counts), "damaged": len(cache.damaged)},
                           text_encoders="every step" if text_per_step else "cached",
                           vae="every step" if crops else "cached")
    if not crops and not keep_encoders:
        sdxl.vae.to("meta")  # latents are cached: free what the loop no longer needs
    if not text_per_step and not keep_encoders:
        sdxl.text_encoder.to("meta"), sdxl.text_encoder_2.to("meta")
    return TrainingData(scanned.entries, items, of_entry, texts, cache, sdxl.vae if crops else None, device,
                        [spec.batch_size for spec in scanned.specs], cfg.prior_loss_weight)


def _notes(cfg, cache: Cache, counts: Counts, text_per_step: bool, crops: int) -> list[str]:
    where = f"in {cache.folder}" if cache.folder else "in memory (--no-disk-cache)"
    notes = [f"latent cache {where}: {counts.latents_loaded} loaded, {counts.latents_encoded} encoded"
             + (f"; text embeddings: {counts.texts_loaded} loaded, {counts.texts_encoded} encoded"
                if not text_per_step else "")]
    if text_per_step and not cfg.train_text_encoders:
        notes.append("captions change per draw (shuffle/dropout): the text encoders stay loaded and encode every "
                     "step (see emotrain vram)")
    if crops:
        notes.append(f"random crop: {crops} image(s) are encoded by the VAE at every draw (no latent cache; the VAE "
                     "stays loaded): steps are slower")
    return notes
