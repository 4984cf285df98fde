"""Image sources for the prepare stage: embedded digits, MNIST IDX, image folders, npz.

Each reader returns every image already brought to the requested square resolution and
channel count, the labels, the class names, a fingerprint of the raw source (sha256 over
its bytes) and the list of images it had to skip. Sources may be local or any fsspec URL.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import struct
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from latentforge import storage
from latentforge.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

    from latentforge.config import PrepareConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


@dataclass
class SourceData:
    images: np.ndarray  # (N, R, R, C) uint8
    labels: np.ndarray  # (N,) int64, indices into class_names
    class_names: list[str]
    fingerprint: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def _filter(name: str) -> int:
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX}[name]


def to_square(img: Image.Image, resolution: int, channels: int, resize_filter: str) -> np.ndarray:
    """Resize the shorter side to `resolution`, centre-crop, convert: (R, R, C) uint8."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _filter(resize_filter))
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _array_to_image(arr: np.ndarray) -> Image.Image:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr))


def _transform_all(arrays: Any, cfg: PrepareConfig) -> np.ndarray:
    out = [to_square(_array_to_image(a), cfg.resolution, cfg.channels, cfg.resize_filter)
           for a in arrays]
    if not out:
        return np.zeros((0, cfg.resolution, cfg.resolution, cfg.channels), np.uint8)
    return np.stack(out)


