"""Image sources for the prepare stage: embedded digits and shapes, MNIST IDX, image folders, npz.

Each reader returns every image already brought to the requested square resolution and
channel count, the labels, the class names, a fingerprint of the raw source (sha256 over
its bytes) and a record of each decision it took, for report.json: how each image mode was
converted, which files it skipped or ignored and why, how it read the labels, which classes
came out empty. Sources may be local or any fsspec URL.

Embedded sources need no files: `digits` is scikit-learn's 8x8 digits (gray); `shapes` is
drawn here, the RGB data set: 8 classes (SHAPE_CLASSES) of one flat-coloured shape each, at
a random size (7-12 pixels from centre to edge), position (centre within 4 pixels of the
middle) and tilt (+-10 degrees), over a texture (low-frequency noise, stripes or a checker)
between two colours at most 40 levels apart per channel. The shape's colour is at least 70
luma levels from the background's mean, so the class stays learnable in gray (channels 1
converts it by luma like any RGB image). Drawn at 32x32 from `prepare.seed` alone (image i
from the stream (seed, i), class i mod 8), then resized to `resolution` like any source.
Why the centre stays near the middle: with shapes anywhere in the frame the shapes preset's
tiny flow generator (2D 8x8-pixel latents, 3000 steps) reached evaluator accuracy 0.34 and
gFD-eval 36; within 4 pixels, 0.47 and 18 (same tokenizer recipe, 25.7 dB both).

Image modes. `convert_image` is the one conversion from a Pillow mode to 8-bit gray (L) or
RGB. Pillow's own `convert("L")` clips 16- and 32-bit values at 255 (I;16 32768 -> 255),
truncates F (0.5 -> 0) and drops alpha, so those modes are handled here (checked on
Pillow 13):

    1                 0 -> 0, 1 -> 255
    L, RGB            as they are
    P                 palette looked up
    RGBX              padding band dropped
    CMYK              Pillow's R = (255 - C)(255 - K) / 255 (no ICC profile applied)
    YCbCr             Pillow's BT.601 full-range (JPEG) YCbCr -> RGB
    LAB               Pillow's CIELAB (D65) -> sRGB (within about one level)
    HSV               Pillow's HSV -> RGB
    I;16 (B, L, N)    value / 65535: 65535 -> 255, 32768 -> 128
    I                 value / 65535 when every value lies in 0..65535 (16-bit data, as
                      Pillow's PGM and older PNG decoders give it); other values are rejected:
                      no fixed scale fits them (dividing by 2^31 - 1 would blacken 16-bit
                      data, and each image's own min..max would change contrast per image)
    F                 value * 255 when every value lies in 0..1; NaN, inf or any value
                      outside 0..1 is rejected rather than clipped or stretched
    LA, PA, RGBA      alpha composited on white (255), what a browser shows behind a
                      transparent image; La and RGBa are un-premultiplied first; a
                      `transparency` colour or palette entries (PNG tRNS, GIF) count as alpha
Colour becomes gray by Pillow's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B); gray
becomes RGB by repetition. Any other mode is rejected by name. A rejected image is a bad
image: skipped and reported under `on_bad_image: skip`, a DataError under `fail`.

Labels (idx, npz) must be whole numbers >= 0, and below len(class_names) when an npz holds
`class_names`; whole-valued floats (1.0) are accepted and cast; NaN, 1.5, -1 or a value
past the names is a DataError naming the file, the position and the value. Without class
names the distinct label values are the classes, renumbered 0..K-1 in order and named by
their values.

Empty classes (a class sub-folder with no image files or whose images were all skipped, a
name in an npz's `class_names` that no label uses) are left out of class_names with a
warning under `on_bad_image: skip`, and are a DataError under `fail`. In an image folder,
files outside a class sub-folder, with another suffix, or below a hidden (dot) name are
ignored and listed.

Image folders as people bring them: a class is the first folder below `path` (compared as
paths, so `./data` reads like `data`), or the second where every top-level folder is a split
folder (train/, val/, test/, ...: pooled, and split anew like every source); images deeper
down count in their class, with a warning naming one; symlinked folders are followed, each
real folder once. A photo is turned upright by its EXIF orientation before conversion (a
phone stores it sideways with a tag saying how to turn it). A class folder whose name is not
UTF-8 text is a DataError (class names go into JSON, MLflow and figures); a file so named is
read, its bytes entering the fingerprint. Prepared data whose brightest pixel is below 32
(12-bit data in 16-bit files, scaled by 65535) is called out in a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import struct
import unicodedata
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from latentforge import storage
from latentforge.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

    from latentforge.config import PrepareConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
ALPHA_BACKGROUND = 255  # white; see the module docstring
IDX_UBYTE = 0x08
# IDX type codes (third magic byte) -> big-endian dtype; images must be unsigned bytes.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

SIXTEEN_BIT = "16-bit gray: value / 65535"
MODE_HOW = {
    "1": "1-bit: 0 -> 0, 1 -> 255",
    "L": "8-bit gray as is",
    "P": "palette looked up",
    "RGB": "8-bit RGB as is",
    "RGBX": "8-bit RGB, padding band dropped",
    "CMYK": "Pillow's CMYK -> RGB, R = (255 - C)(255 - K) / 255, no ICC profile",
    "YCbCr": "Pillow's YCbCr -> RGB (BT.601 full range, as in JPEG)",
    "LAB": "Pillow's CIELAB (D65) -> sRGB",
    "HSV": "Pillow's HSV -> RGB",
    "LA": "8-bit gray with alpha",
    "La": "8-bit gray with premultiplied alpha, un-premultiplied",
    "PA": "palette with alpha looked up",
    "RGBA": "8-bit RGB with alpha",
    "RGBa": "8-bit RGB with premultiplied alpha, un-premultiplied",
    "I;16": SIXTEEN_BIT, "I;16B": SIXTEEN_BIT, "I;16L": SIXTEEN_BIT, "I;16N": SIXTEEN_BIT,
    "I": "32-bit integer gray holding 0..65535: value / 65535",
    "F": "32-bit float gray in 0..1: value * 255",
}
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


@dataclass
class SourceData:
    images: np.ndarray  # (N, R, R, C) uint8
    labels: np.ndarray  # (N,) int64, indices into class_names
    class_names: list[str]
    fingerprint: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    conversions: list[dict[str, Any]] = field(default_factory=list)  # {"mode", "how", "images"}
    label_handling: dict[str, Any] = field(default_factory=dict)
    empty_classes: list[dict[str, str]] = field(default_factory=list)  # {"class", "path", "reason"}
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: never read
    warnings: list[str] = field(default_factory=list)
    # (N,) str: the part of the source's own split each image came from (a split folder's
    # name, an IDX file's name); None where the source has no split of its own
    origins: np.ndarray | None = None


# A source's own split parts by role (`prepare.split: given`), matched against a split
# folder's name or a word of an IDX file's name (train-images..., t10k-images...).
SPLIT_ROLES = {"train": frozenset({"train", "training"}),
               "val": frozenset({"val", "valid", "validation", "dev"}),
               "test": frozenset({"test", "testing", "t10k", "holdout"})}


def split_role(origin: str) -> str | None:
    """train, val or test for one part of a source's own split (None: not recognised)."""
    words = {w for w in re.split(r"[^a-z0-9]+", origin.lower()) if w}
    roles = [role for role, names in SPLIT_ROLES.items() if words & names]
    return roles[0] if len(roles) == 1 else None


