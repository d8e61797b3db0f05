"""Data warnings: each kind counted once with an example, shown as one line; with
``--strict-data`` the first of them stops the run instead."""

from __future__ import annotations

from ..errors import UserError

# kind -> the line shown: {n} the count, {example} one path, {detail} what that one shows.
MESSAGES = {
    "missing_caption": "{n} image(s) have no caption file: trained on their folder's class token or an empty caption, "
                       "e.g. {example}{detail}",
    "empty_caption": "{n} caption file(s) are empty, e.g. {example}",
    "multi_line": "{n} caption file(s) have several lines: only the first is used (as sd-scripts does), e.g. {example}",
    "too_small": "{n} image(s) would be enlarged more than --max-upscale to fill their bucket and are left out, "
                 "e.g. {example}{detail} (pass a larger --max-upscale to keep them)",
    "transparency": "{n} image(s) have transparency: composited on white (pass --alpha-mask to train on the opaque "
                    "part only), e.g. {example}",
    "no_mask": "{n} image(s) have neither alpha nor a NAME_mask.png: trained on the whole image, e.g. {example}",
    "unused_masks": "{n} NAME_mask.png file(s) are not images to train on and are skipped (--alpha-mask is off), "
                    "e.g. {example}",
    "animated": "{n} image(s) are animated: trained on their first frame only (as sd-scripts does), e.g. "
                "{example}{detail}: save the frame you want as a still image",
    "skipped_folders": "{n} sub-folder(s) are not named N_name and were not read, e.g. {example}",
    "linked_folders": "{n} sub-folder(s) are links to a folder already read and were not read again, e.g. "
                      "{example}{detail}",
    "empty_subset": "{n} folder(s) hold no images, e.g. {example}",
    "batch_too_large": "the batch size is larger than the data: batches hold fewer images{detail}, e.g. {example}",
    "small_buckets": "{n} bucket(s) hold fewer images than the batch size: their batches are smaller{detail}, "
                     "e.g. {example}",
    "unused_reg": "{n} regularization image(s) are not used: there are more than training images (as in sd-scripts), "
                  "e.g. {example}",
    "truncated_captions": "{n} caption(s) are longer than --max-token-length and are cut, e.g. {example}{detail} "
                          "(pass --max-token-length 150 or 225)",
}


class Problems:
    def __init__(self):
        self.kinds: dict[str, dict] = {}

    def add(self, kind: str, example, detail: str = "", count: int = 1) -> None:
        entry = self.kinds.setdefault(kind, {"count": 0, "example": str(example), "detail": detail})
        entry["count"] += count

    def line(self, kind: str) -> str:
        e = self.kinds[kind]
        return MESSAGES[kind].format(n=e["count"], example=e["example"], detail=e["detail"])

    def lines(self) -> list[str]:
        return [self.line(kind) for kind in MESSAGES if kind in self.kinds]

    def as_dict(self) -> dict:
        return {kind: {**self.kinds[kind], "message": self.line(kind)} for kind in MESSAGES if kind in self.kinds}

    def enforce(self, strict: bool) -> None:
        """With --strict-data, the first warning is an error (one line)."""
        lines = self.lines()
        if strict and lines:
            more = f" (and {len(lines) - 1} more kind(s) of data warning)" if len(lines) > 1 else ""
            raise UserError(f"data: {lines[0]}{more}: fix the data, or drop --strict-data")
