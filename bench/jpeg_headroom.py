"""How far a JPEG-compressibility reward can shrink files without leaving the data: the JPEG
sizes of the real images, per class.

The rl stage's `jpeg_compressibility` reward is minus the file size of each sample saved as
JPEG at quality 95 (DDPO's). A generator that keeps its samples like the data (low gFD drift)
can only move each class towards its own smaller real images. This prints, for the images a
params file's `prepare` section reads (the embedded digits by default; a preset such as
presets/shapes.yaml reads like `latentforge run --params`: keys it omits take the defaults):

- the mean file size, and the mean over classes of each class's smallest 20% and of its
  single smallest image, relative to the class means: a generator that drew every sample
  from the smallest 20% of its class would reach the first; one that drew only the smallest
  image of each class (no diversity left), the second;
- the same for the entropy-coded scan alone (the bytes after the JPEG headers, which depend
  on the image) and at 4x and 8x the resolution (bicubic), where the headers weigh less, as
  in DDPO's 512x512 images;
- a blank image's size: the floor under every image of that shape.

    python bench/jpeg_headroom.py [--params params.yaml | presets/shapes.yaml]
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from latentforge.config import load_params
from latentforge.rewards import JPEG_QUALITY
from latentforge.sources import read_source

SOS = b"\xff\xda"  # JPEG start-of-scan marker: the entropy-coded data follows its header


def jpeg_sizes(image: np.ndarray, upscale: int = 1) -> tuple[int, int]:
    """(file bytes, scan bytes) of a uint8 (H, W, C) image saved as the reward saves it,
    after a bicubic `upscale`."""
    pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    data = buffer.getvalue()
    sos = data.rfind(SOS)
    header = int.from_bytes(data[sos + 2: sos + 4], "big")
    return len(data), len(data) - (sos + 2 + header) - 2  # minus the end-of-image marker


def headroom(sizes: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(mean size, smallest-20%-per-class change, smallest-per-class change), the changes
    relative to the mean of the class means."""
    classes = np.unique(labels)
    means = np.array([sizes[labels == c].mean() for c in classes])
    low20 = np.array([np.sort(sizes[labels == c])[: max(1, int(0.2 * (labels == c).sum()))].mean()
                      for c in classes])
    smallest = np.array([sizes[labels == c].min() for c in classes])
    return float(sizes.mean()), low20.mean() / means.mean() - 1, smallest.mean() / means.mean() - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--upscales", default="1,4,8")
    args = parser.parse_args()
    params = load_params(args.params)
    source = read_source(params.prepare)
    images, labels = source.images, np.asarray(source.labels)
    shape = images.shape[1:]
    print(f"# {params.prepare.source}: {len(images)} images {shape[0]}x{shape[1]}x{shape[2]}, "
          f"{len(np.unique(labels))} classes; JPEG quality {JPEG_QUALITY}")
    print("| resolution | bytes | mean | each class's smallest 20% | each class's smallest image "
          "| blank image |")
    print("|---|---|---|---|---|---|")
    for upscale in (int(u) for u in args.upscales.split(",")):
        sizes = np.array([jpeg_sizes(img, upscale) for img in images], np.float64)
        blank = jpeg_sizes(np.zeros(shape, np.uint8), upscale)
        side = f"{shape[0] * upscale}px" + (" (the reward's)" if upscale == 1 else "")
        for col, what in enumerate(("file", "scan")):
            mean, low20, smallest = headroom(sizes[:, col], labels)
            print(f"| {side} | {what} | {mean:.0f} | {100 * low20:+.1f}% | {100 * smallest:+.1f}% "
                  f"| {blank[col]} ({100 * (blank[col] / mean - 1):+.0f}%) |")


if __name__ == "__main__":
    main()
