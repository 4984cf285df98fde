"""Image grids and PNG writing shared by every stage that shows pictures."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentforge import storage


def make_grid(rows: Sequence[np.ndarray], cell: int = 48, pad: int = 2,
              labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile rows of uint8 images (each row (n, H, W, C)) into one (H', W', 3) uint8 picture.

    Cells are upscaled with nearest-neighbour to `cell` pixels so tiny images stay legible;
    a row label (class name) is drawn at the left when given, whole where it fits in
    MAX_LABEL_WIDTH pixels (cat, car and cow stay apart), else cut with an ellipsis.
    """
    from PIL import Image, ImageDraw, ImageFont

    ncols = max((len(r) for r in rows), default=0)
    font = label_font() if labels else ImageFont.load_default()
    shown = [_fitted(str(t), font) for t in labels] if labels else []
    label_w = (min(MAX_LABEL_WIDTH, max(int(font.getlength(t)) for t in shown)) + 8
               if shown else 0)
    width = label_w + ncols * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (cell + pad)
        if shown:
            draw.text((4, y + cell // 2), shown[r], fill=(230, 230, 230), font=font, anchor="lm")
        for c, img in enumerate(row):
            arr = np.asarray(img)
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[:, :, 0]
            tile = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
            tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (cell + pad), y))
    return np.asarray(canvas)


MAX_LABEL_WIDTH = 96  # pixels of row label at most (about 16 characters of the default font)


@functools.cache
def label_font() -> Any:
    """DejaVu Sans as matplotlib ships it (accents, most scripts' letters, symbols), laid out
    by Pillow's own engine, not libraqm where it happens to be installed: the same pixels
    wherever the same Pillow and matplotlib are, so pictures under DVC stay reproducible.
    Else Pillow's own font (ASCII only)."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                      "DejaVuSans.ttf"), 11,
                                  layout_engine=ImageFont.Layout.BASIC)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _fitted(text: str, font: Any) -> str:
    """`text`, or its longest start that fits MAX_LABEL_WIDTH with an ellipsis after it."""
    if font.getlength(text) <= MAX_LABEL_WIDTH:
        return text
    while text and font.getlength(text + "…") > MAX_LABEL_WIDTH:
        text = text[:-1]
    return text + "…"


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
