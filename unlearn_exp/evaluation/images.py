"""Image inputs for judges and distances: PIL RGB in, files decoded once, tensors in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from unlearn_exp.errors import UserError

if TYPE_CHECKING:
    import torch

ImageLike = Image.Image | str | Path | np.ndarray


def load_rgb(item: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image, a file path, or an RGB ``uint8`` (H, W, 3) array."""
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, str | Path):
        path = Path(item)
        if not path.is_file():
            raise UserError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"cannot decode image {path}: {exc}") from None
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise UserError(f"an image array must be uint8 RGB (H, W, 3), got {item.dtype} {item.shape}")
        return Image.fromarray(item, "RGB")
    raise UserError(f"not an image: {type(item).__name__}")


def load_rgb_all(items: Sequence[ImageLike]) -> list[Image.Image]:
    return [load_rgb(i) for i in items]


def to_tensor(images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1]; a tensor passes through (it must already be in [-1, 1])."""
    import torch

    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"image tensor must be (B, 3, H, W), got {tuple(images.shape)}")
        return images.float()
    arrays = [np.asarray(load_rgb(i), dtype=np.float32) for i in images]
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images of different sizes cannot be batched: {sorted(shapes)}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0
