"""Captions: reading the file beside an image, and what sd-scripts does to one each time
its image is drawn.

Per draw, in sd-scripts' order: prefix and suffix join the caption; the whole caption is
dropped (``caption_dropout_rate``); else the tags (split at ``caption_separator``) are
split into kept ones (the first ``keep_tokens``, or everything before
``keep_tokens_separator`` and after its second occurrence) and the rest, which are
shuffled and then each dropped (``caption_tag_dropout_rate``); the tags are joined with
", ". Random numbers come from ``rng`` (``random()`` in [0, 1), ``permutation(n)``), which
the loop passes in from the generator its checkpoints hold.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def read_caption(image: Path, extension: str) -> tuple[str | None, list[str]]:
    """-> (the caption, or None without a file; notes: "multi_line", "empty_caption").
    Only the first line counts, as in sd-scripts."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None, []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"caption {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read caption {path} ({exc.strerror}): check the file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    notes = (["multi_line"] if len(lines) > 1 else []) + ([] if lines else ["empty_caption"])
    return (lines[0] if lines else ""), notes


def with_affixes(caption: str, subset) -> str:
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    return caption


def _tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def fixed_caption(caption: str, subset) -> str:
    """The caption of a subset whose captions do not change per draw."""
    return _secondary(with_affixes(caption, subset).strip(), subset)


def draw_caption(caption: str, subset, rng) -> str:
    """One draw's caption text."""
    caption = with_affixes(caption, subset)
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        return _secondary(caption.strip(), subset)
    sep, kept, tail = subset.caption_separator, [], []
    marker = subset.keep_tokens_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        if marker in rest:
            rest, after = rest.split(marker, 1)
            tail = _tags(after, sep)
        kept, flex = _tags(head, sep), _tags(rest, sep)
    else:
        flex = _tags(caption, sep)
        kept, flex = flex[:subset.keep_tokens], flex[subset.keep_tokens:]
    if subset.shuffle_caption:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if subset.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
    return _secondary(", ".join(kept + flex + tail), subset)


def _secondary(caption: str, subset) -> str:
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption
