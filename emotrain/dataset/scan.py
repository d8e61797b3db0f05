"""From folders to the draws of an epoch: images with their captions, repeats,
regularization images paired as sd-scripts pairs them, buckets, and every data warning.
Reads image headers (sizes, orientation, transparency); ``scan_data`` then decodes each
file once (decoded.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .buckets import Placement, choose_bucket, place
from .captions import read_caption
from .images import IMAGE_SUFFIXES, MASK_SUFFIX, inspect_image
from .problems import Problems
from .spec import REPEAT_FOLDER, DatasetSpec, Subset, folder_subsets, repeat_folders

FOLDER_LINES = 8  # folders listed one by one in the summary; more are counted


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str  # the caption file's text, or the class token / "" without one
    subset: Subset | None = None
    size: tuple[int, int] | None = None  # (width, height), upright
    alpha: bool = False
    mask: Path | None = None  # NAME_mask.png beside the image, when --alpha-mask reads it


@dataclass(frozen=True)
class Entry:
    """One draw of an epoch: an image of a dataset, placed in its bucket."""
    example: Example
    dataset: int
    place: Placement


@dataclass
class Scanned:
    entries: list[Entry]
    specs: list[DatasetSpec]
    problems: Problems
    summary: dict

    def lines(self) -> list[str]:
        return summary_lines(self.summary, self.problems)

    def show(self, console) -> None:
        for line in self.lines():
            console.print(line, markup=False, highlight=False)


def _images(folder: Path) -> tuple[list[Path], list[Path]]:
    """-> (images, NAME_mask.png files that belong to an image beside them)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    stems = {p.stem for p in files}
    masks = [p for p in files if p.name.lower().endswith(MASK_SUFFIX) and p.name[:-len(MASK_SUFFIX)] in stems]
    return [p for p in files if p not in masks], masks


def scan_subset(subset: Subset, problems: Problems) -> list[Example]:
    """A subset's images, once each, with captions and header facts."""
    images, masks = _images(subset.image_dir)
    if masks and not subset.alpha_mask:
        problems.add("unused_masks", masks[0], count=len(masks))
    out = []
    for image in images:
        width, height, alpha, frames = inspect_image(image)
        if frames > 1:
            problems.add("animated", image, f" ({frames} frames)")
        caption, notes = read_caption(image, subset.caption_extension)
        for note in notes:
            problems.add(note, image.with_suffix(subset.caption_extension))
        if caption is None:
            other = [s for s in (".txt", ".caption") if s != subset.caption_extension and image.with_suffix(s).is_file()]
            hint = f" (a {other[0]} file is there: pass --caption-extension {other[0]})" if other else ""
            problems.add("missing_caption", image, hint)
            caption = subset.class_tokens or ""
        mask = image.with_name(image.stem + MASK_SUFFIX)
        mask = mask if subset.alpha_mask and mask.is_file() else None
        if mask is not None and inspect_image(mask)[:2] != (width, height):
            mask_width, mask_height = inspect_image(mask)[:2]
            raise UserError(f"mask {mask} is {mask_width}x{mask_height} but its image is {width}x{height}: make "
                            "them the same size")
        if subset.alpha_mask and not alpha and mask is None:
            problems.add("no_mask", image)
        if alpha and not subset.alpha_mask:
            problems.add("transparency", image)
        out.append(Example(image, caption, subset, (width, height), alpha, mask))
    if not images:
        problems.add("empty_subset", subset.image_dir)
    return out


