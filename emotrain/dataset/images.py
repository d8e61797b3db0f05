"""Reading training images the way they look: upright per their EXIF orientation,
16-bit images at their full range, transparency composited on white (or kept as a loss
mask), then scaled to cover their bucket and cropped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from .buckets import Placement

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = "_mask.png"
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"image {path} is larger than Pillow's decompression-bomb limit "
                        f"({Image.MAX_IMAGE_PIXELS:,} pixels): scale it down or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}): remove or replace the file") from None


def inspect_image(path: Path) -> tuple[int, int, bool, int]:
    """-> (width, height as it is shown, has transparency, frames), from the header
    alone; an animated image (WebP, APNG) has more than one frame and trains on its first."""
    with _open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # a damaged EXIF block: the pixels may still be fine
            orientation = 1
        try:
            frames = getattr(img, "n_frames", 1)  # a GIF under another name counts by reading on
        except Exception:  # a damaged later frame: the first is what trains
            frames = 1
        alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    return (height, width, alpha, frames) if orientation in TRANSPOSED else (width, height, alpha, frames)


def _channels(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (HxWxC float32 in [0, 1], HxW alpha or None), at the image's own bit depth."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit and float grey: PIL's RGB clips at 255
        grey = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if mode != "F" and (mode.startswith("I;16") or grey.max() > 255) else \
            (1.0 if mode == "F" and grey.max() <= 1.0 else 255.0)
        return np.repeat(np.clip(grey / peak, 0, 1)[..., None], 3, axis=2), None
    alpha = None
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        img = rgba.convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")  # palette, CMYK, greyscale...
    return np.asarray(img, dtype=np.float32) / 255.0, alpha


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The upright image as HxWx3 float32 in [0, 1] and its alpha (HxW) or None."""
    with _open(path) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _channels(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"cannot read image {path} ({exc}): remove or replace the file") from None


def read_mask(path: Path) -> np.ndarray:
    """A mask image as HxW float32 in [0, 1] (white: trained, black: ignored)."""
    rgb, alpha = read_image(path)
    grey = rgb.mean(axis=2)
    return grey * alpha if alpha is not None else grey


def _fit(array: np.ndarray, place: Placement, crop: tuple[int, int]) -> torch.Tensor:
    """HxWxC -> CxHxW scaled to ``place.scaled`` (bicubic, antialiased) and cropped."""
    t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    if tuple(t.shape[2:]) != place.scaled:
        t = F.interpolate(t, size=place.scaled, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    (y, x), (h, w) = crop, place.target
    return t[0, :, y:y + h, x:x + w].contiguous()


def load_pixels(path: Path, place: Placement, crop: tuple[int, int] | None = None, flip: bool = False,
                mask: bool = False, mask_file: Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (pixels 3xHxW in [-1, 1], loss mask 1xHxW in [0, 1] or None). Transparency is
    composited on white; with ``mask`` the alpha channel (or ``mask_file``) is the mask."""
    rgb, alpha = read_image(path)
    if rgb.shape[:2] != place.original:
        raise UserError(f"image {path} changed while training was being prepared: start again")
    weights = None
    if mask:
        if mask_file is not None:
            weights = read_mask(mask_file)
            if weights.shape != rgb.shape[:2]:
                raise UserError(f"mask {mask_file} is {weights.shape[1]}x{weights.shape[0]} but its image is "
                                f"{rgb.shape[1]}x{rgb.shape[0]}: make them the same size")
        else:
            weights = alpha if alpha is not None else np.ones(rgb.shape[:2], dtype=np.float32)
    if alpha is not None:
        rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])
    crop = crop or place.crop
    pixels = _fit(rgb, place, crop) * 2.0 - 1.0
    weights = None if weights is None else _fit(weights[..., None], place, crop)
    if flip:
        pixels = pixels.flip(-1)
        weights = None if weights is None else weights.flip(-1)
    return pixels, weights


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A pixel mask (1xHxW) averaged over each latent pixel's 8x8 block."""
    return F.avg_pool2d(mask[None], factor)[0]