def _index_labels(raw: np.ndarray, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    values = np.unique(raw)
    lookup = {v: i for i, v in enumerate(values.tolist())}
    labels = np.array([lookup[v] for v in raw.tolist()], dtype=np.int64)
    if names is None:
        names = [str(v) for v in values.tolist()]
    else:
        names = [names[int(v)] for v in values.tolist()]
    return labels, names


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
    return SourceData(_transform_all(raw, cfg), labels, [str(i) for i in range(10)], fingerprint)


# --------------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------------


def _idx_bytes(path: str) -> bytes:
    data = storage.read_bytes(path)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    return data


def parse_idx(path: str, data: bytes, expected_magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking magic number, dimensions and length."""
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x}, expected "
                        f"0x{expected_magic:08x}")
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: {len(data)} bytes, expected {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: wrong dimensions {dims[1]}x{dims[2]} in the IDX header")
    expected = int(np.prod(dims))
    actual = len(data) - header
    if actual != expected:
        shape = "x".join(str(d) for d in dims)
        raise DataError(f"{path}: header declares {shape} = {expected} bytes of data but the "
                        f"file holds {actual}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_pairs(path: str) -> list[tuple[str, str]]:
    files = storage.list_files(path) if not _looks_like_idx_images(path) else [path]
    images = [f for f in files if _looks_like_idx_images(f)]
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
    pairs = _idx_pairs(cfg.path)
    if not pairs:
        raise DataError(f"{cfg.path}: no IDX image files (*-images-idx3-ubyte[.gz]) found")
    digest = hashlib.sha256(b"idx")
    all_images, all_labels = [], []
    for img_path, lbl_path in pairs:
        img_bytes, lbl_bytes = _idx_bytes(img_path), _idx_bytes(lbl_path)
        digest.update(hashlib.sha256(img_bytes).digest() + hashlib.sha256(lbl_bytes).digest())
        images = parse_idx(img_path, img_bytes, IDX_IMAGES_MAGIC)
        labels = parse_idx(lbl_path, lbl_bytes, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"image count disagrees with label count: {img_path} has "
                            f"{len(images)} images but {lbl_path} has {len(labels)} labels")
        all_images.append(images)
        all_labels.append(labels)
    raw_labels = np.concatenate(all_labels)
    labels, names = _index_labels(raw_labels)
    images = _transform_all(np.concatenate(all_images), cfg)
    return SourceData(images, labels, names, digest.hexdigest())


# --------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------


def decode_image(path: str, data: bytes) -> Image.Image:
    """Decode fully (so truncation is detected now), or raise ValueError with the reason."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ValueError("not a decodable image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode: {exc}") from None
    return img


def read_folder(cfg: PrepareConfig) -> SourceData:
    """One sub-folder per class (its name is the class name) of PNG/JPEG/WebP/BMP files."""
    root = cfg.path.rstrip("/")
    if not storage.exists(root):
        raise DataError(f"{root}: image folder not found")
    entries = []
    for f in storage.list_files(root):
        rel = PurePosixPath(f[len(root):].lstrip("/").replace("\\", "/"))
        if rel.suffix.lower() in IMAGE_SUFFIXES and len(rel.parts) >= 2:
            entries.append((rel.parts[0], str(rel), f))
    class_names = sorted({c for c, _, _ in entries})
    index = {c: i for i, c in enumerate(class_names)}
    digest = hashlib.sha256(b"folder")
    images, labels, skipped = [], [], []
    for class_name, rel_name, full in entries:
        data = storage.read_bytes(full)
        digest.update(rel_name.encode() + b"\0" + hashlib.sha256(data).digest())
        try:
            img = decode_image(full, data)
        except ValueError as exc:
            if cfg.on_bad_image == "fail":
                raise DataError(f"{full}: {exc} (prepare.on_bad_image is 'fail')") from None
            log.warning("skipping %s: %s", full, exc)
            skipped.append({"path": full, "reason": str(exc)})
            continue
        images.append(to_square(img, cfg.resolution, cfg.channels, cfg.resize_filter))
        labels.append(index[class_name])
    arr = np.stack(images) if images else np.zeros(
        (0, cfg.resolution, cfg.resolution, cfg.channels), np.uint8)
    return SourceData(arr, np.array(labels, np.int64), class_names, digest.hexdigest(), skipped)


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def read_npz(cfg: PrepareConfig) -> SourceData:
    """uint8 `images` (N,H,W) or (N,H,W,C) and integer `labels` (N,); optional `class_names`."""
    data = storage.read_bytes(cfg.path)
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{cfg.path}: not a readable .npz file ({exc})") from None
    for key in ("images", "labels"):
        if key not in npz.files:
            raise DataError(f"{cfg.path}: missing array '{key}' (found {', '.join(npz.files)})")
    images, raw_labels = npz["images"], npz["labels"]
    if images.dtype != np.uint8:
        raise DataError(f"{cfg.path}: 'images' must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise DataError(f"{cfg.path}: 'images' must be [N,H,W] or [N,H,W,C] with C in 1/3/4, "
                        f"got shape {list(images.shape)}")
    if raw_labels.ndim != 1 or not np.issubdtype(raw_labels.dtype, np.integer):
        raise DataError(f"{cfg.path}: 'labels' must be a 1-D integer array, got "
                        f"{raw_labels.dtype} of shape {list(raw_labels.shape)}")
    if len(images) != len(raw_labels):
        raise DataError(f"{cfg.path}: {len(images)} images but {len(raw_labels)} labels")
    names = [str(n) for n in npz["class_names"].tolist()] if "class_names" in npz.files else None
    if names is not None and len(raw_labels) and int(raw_labels.max()) >= len(names):
        raise DataError(f"{cfg.path}: label {int(raw_labels.max())} has no entry in "
                        f"'class_names' ({len(names)} names)")
    labels, class_names = _index_labels(raw_labels, names)
    if images.ndim == 4 and images.shape[3] == 4:
        images = images[..., :3]
    fingerprint = hashlib.sha256(b"npz" + hashlib.sha256(data).digest()).hexdigest()
    return SourceData(_transform_all(images, cfg), labels, class_names, fingerprint)


READERS = {"digits": read_digits, "idx": read_idx, "folder": read_folder, "npz": read_npz}


def read_source(cfg: PrepareConfig) -> SourceData:
    """Read the configured source; an empty result is an error naming the source."""
    if cfg.source != "digits" and not storage.exists(cfg.path):
        raise DataError(f"prepare.path: {cfg.path} does not exist (source '{cfg.source}')")
    data = READERS[cfg.source](cfg)
    if len(data.images) == 0:
        where = "scikit-learn digits" if cfg.source == "digits" else cfg.path
        extra = f"; {len(data.skipped)} file(s) could not be decoded" if data.skipped else ""
        raise DataError(f"{where}: the {cfg.source} source holds no usable images{extra}")
    return data
