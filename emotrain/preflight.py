"""Checks of the training images that need no model: each distinct image's header is
read (cheap: no pixels decoded), so an unreadable file, a folder named like an image or
a decompression-bomb-sized image is refused in one line before the model loads."""

from __future__ import annotations

import warnings

from PIL import Image, UnidentifiedImageError

from .errors import UserError


def check_images(paths) -> None:
    for path in dict.fromkeys(paths):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large, but loads
                with Image.open(path) as img:
                    img.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise UserError(f"cannot read image {path} ({exc}): remove or replace the file") from None