def scan_folder(folder, subset: Subset | None = None, problems: Problems | None = None,
                is_reg: bool = False) -> list[Example]:
    """A kohya-style folder (its images once, ``N_name`` sub-folders N times) -> its
    examples with repeats, under ``subset``'s caption settings (default: ``.txt``
    captions, nothing per draw). --data and --reg-data are read this way."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: pass an existing folder, or --data demo")
    problems = problems if problems is not None else Problems()
    _skipped_folders(root, problems)
    examples = []
    for sub in folder_subsets(root, subset or Subset(image_dir=root), is_reg):
        examples += [e for e in scan_subset(sub, problems) for _ in range(sub.num_repeats)]
    if not examples:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its N_name sub-folders: "
                        "add images with same-named caption files")
    return examples


def _skipped_folders(root: Path, problems: Problems) -> None:
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if not match or int(match.group(1)) < 1:
            problems.add("skipped_folders", sub)
    for link in repeat_folders(root)[1]:
        problems.add("linked_folders", link, f" (-> {link.resolve()})")


def pair_regularization(train_draws: int, reg: list[tuple[Example, int]], problems: Problems) -> list[Example]:
    """sd-scripts' pairing: regularization images in order, each with its repeats, until
    they match the training draws of an epoch; if they fall short, one more repeat each
    in turn. -> the regularization draws of an epoch."""
    counts, total = [], 0
    for _, repeats in reg:
        if total >= train_draws:
            break
        counts.append(repeats)
        total += repeats
    for i in range(train_draws - total if counts else 0):
        counts[i % len(counts)] += 1
    if len(counts) < len(reg):
        problems.add("unused_reg", reg[len(counts)][0].image, count=len(reg) - len(counts))
    return [example for (example, _), n in zip(reg, counts) for _ in range(n)]


def _placement(example: Example, spec: DatasetSpec) -> Placement:
    width, height = example.size
    target_w, target_h = choose_bucket(width, height, spec.resolution, spec.enable_bucket, spec.bucket_reso_steps, spec.min_bucket_reso,
                                       spec.max_bucket_reso)
    return place(width, height, target_w, target_h)


TRAINING = ("train on", "add images with same-named caption files")


def scan_datasets(specs: list[DatasetSpec], max_upscale: float = 2.0, folder_roots: tuple = (),
                  purpose: tuple[str, str] = TRAINING) -> Scanned:
    """Every dataset's draws of an epoch. ``folder_roots``: kohya-style folders (--data,
    --reg-data) whose other sub-folders are reported as not read. ``purpose``: (what the
    images are for, how to fix a set without any), for the error that says so."""
    problems = Problems()
    for root in folder_roots:
        _skipped_folders(Path(root), problems)
    entries, folders = [], []
    for d, spec in enumerate(specs):
        train, reg = [], []
        for subset in spec.subsets:
            found = []
            for example in scan_subset(subset, problems):
                placement = _placement(example, spec)
                if placement.upscale > max_upscale:
                    problems.add("too_small", example.image, f" ({example.size[0]}x{example.size[1]} for a "
                                 f"{placement.target[1]}x{placement.target[0]} bucket)")
                    continue
                found.append(example)
            if subset.is_reg:
                reg += [(e, subset.num_repeats) for e in found]
            else:
                train += [e for e in found for _ in range(subset.num_repeats)]
            folders.append({"folder": str(subset.image_dir), "images": len(found), "repeats": subset.num_repeats,
                            "regularization": subset.is_reg, "class_tokens": subset.class_tokens, "dataset": d})
        draws = train + pair_regularization(len(train), reg, problems) if train else []
        entries += [Entry(e, d, _placement(e, spec)) for e in draws]
        _batch_checks(spec, [e for e in entries if e.dataset == d], problems)
    if not entries:
        where = ", ".join(str(s.image_dir) for spec in specs for s in spec.subsets if not s.is_reg)
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) to {purpose[0]} in {where or 'the data'}"
                        f"{' (' + problems.line('too_small') + ')' if 'too_small' in problems.kinds else ''}: "
                        f"{purpose[1]}")
    return Scanned(entries, specs, problems, _summary(entries, folders))


def count_tags(counts: dict, captions) -> None:
    """sd-scripts' tag frequency: each caption split on commas, each tag stripped and
    lower-cased, empty ones left out (the caption as read: no prefix, suffix or shuffle)."""
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1


def _batch_checks(spec: DatasetSpec, entries: list[Entry], problems: Problems) -> None:
    if not entries:
        return
    if spec.batch_size > len(entries):
        problems.add("batch_too_large", entries[0].example.image,
                     f" ({len(entries)} draws per epoch, batch size {spec.batch_size})")
        return
    sizes = Counter(e.place.target for e in entries)
    small = [size for size, n in sizes.items() if n < spec.batch_size]
    if small:
        example = next(e for e in entries if e.place.target == small[0])
        problems.add("small_buckets", example.example.image,
                     f" (batch size {spec.batch_size}; {_bucket_name(small[0])} holds {sizes[small[0]]})",
                     count=len(small))


def _bucket_name(target: tuple[int, int]) -> str:
    return f"{target[1]}x{target[0]}"


def _summary(entries: list[Entry], folders: list[dict]) -> dict:
    images = {(e.example.image, e.example.subset.is_reg) for e in entries}
    buckets = Counter(_bucket_name(e.place.target) for e in entries)
    return {
        "images": sum(1 for _, reg in images if not reg),
        "regularization_images": sum(1 for _, reg in images if reg),
        "draws_per_epoch": len(entries),
        "regularization_draws_per_epoch": sum(1 for e in entries if e.example.subset.is_reg),
        "folders": folders,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
    }


def summary_lines(summary: dict, problems: Problems) -> list[str]:
    reg = summary["regularization_images"]
    lines = [f"data: {summary['images']} image(s)" + (f" + {reg} regularization image(s)" if reg else "") +
             f", {summary['draws_per_epoch']} draws per epoch with repeats"
             + (f" ({summary['regularization_draws_per_epoch']} regularization)" if reg else "")]
    for f in summary["folders"][:FOLDER_LINES]:
        kind = " (regularization)" if f["regularization"] else ""
        token = f", class token {f['class_tokens']!r}" if f["class_tokens"] else ""
        lines.append(f"  {f['folder']}: {f['images']} image(s) x {f['repeats']}{kind}{token}")
    if len(summary["folders"]) > FOLDER_LINES:
        lines.append(f"  ... and {len(summary['folders']) - FOLDER_LINES} more folder(s)")
    lines.append("  buckets: " + ", ".join(f"{k} ({n})" for k, n in summary["buckets"].items()))
    lines += [f"  {note}" for note in summary.get("notes", [])]
    lines += [f"  warning: {line}" for line in problems.lines()]
    return lines


def scan_data(cfg, purpose: tuple[str, str] = TRAINING) -> Scanned:
    """A run's data (--dataset-config, or --data and --reg-data) scanned; with
    --strict-data a warning stops here, before any model loads."""
    from .cache_folder import cache_folder
    from .decoded import check_decodable
    from .demo import resolve_data
    from .from_options import specs_from_options

    data = resolve_data(cfg.data) if cfg.data else None
    reg = Path(cfg.reg_data).expanduser() if cfg.reg_data else None
    roots = () if cfg.dataset_config else tuple(p for p in (data, reg) if p)
    scanned = scan_datasets(specs_from_options(cfg, data), cfg.max_upscale, roots, purpose)
    scanned.problems.enforce(cfg.strict_data)
    files = [f for e in scanned.entries for f in (e.example.image, e.example.mask) if f is not None]
    check_decodable(files, cache_folder(cfg))  # a truncated file: found here, before the model loads
    return scanned