# --------------------------------------------------------------------------------------------
# Image conversion
# --------------------------------------------------------------------------------------------


def _filter(name: str) -> int:
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX}[name]


def _high_bit_gray(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(H, W, 1) gray in 0..255 as float, (H, W, 1) alpha in 0..1 or None, and notes."""
    arr = np.asarray(img)
    if img.mode == "F":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise ValueError(f"image mode F holds {bad} NaN or infinite value(s); expected "
                             "values in 0..1")
        scale, top = 255.0, 1.0
    else:
        scale, top = 255.0 / 65535.0, 65535.0
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > top:
        raise ValueError(f"image mode {img.mode} holds values {lo:g}..{hi:g}, expected "
                         f"0..{top:g}; rejected rather than clipped or stretched")
    gray = arr.astype(np.float64)[..., None] * scale
    t = img.info.get("transparency")
    if isinstance(t, int) and img.mode != "F":
        return gray, (arr != t).astype(np.float64)[..., None], [
            f"pixels of value {t} (its transparency) made transparent"]
    return gray, None, []


def convert_image(img: Image.Image, channels: int) -> tuple[Image.Image, str]:
    """Bring an image of any supported mode to L (channels 1) or RGB (3), saying how.

    Raises ValueError naming the mode, or the values, when it cannot convert faithfully.
    """
    from PIL import Image

    mode = img.mode
    if mode not in MODE_HOW:
        raise ValueError(f"image mode {mode!r} is not supported (supported: "
                         f"{', '.join(MODE_HOW)})")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has no pixels ({img.width}x{img.height})")
    how = [MODE_HOW[mode]]
    target = "L" if channels == 1 else "RGB"
    alpha: np.ndarray | None = None
    if mode in HIGH_BIT_MODES:  # Pillow clips these at 255 (F: truncates 0.5 to 0)
        pixels, alpha, notes = _high_bit_gray(img)
        how += notes
    elif img.has_transparency_data:  # Pillow's convert to L or RGB drops alpha
        bands = np.asarray(img.convert("LA" if mode in GRAY_MODES else "RGBA"), np.float64)
        pixels, alpha = bands[..., :-1], bands[..., -1:] / 255.0
        if mode not in ALPHA_MODES:
            how.append("its transparency colour or palette entries made alpha")
    else:
        # Pillow has no LAB -> L; every other mode here converts exactly as before.
        out = img.convert("RGB").convert(target) if mode == "LAB" else img.convert(target)
        return out, "; ".join(how + _channel_note(mode, channels) + _file_notes(img))
    if alpha is not None:
        pixels = pixels * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
        how.append(f"alpha composited on white ({ALPHA_BACKGROUND})")
    arr = np.round(pixels).astype(np.uint8)  # (H, W, 1) or (H, W, 3)
    out = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert(target)
    return out, "; ".join(how + _channel_note(mode, channels) + _file_notes(img))


def _channel_note(mode: str, channels: int) -> list[str]:
    if channels == 1 and mode not in GRAY_MODES:
        return ["to gray by ITU-R 601-2 luma"]
    if channels == 3 and mode in GRAY_MODES:
        return ["gray repeated to RGB"]
    return []


def _file_notes(img: Image.Image) -> list[str]:
    notes = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append("first frame of a multi-frame file")
    if img.info.get("icc_profile"):
        notes.append("embedded ICC profile not applied")
    return notes


def resize_square(img: Image.Image, resolution: int, resize_filter: str) -> np.ndarray:
    """Resize the shorter side of an L or RGB image to `resolution`, centre-crop: (R, R, C)."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _filter(resize_filter))
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _conversions(tally: Counter[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"mode": mode, "how": how, "images": n} for (mode, how), n in sorted(tally.items())]


def _transform_all(arrays: Any, cfg: PrepareConfig, origin: str
                   ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Convert and resize uint8 arrays (H, W) or (H, W, C); `origin` prefixes each `how`."""
    from PIL import Image

    out, tally = [], Counter[tuple[str, str]]()
    for a in arrays:
        img = Image.fromarray(np.ascontiguousarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1
                                                   else a))
        try:
            converted, how = convert_image(img, cfg.channels)
        except ValueError as exc:  # cannot happen for uint8 L/LA/RGB/RGBA; kept as a guard
            raise DataError(f"{cfg.path}: {exc}") from None
        tally[(img.mode, f"{origin}; {how}")] += 1
        out.append(resize_square(converted, cfg.resolution, cfg.resize_filter))
    if not out:
        return np.zeros((0, cfg.resolution, cfg.resolution, cfg.channels), np.uint8), []
    return np.stack(out), _conversions(tally)


# --------------------------------------------------------------------------------------------
# Labels and classes
# --------------------------------------------------------------------------------------------


def check_labels(path: str, raw: np.ndarray, names: list[str] | None) -> np.ndarray:
    """(N,) int64 labels after checking each is a whole number >= 0 (< len(names) if given)."""
    expected = (f"class indices 0..{len(names) - 1} ({len(names)} class names)"
                if names is not None else "whole numbers >= 0")
    if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer)
                                 or np.issubdtype(raw.dtype, np.floating)):
        raise DataError(f"{path}: labels must be integers, got {raw.dtype}; expected {expected}")

    def first_bad(mask: np.ndarray, problem: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise DataError(f"{path}: label {raw[i].item()!r} at index {i} {problem}; "
                            f"expected {expected}")

    if np.issubdtype(raw.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            # 2^53: past it a float no longer tells whole numbers apart
            first_bad(~np.isfinite(raw) | (raw != np.round(raw)) | (np.abs(raw) >= 2**53),
                      "is not a whole number")
    first_bad(raw < 0, "is negative")
    if names is not None:
        first_bad(raw >= len(names), "is out of range")
    return raw.astype(np.int64)


def number_classes(values: np.ndarray, names: list[str] | None
                   ) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Class indices, class names and the renumbering {value: index} where it changes any.

    With names the checked values are the indices; without, the distinct values are the
    classes, renumbered 0..K-1 in order and named by their values.
    """
    if names is not None:
        return values, list(names), {}
    distinct = np.unique(values)
    renumbered = {str(v): i for i, v in enumerate(distinct.tolist()) if v != i}
    return (np.searchsorted(distinct, values).astype(np.int64), [str(v) for v in distinct.tolist()],
            renumbered)


def drop_empty_classes(labels: np.ndarray, class_names: list[str],
                       describe: dict[str, tuple[str, str]], cfg: PrepareConfig
                       ) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Leave out classes without images (with a record each), or raise under 'fail'.

    `describe` gives, per class name, the path to name and why the class could be empty.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [{"class": c, "path": describe[c][0], "reason": describe[c][1]}
             for c, n in zip(class_names, counts, strict=True) if n == 0]
    if not empty:
        return labels, class_names, []
    if cfg.on_bad_image == "fail":
        e = empty[0]
        more = (f" (and {len(empty) - 1} more: {', '.join(x['class'] for x in empty[1:])})"
                if len(empty) > 1 else "")
        raise DataError(f"{e['path']}: class '{e['class']}' has no images: {e['reason']}{more} "
                        "(prepare.on_bad_image is 'fail')")
    keep = np.flatnonzero(counts > 0)
    index = np.full(len(class_names), -1, np.int64)
    index[keep] = np.arange(len(keep))
    return index[labels], [class_names[i] for i in keep], empty


def _empty_warnings(empty: list[dict[str, str]]) -> list[str]:
    warnings = [f"class '{e['class']}' has no images ({e['reason']}) and is left out of "
                f"class_names: {e['path']}" for e in empty]
    for w in warnings:
        log.warning("%s", w)
    return warnings


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def read_digits(cfg: PrepareConfig) -> SourceData:
    """scikit-learn's embedded 8x8 digits (1797 images, values 0..16), scaled to 0..255."""
    import sklearn
    from sklearn.datasets import load_digits

    data = load_digits()
    raw = np.round(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    labels = data.target.astype(np.int64)
    fingerprint = hashlib.sha256(
        b"sklearn-digits:" + sklearn.__version__.encode() + raw.tobytes() + labels.tobytes()
    ).hexdigest()
    images, conversions = _transform_all(raw, cfg, "scikit-learn digits 0..16 scaled by 255/16")
    return SourceData(images, labels, [str(i) for i in range(10)], fingerprint,
                      conversions=conversions,
                      label_handling={"from": "scikit-learn digits targets 0..9",
                                      "class_names": "the digits 0..9"})


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------

# Bump SHAPES_VERSION whenever the drawing changes: it and every constant below enter the
# fingerprint, so DVC and the lineage tags see a new data set.
SHAPES_VERSION = "shapes/1"
SHAPES_SIDE = 32  # drawn at 32x32; other resolutions resize through _transform_all
SHAPES_SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down: antialiased edges
SHAPE_CLASSES = ("circle", "ring", "square", "diamond", "triangle", "cross", "star", "crescent")
SHAPE_RADIUS = (7.0, 12.0)  # half the shape's extent in pixels at 32x32
SHAPE_JITTER = 4.0  # the centre moves by at most this many pixels in x and in y
SHAPE_TILT_DEG = 10.0  # polygons turn by at most this: squares and diamonds stay 25+ deg apart
BACKGROUND_LEVELS = (30.0, 225.0)  # the background's first colour, per channel
BACKGROUND_CONTRAST = 40.0  # its second colour differs by at most this per channel
MIN_LUMA_GAP = 70.0  # shape vs background mean luma: the class survives channels 1


def _shape_polygon(name: str, cx: float, cy: float, r: float, tilt: float
                   ) -> list[tuple[float, float]]:
    """The vertices of a polygonal shape of half-extent r centred at (cx, cy), turned by tilt."""
    if name == "square":
        s = 0.8 * r  # about the circle's area
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif name == "diamond":
        pts = [(0.0, -r), (r, 0.0), (0.0, r), (-r, 0.0)]
    elif name == "triangle":  # equilateral, pointing up, centroid at the centre
        pts = [(r * np.sin(a), -r * np.cos(a)) for a in np.radians([0.0, 120.0, 240.0])]
    elif name == "cross":
        w = 0.32 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
    elif name == "star":  # five points, inner radius 0.45 r
        pts = [((r if k % 2 == 0 else 0.45 * r) * np.sin(np.pi * k / 5),
                -(r if k % 2 == 0 else 0.45 * r) * np.cos(np.pi * k / 5)) for k in range(10)]
    else:
        raise ValueError(f"{name} is not a polygon")
    c, s_ = np.cos(tilt), np.sin(tilt)
    return [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in pts]


def _shape_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """(32, 32) coverage in 0..1 of one shape at a random size, position and tilt."""
    from PIL import Image, ImageDraw

    k = SHAPES_SUPERSAMPLE
    r = rng.uniform(*SHAPE_RADIUS)
    jitter = min(SHAPE_JITTER, SHAPES_SIDE / 2 - r - 1.0)  # never cut by the border
    cx, cy = SHAPES_SIDE / 2 + rng.uniform(-jitter, jitter, size=2)
    tilt = np.radians(rng.uniform(-SHAPE_TILT_DEG, SHAPE_TILT_DEG))
    img = Image.new("L", (SHAPES_SIDE * k, SHAPES_SIDE * k), 0)
    draw = ImageDraw.Draw(img)

    def disc(x: float, y: float, radius: float, fill: int) -> None:
        draw.ellipse([k * (x - radius), k * (y - radius), k * (x + radius), k * (y + radius)],
                     fill=fill)

    if name == "circle":
        disc(cx, cy, r, 255)
    elif name == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif name == "crescent":  # the bite may face any way
        phi = rng.uniform(0.0, 2.0 * np.pi)
        disc(cx, cy, r, 255)
        disc(cx + 0.5 * r * np.cos(phi), cy + 0.5 * r * np.sin(phi), 0.8 * r, 0)
    else:
        draw.polygon([(k * x, k * y) for x, y in _shape_polygon(name, cx, cy, r, tilt)],
                     fill=255)
    small = img.resize((SHAPES_SIDE, SHAPES_SIDE), Image.Resampling.BOX)
    return np.asarray(small, np.float64) / 255.0


def _luma(rgb: np.ndarray) -> float:
    """ITU-R 601-2 luma of one RGB colour, the weights channels 1 converts with."""
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator) -> np.ndarray:
    """(32, 32, 3) float texture between two close colours: noise, stripes or a checker."""
    from PIL import Image

    side = SHAPES_SIDE
    c0 = rng.uniform(*BACKGROUND_LEVELS, size=3)
    c1 = np.clip(c0 + rng.uniform(-BACKGROUND_CONTRAST, BACKGROUND_CONTRAST, size=3), 0, 255)
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:  # low-frequency noise: a 5x5 random grid smoothly upsampled
        grid = rng.uniform(0.0, 1.0, (5, 5)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((side, side), Image.Resampling.BICUBIC)
        p = np.clip(np.asarray(up, np.float64), 0.0, 1.0)
    elif kind == 1:  # stripes at any angle, period 4..12 pixels
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
        p = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period
                               + phase)
    else:  # checker of 3..8-pixel cells
        cell, ox, oy = rng.integers(3, 9), rng.integers(8), rng.integers(8)
        p = (((x + ox) // cell + (y + oy) // cell) % 2).astype(np.float64)
    return c0 * (1.0 - p[..., None]) + c1 * p[..., None]


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_LUMA_GAP from the background's mean luma."""
    target = _luma(background.reshape(-1, 3).mean(0))
    for _ in range(100):
        colour = rng.uniform(0.0, 255.0, size=3)
        if abs(_luma(colour) - target) >= MIN_LUMA_GAP:
            return colour
    return np.full(3, 0.0 if target > 127.5 else 255.0)  # practically never reached


def draw_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) uint8 images and (n,) int64 labels; image i is class i mod 8.

    Each image draws from its own stream keyed by (seed, i), so the first m images are the
    same whatever n is.
    """
    images = np.empty((n, SHAPES_SIDE, SHAPES_SIDE, 3), np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(SHAPE_CLASSES)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        background = _background(rng)
        mask = _shape_mask(SHAPE_CLASSES[labels[i]], rng)[..., None]  # (32, 32, 1)
        pixels = background * (1.0 - mask) + _shape_colour(rng, background) * mask
        images[i] = np.round(pixels).clip(0, 255).astype(np.uint8)
    return images, labels


def read_shapes(cfg: PrepareConfig) -> SourceData:
    """Procedural coloured shapes on textured backgrounds, drawn from `seed` (no files)."""
    import PIL

    raw, labels = draw_shapes(cfg.shapes_images, cfg.seed)
    recipe = {"version": SHAPES_VERSION, "images": cfg.shapes_images, "seed": cfg.seed,
              "side": SHAPES_SIDE, "supersample": SHAPES_SUPERSAMPLE,
              "classes": list(SHAPE_CLASSES), "radius": list(SHAPE_RADIUS),
              "jitter": SHAPE_JITTER, "tilt_deg": SHAPE_TILT_DEG,
              "background_levels": list(BACKGROUND_LEVELS),
              "background_contrast": BACKGROUND_CONTRAST, "min_luma_gap": MIN_LUMA_GAP}
    # The pixels themselves enter too: another Pillow may rasterise an edge differently.
    fingerprint = hashlib.sha256(
        b"latentforge-shapes:" + json.dumps(recipe, sort_keys=True).encode()
        + PIL.__version__.encode() + raw.tobytes() + labels.tobytes()).hexdigest()
    images, conversions = _transform_all(
        raw, cfg, f"procedural shapes ({SHAPES_VERSION}) drawn at {SHAPES_SIDE}x{SHAPES_SIDE} RGB")
    return SourceData(images, labels, list(SHAPE_CLASSES), fingerprint, conversions=conversions,
                      label_handling={"from": f"procedural shapes: image i is class i mod "
                                              f"{len(SHAPE_CLASSES)}",
                                      "class_names": "the shape names"})


# --------------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------------


def _idx_bytes(path: str) -> bytes:
    data = storage.read_bytes(path)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    return data


def parse_idx(path: str, data: bytes, ndim: int, types: tuple[int, ...] = (IDX_UBYTE,)
              ) -> np.ndarray:
    """Parse an IDX file of `ndim` dimensions and one of `types`, checking header and length."""
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    type_code = (magic >> 8) & 0xFF
    if magic >> 16 or type_code not in types or magic & 0xFF != ndim:
        others = (f" (or type 0x{'/0x'.join(f'{t:02x}' for t in types[1:])} for labels)"
                  if len(types) > 1 else "")
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x}, expected "
                        f"0x{(types[0] << 8) | ndim:08x}{others}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: {len(data)} bytes, expected {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: wrong dimensions {dims[1]}x{dims[2]} in the IDX header")
    dtype = np.dtype(IDX_TYPES[type_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        shape = "x".join(str(d) for d in dims)
        raise DataError(f"{path}: header declares {shape} = {expected} bytes of data but the "
                        f"file holds {actual}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _idx_pairs(path: str, warnings: list[str]) -> list[tuple[str, str]]:
    """(images, labels) IDX files found at `path`; what was noticed goes into `warnings`."""
    files = storage.list_files(path) if not _looks_like_idx_images(path) else [path]
    images = [f for f in files if _looks_like_idx_images(f)]
    # torchvision's MNIST/raw keeps each file twice, unpacked and as .gz: read it once
    unpacked = set(images)
    doubles = [f for f in images if f.endswith(".gz") and f.removesuffix(".gz") in unpacked]
    for f in doubles:
        images.remove(f)
        message = f"{f} is {f.removesuffix('.gz')} compressed: read once, unpacked"
        log.warning("%s", message)
        warnings.append(message)
    pairs = []
    for img in images:
        lbl = img.replace("images-idx3-ubyte", "labels-idx1-ubyte").replace(
            "images.idx3-ubyte", "labels.idx1-ubyte")
        if not storage.exists(lbl):
            raise DataError(f"{img}: no matching label file (expected {lbl})")
        pairs.append((img, lbl))
    return pairs


def _looks_like_idx_images(path: str) -> bool:
    name = PurePosixPath(str(path)).name
    return "idx3-ubyte" in name


def read_idx(cfg: PrepareConfig) -> SourceData:
    """MNIST-format IDX pairs (raw or .gz) found in `cfg.path` (a folder or an images file)."""
    warnings: list[str] = []
    pairs = _idx_pairs(cfg.path, warnings)
    if not pairs:
        raise DataError(f"{cfg.path}: no IDX image files (*-images-idx3-ubyte[.gz]) found")
    digest = hashlib.sha256(b"idx")
    all_images, all_labels, label_dtypes, origins = [], [], set(), []
    for img_path, lbl_path in pairs:
        img_bytes, lbl_bytes = _idx_bytes(img_path), _idx_bytes(lbl_path)
        digest.update(hashlib.sha256(img_bytes).digest() + hashlib.sha256(lbl_bytes).digest())
        images = parse_idx(img_path, img_bytes, 3)
        raw_labels = parse_idx(lbl_path, lbl_bytes, 1, tuple(IDX_TYPES))
        if len(images) != len(raw_labels):
            raise DataError(f"image count disagrees with label count: {img_path} has "
                            f"{len(images)} images but {lbl_path} has {len(raw_labels)} labels")
        all_images.append(images)
        all_labels.append(check_labels(lbl_path, raw_labels, None))
        origins += [PurePosixPath(img_path).name] * len(images)
        label_dtypes.add(raw_labels.dtype.name)
    labels, names, renumbered = number_classes(np.concatenate(all_labels), None)
    images, conversions = _transform_all(np.concatenate(all_images), cfg, "IDX unsigned bytes")
    handling = {"from": f"IDX label files ({', '.join(sorted(label_dtypes))})",
                "checks": "whole numbers >= 0",
                "class_names": "the distinct label values, in order", "renumbered": renumbered,
                "files": f"{len(pairs)} image/label pair(s)" + (
                    " kept as the source's own split (prepare.split given)"
                    if cfg.split == "given" else " pooled (MNIST's train and t10k alike), then "
                    "split anew by prepare.val_fraction")}
    return SourceData(images, labels, names, digest.hexdigest(), conversions=conversions,
                      label_handling=handling, warnings=warnings,
                      origins=np.array(origins, dtype=str))


# --------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------


def decode_image(path: str, data: bytes) -> Image.Image:
    """Decode fully (so truncation is detected now), or raise ValueError with the reason.

    A damaged multi-frame file (GIF, TIFF) can decode its first frame and fail only when its
    frames are counted, with IndexError, KeyError or TypeError from inside Pillow: the count
    is taken here, so any of those is a bad image too, not a crash of the stage."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        getattr(img, "n_frames", 1)  # counted now (Pillow keeps the count for _file_notes)
    except UnidentifiedImageError:
        raise ValueError("not a decodable image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode: {exc}") from None
    except (IndexError, KeyError, TypeError, struct.error, EOFError) as exc:
        raise ValueError(f"cannot decode: damaged file ({type(exc).__name__}: {exc})") from None
    return img


# Top-level folders of a data set that ships its own split (ImageNet-style train/ and val/):
# their sub-folders are the classes. Pooled and split anew, or kept (`prepare.split: given`).
SPLIT_FOLDERS = frozenset().union(*SPLIT_ROLES.values())


@dataclass
class FolderListing:
    """What a folder source holds: image files by class, and everything else with why."""

    entries: list[tuple[str, str, str]]  # (class, relative name, full path) per image file
    others: dict[str, int]  # class -> count of other files (every class folder has an entry)
    ignored: list[dict[str, str]]  # files left out, with why
    class_dirs: dict[str, list[str]]  # class -> its folder(s) (one per split folder)
    splits: list[str]  # the split folders pooled (empty: the classes are top-level folders)
    nested: list[str]  # image files below a sub-folder of their class folder


def _relative(root: str, path: str) -> PurePosixPath:
    """`path` below `root`, as listed: a local path is compared as a path, so that `./data`
    or `data/./x` name the same folder as `data` does."""
    if storage.is_url(root):
        return PurePosixPath(path[len(root):].lstrip("/"))
    return PurePosixPath(Path(path).relative_to(Path(root)).as_posix())


def _list_folder(root: str) -> FolderListing:
    """The folder source's files: one sub-folder per class, or train/, val/ ... folders each
    with one sub-folder per class; images deeper down count in their class."""
    rels = [(_relative(root, f), f) for f in storage.list_files(root)]
    visible = [rel for rel, _ in rels if not any(p.startswith(".") for p in rel.parts)]
    images = [rel for rel in visible if rel.suffix.lower() in IMAGE_SUFFIXES and len(rel.parts) > 1]
    # Split folders: every top-level folder holding images is one (a docs/ folder beside them
    # does not count), and some image sits in a folder below one (train/cat/1.png; an
    # unlabelled test/*.png beside train/cat/ is then listed as outside a class folder).
    tops = {rel.parts[0] for rel in images}
    split = bool(tops) and all(t.lower() in SPLIT_FOLDERS for t in tops) and any(
        len(rel.parts) >= 3 for rel in images)
    depth = 2 if split else 1  # parts up to and including the class folder
    listing = FolderListing([], {}, [], {}, sorted(tops) if split else [], [])

    def class_of(rel: PurePosixPath) -> str:
        # One spelling per class: macOS (and zips made there) store names decomposed (NFD),
        # so val/café from one beside train/café from another would be two classes.
        name = unicodedata.normalize("NFC", rel.parts[depth - 1])
        listing.others.setdefault(name, 0)
        folder = "/".join(rel.parts[:depth])
        if folder not in listing.class_dirs.setdefault(name, []):
            listing.class_dirs[name].append(folder)
        return name

    for rel, path in rels:
        f = shown(path)
        if any(p.startswith(".") for p in rel.parts):
            listing.ignored.append({"path": f, "reason": "hidden (a name starts with '.')"})
            if len(rel.parts) > depth and not any(p.startswith(".") for p in rel.parts[:depth]):
                listing.others[class_of(rel)] += 1
        elif len(rel.parts) <= depth:
            listing.ignored.append({"path": f, "reason": "not inside a class sub-folder" + (
                " of a split folder" if split and len(rel.parts) == 2 else "")})
        elif rel.suffix.lower() not in IMAGE_SUFFIXES:
            listing.others[class_of(rel)] += 1
            listing.ignored.append({"path": f, "reason": f"suffix '{rel.suffix}' is not one of "
                                                         f"{' '.join(IMAGE_SUFFIXES)}"})
        else:
            listing.entries.append((class_of(rel), str(rel), path))
            if len(rel.parts) > depth + 1:
                listing.nested.append(shown(str(rel)))
    if not storage.is_url(root) and Path(root).is_dir():  # object stores hold no empty folders
        parents = [Path(root) / t for t in listing.splits] if split else [Path(root)]
        for parent in parents:
            for d in sorted(parent.iterdir()):
                if d.is_dir() and not d.name.startswith("."):
                    class_of(PurePosixPath(d.relative_to(root).as_posix()))
    return listing


def _folder_warnings(root: str, listing: FolderListing, split: str) -> list[str]:
    warnings = []
    if listing.splits and split == "random":
        warnings.append(
            f"{root} holds split folders ({', '.join(s + '/' for s in listing.splits)}): their "
            "sub-folders are the classes, pooled across them, and prepare splits the images "
            "anew by prepare.val_fraction and prepare.seed (prepare.split: given keeps theirs)")
    if listing.nested:
        warnings.append(f"{len(listing.nested)} image file(s) sit in folders below their class "
                        f"folder and count in that class (e.g. {listing.nested[0]})")
        shared = [] if listing.splits else _shared_subfolders(listing.nested)
        if len(shared) >= 2:  # one (cat/images/, dog/images/) is a common way to keep images
            tops = sorted(listing.class_dirs)
            warnings.append(
                f"the class folders {', '.join(tops[:5])}{', ...' if len(tops) > 5 else ''} "
                f"hold the same sub-folders ({', '.join(shared[:5])}"
                f"{', ...' if len(shared) > 5 else ''}): if they are a split, name them train/, "
                "val/ (or dev/) and test/ so that their sub-folders become the classes")
    for w in warnings:
        log.warning("%s", w)
    return warnings


def _shared_subfolders(nested: list[str]) -> list[str]:
    """The sub-folder names that two or more class folders have in common (`train/cat/1.png`
    and `dev/cat/2.png`: cat), from the images that sit below their class folder."""
    owners: dict[str, set[str]] = {}
    for rel in nested:
        parts = PurePosixPath(rel).parts
        owners.setdefault(parts[1], set()).add(parts[0])
    return sorted(name for name, classes in owners.items() if len(classes) > 1)


def _check_class_names(root: str, names: list[str]) -> None:
    """Class names go into JSON, MLflow and figure labels: they must be text."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{root}: class folder {os.fsencode(name)!r} has a name that is not "
                            "UTF-8 text (class names must be, e.g. a Latin-1 name from a zip "
                            "made on Windows); rename the folder") from None


def shown(path: str) -> str:
    """A path as text for reports, logs and MLflow: a local name that is not UTF-8 (its bytes
    kept as surrogates by the OS layer) shows them as \\xNN escapes instead of breaking every
    UTF-8 writer downstream."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _name_bytes(root: str, rel_name: str) -> bytes:
    """The file's relative name as bytes for the source fingerprint (a local name that is not
    UTF-8 keeps its own bytes)."""
    return rel_name.encode() if storage.is_url(root) else os.fsencode(rel_name)


def upright(img: Image.Image) -> tuple[Image.Image, bool]:
    """The image as a viewer shows it: turned by its EXIF orientation (phone photos are often
    stored sideways with a tag saying so), and whether it was turned."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the pixels as stored  # noqa: BLE001
        return img, False
    if orientation in (None, 1):
        return img, False
    turned = ImageOps.exif_transpose(img)
    return (turned, True) if turned is not None else (img, False)


def read_folder(cfg: PrepareConfig) -> SourceData:
    """One sub-folder per class (its name is the class name) of image files, or split folders
    (train/, val/, ...) that each hold such class folders."""
    root = cfg.path.rstrip("/") if storage.is_url(cfg.path) else str(Path(cfg.path))
    if not storage.exists(root):
        raise DataError(f"{root}: image folder not found")
    if not storage.is_url(root) and not Path(root).is_dir():
        raise DataError(f"{root}: a file; the folder source reads a folder with one sub-folder "
                        "of images per class (prepare.path)")
    listing = _list_folder(root)
    entries, others = listing.entries, listing.others
    class_names = sorted(others)
    _check_class_names(root, class_names)
    index = {c: i for i, c in enumerate(class_names)}
    digest = hashlib.sha256(b"folder")
    images, labels, skipped, tally = [], [], [], Counter[tuple[str, str]]()
    origins = []
    for class_name, rel_name, path in entries:
        data = storage.read_bytes(path)
        digest.update(_name_bytes(root, rel_name) + b"\0" + hashlib.sha256(data).digest())
        full = shown(path)
        try:
            img = decode_image(full, data)
            img, turned = upright(img)
            converted, how = convert_image(img, cfg.channels)
        except ValueError as exc:
            if cfg.on_bad_image == "fail":
                raise DataError(f"{full}: {exc} (prepare.on_bad_image is 'fail')") from None
            log.warning("skipping %s: %s", full, exc)
            skipped.append({"path": full, "reason": str(exc)})
            continue
        if turned:
            how += "; turned upright by its EXIF orientation"
        tally[(img.mode, how)] += 1
        images.append(resize_square(converted, cfg.resolution, cfg.resize_filter))
        labels.append(index[class_name])
        origins.append(PurePosixPath(rel_name).parts[0])
    files = Counter(c for c, _, _ in entries)
    describe = {c: (", ".join(f"{root}/{d}" for d in listing.class_dirs[c]),
                    f"all {files[c]} image file(s) were skipped" if files[c] else
                    f"no image files, {others[c]} other file(s)" if others[c] else "empty folder")
                for c in class_names}
    label_arr, class_names, empty = drop_empty_classes(np.array(labels, np.int64), class_names,
                                                       describe, cfg)
    arr = np.stack(images) if images else np.zeros(
        (0, cfg.resolution, cfg.resolution, cfg.channels), np.uint8)
    handling = {"from": "class sub-folders", "class_names": "sub-folder names, sorted"}
    if listing.splits:
        handling["split_folders"] = f"{', '.join(listing.splits)}: " + (
            "kept as the source's own split (prepare.split given)" if cfg.split == "given" else
            "pooled, then split anew by prepare.val_fraction")
    return SourceData(arr, label_arr, class_names, digest.hexdigest(), skipped,
                      conversions=_conversions(tally), empty_classes=empty,
                      ignored=listing.ignored,
                      warnings=_folder_warnings(root, listing, cfg.split) + _empty_warnings(empty),
                      label_handling=handling,
                      origins=np.array(origins, dtype=str) if listing.splits else None)


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def _npz_array(path: str, npz: Any, key: str) -> np.ndarray:
    """One array of the archive; a damaged member or an object (pickled) array is a
    DataError naming the key."""
    try:
        return np.asarray(npz[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: '{key}' is an object array (pickled Python objects, "
                            "not loaded); expected a numeric array ('class_names': strings)"
                            ) from None
        raise DataError(f"{path}: '{key}' cannot be read ({exc})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: '{key}' is damaged in the archive ({exc})") from None


def _text(path: str, name: Any) -> str:
    """A class name from the archive: bytes (np.array([b"cat"]), an 'S' array) are UTF-8."""
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: 'class_names' holds {name!r}, not UTF-8 text") from None
    return str(name)


def _npz_class_names(path: str, npz: Any) -> list[str] | None:
    if "class_names" not in npz.files:
        return None
    arr = _npz_array(path, npz, "class_names")
    names = [_text(path, n) for n in arr.tolist()] if arr.ndim == 1 else []
    if not names:
        raise DataError(f"{path}: 'class_names' must be a non-empty 1-D array, got shape "
                        f"{list(arr.shape)}")
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    if repeated:
        raise DataError(f"{path}: 'class_names' repeats {', '.join(map(repr, repeated))}")
    return names


def read_npz(cfg: PrepareConfig) -> SourceData:
    """uint8 `images` (N,H,W) or (N,H,W,C), C in 1..4; `labels` (N,); optional `class_names`."""
    data = storage.read_bytes(cfg.path)
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{cfg.path}: not a readable .npz file ({exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.save's one array, named .npz
        raise DataError(f"{cfg.path}: a single .npy array, not an .npz archive; expected "
                        "np.savez(path, images=..., labels=...)")
    for key in ("images", "labels"):
        if key not in npz.files:
            raise DataError(f"{cfg.path}: missing array '{key}' (found {', '.join(npz.files)})")
    images, raw_labels = _npz_array(cfg.path, npz, "images"), _npz_array(cfg.path, npz, "labels")
    if images.dtype != np.uint8:
        raise DataError(f"{cfg.path}: 'images' must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 2, 3, 4)):
        raise DataError(f"{cfg.path}: 'images' must be [N,H,W] or [N,H,W,C] with C in 1/2/3/4, "
                        f"got shape {list(images.shape)}")
    if raw_labels.ndim != 1:
        raise DataError(f"{cfg.path}: 'labels' must be a 1-D array, got shape "
                        f"{list(raw_labels.shape)}")
    if len(images) != len(raw_labels):
        raise DataError(f"{cfg.path}: {len(images)} images but {len(raw_labels)} labels")
    names = _npz_class_names(cfg.path, npz)
    values = check_labels(cfg.path, raw_labels, names)
    labels, class_names, renumbered = number_classes(values, names)
    describe = {c: (cfg.path, f"'class_names' names it (index {i}) but no label is {i}")
                for i, c in enumerate(class_names)}
    labels, class_names, empty = drop_empty_classes(labels, class_names, describe, cfg)
    handling = {"from": f"npz 'labels' ({raw_labels.dtype})",
                "checks": "whole numbers >= 0" + (", below len(class_names)" if names else ""),
                "class_names": "npz 'class_names'" if names else
                "the distinct label values, in order", "renumbered": renumbered}
    if np.issubdtype(raw_labels.dtype, np.floating):
        handling["floats"] = "whole-valued floats cast to integers"
    fingerprint = hashlib.sha256(b"npz" + hashlib.sha256(data).digest()).hexdigest()
    images, conversions = _transform_all(images, cfg, "npz uint8 array")
    return SourceData(images, labels, class_names, fingerprint, conversions=conversions,
                      label_handling=handling, empty_classes=empty,
                      warnings=_empty_warnings(empty))


# Prepared data whose brightest pixel is below this is reported as nearly black.
DIM_DATA_MAX = 32

READERS = {"digits": read_digits, "shapes": read_shapes, "idx": read_idx, "folder": read_folder,
           "npz": read_npz}
# Sources that live in the code, not at prepare.path (which they ignore): their dataset URI.
EMBEDDED = {"digits": "sklearn:digits", "shapes": "latentforge:shapes"}


def read_source(cfg: PrepareConfig) -> SourceData:
    """Read the configured source; an empty result is an error naming the source."""
    if cfg.source not in EMBEDDED and not storage.exists(cfg.path):
        raise DataError(f"prepare.path: {cfg.path} does not exist (source '{cfg.source}')")
    data = READERS[cfg.source](cfg)
    if len(data.images) == 0:
        where = EMBEDDED.get(cfg.source, cfg.path)
        extra = f"; {len(data.skipped)} file(s) could not be decoded" if data.skipped else ""
        reasons = Counter(i["reason"] for i in data.ignored)
        if reasons:
            extra += "; ignored: " + ", ".join(f"{n} file(s) {r}" for r, n in
                                               reasons.most_common(3))
        raise DataError(f"{where}: the {cfg.source} source holds no usable images{extra}")
    brightest = int(data.images.max())
    if brightest < DIM_DATA_MAX:
        message = (f"every prepared pixel is at most {brightest} of 255: the images are nearly "
                   "black. 16-bit images are scaled by 65535 (not by their own range), so "
                   "12-bit data stored in 16-bit files come out dark; rescale them to the full "
                   "range first")
        log.warning("%s", message)
        data.warnings.append(message)
    return data
