"""Image grids and PNG writing shared by every stage that shows pictures."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from latentforge import storage


def make_grid(rows: Sequence[np.ndarray], cell: int = 48, pad: int = 2,
              labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile rows of uint8 images (each row (n, H, W, C)) into one (H', W', 3) uint8 picture.

    Cells are upscaled with nearest-neighbour to `cell` pixels so tiny images stay legible;
    a row label (class name) is drawn at the left when given.
    """
    from PIL import Image, ImageDraw

    ncols = max((len(r) for r in rows), default=0)
    label_w = 18 if labels else 0
    width = label_w + ncols * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (cell + pad)
        if labels:
            draw.text((3, y + cell // 2 - 5), str(labels[r])[:2], fill=(230, 230, 230))
        for c, img in enumerate(row):
            arr = np.asarray(img)
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[:, :, 0]
            tile = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
            tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (cell + pad), y))
    return np.asarray(canvas)


def png_bytes(picture: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def save_png(picture: np.ndarray, path: str | Path) -> str:
    """Write a PNG atomically; returns its sha256."""
    return storage.write_bytes_atomic(path, png_bytes(picture))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C)."""
    arr = np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)
