"""The prepare stage on every source kind, and every bad-input case of the issue."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from latentforge import storage
from latentforge.config import PrepareConfig, build_params
from latentforge.data import load_prepared
from latentforge.errors import ConfigError, DataError
from latentforge.sources import SHAPE_CLASSES, SHAPES_VERSION, read_source, resize_square
from latentforge.tasks import prepare


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x0800 | arr.ndim)
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(folder, n=40, size=12, gz=True, prefix="train", labels_n=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = (np.arange(labels_n if labels_n is not None else n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    wrap = gzip.compress if gz else (lambda b: b)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(wrap(idx_bytes(images)))
    (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(wrap(idx_bytes(labels)))
    return images, labels


def png(color: int, size=(10, 14), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, 255 - color, 0)).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root, per_class=3, bad=True):
    for cls, fmt, ext in (("cat", "PNG", "png"), ("dog", "JPEG", "jpg"), ("emu", "WEBP", "webp"),
                          ("fox", "BMP", "bmp")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{i}.{ext}").write_bytes(png(40 * i, fmt=fmt))
    (root / "notes.txt").write_text("not an image, not in a class folder")
    if bad:
        (root / "cat" / "empty.png").write_bytes(b"")
        (root / "dog" / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
        (root / "emu" / "truncated.png").write_bytes(png(7, size=(64, 64))[:60])


def cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**{"resolution": 8, **kw})


def test_digits_default_source(tmp_path):
    out = tmp_path / "prepared"
    result = prepare.run(cfg(), out_dir=out)
    data = load_prepared(out, verify=True)
    train_x, train_y = data.split("train")
    val_x, val_y = data.split("val")
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (8, 8, 1)
    assert len(train_x) + len(val_x) == 1797
    assert abs(len(val_x) - 180) <= 5 and set(val_y.tolist()) == set(range(10))  # stratified
    assert data.class_names == [str(i) for i in range(10)]
    assert isinstance(train_x, np.memmap)
    manifest = data.manifest
    assert manifest["splits"]["train"]["count"] == len(train_x)
    assert sum(manifest["splits"]["val"]["per_class"].values()) == len(val_x)
    assert len(manifest["source"]["fingerprint"]) == 64
    assert result.digests["prepared"] == data.manifest_sha256
    assert result.metrics["train_images"] == len(train_x)
    assert Image.open(out / "preview.png").size[0] > 100


def test_output_is_deterministic_and_depends_on_seed(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    prepare.run(cfg(max_images=300), out_dir=a)
    prepare.run(cfg(max_images=300), out_dir=b)
    prepare.run(cfg(max_images=300, seed=1), out_dir=c)
    for name in ("manifest.json", "train-00000.images.npy", "preview.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "manifest.json").read_bytes() != (c / "manifest.json").read_bytes()
    assert load_prepared(a).manifest["splits"]["train"]["count"] + \
        load_prepared(a).manifest["splits"]["val"]["count"] == 300


def test_resolution_channels_and_shards(tmp_path):
    out = tmp_path / "p"
    prepare.run(cfg(resolution=20, channels=3, shard_size=500, resize_filter="lanczos"), out_dir=out)
    data = load_prepared(out, verify=True)
    assert len(data.manifest["splits"]["train"]["shards"]) == 4  # 1617 images / 500
    x, y = data.split("train")
    assert x.shape[1:] == (20, 20, 3) and len(x) == len(y)
    assert np.array_equal(x[..., 0], x[..., 2])  # gray digits repeated to RGB


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_raw_and_gz(tmp_path, gz):
    images, labels = write_idx(tmp_path / "mnist", gz=gz)
    write_idx(tmp_path / "mnist", n=20, gz=gz, prefix="t10k")
    out = tmp_path / "p"
    prepare.run(cfg(source="idx", path=str(tmp_path / "mnist"), resolution=12, val_fraction=0.25),
                out_dir=out)
    data = load_prepared(out)
    assert data.manifest["splits"]["train"]["count"] + data.manifest["splits"]["val"]["count"] == 60
    x, _ = data.split("train")
    assert x.shape[1:] == (12, 12, 1)


def test_idx_wrong_magic_names_file_and_numbers(tmp_path):
    write_idx(tmp_path / "m")
    bad = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 5, 5), np.uint8), magic=0x0803 + 0x100)))
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    assert str(bad) in str(err.value) and "0x00000903" in str(err.value)
    assert "0x00000803" in str(err.value)


def test_idx_wrong_dimensions_and_truncation(tmp_path):
    write_idx(tmp_path / "m", gz=False)
    img = tmp_path / "m" / "train-images-idx3-ubyte"
    img.write_bytes(struct.pack(">IIII", 0x803, 40, 0, 12))
    with pytest.raises(DataError, match="wrong dimensions 0x12"):
        prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    img.write_bytes(idx_bytes(np.zeros((40, 12, 12), np.uint8))[:-100])
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    assert str(img) in str(err.value) and "5760" in str(err.value) and "5660" in str(err.value)


def test_idx_count_mismatch_names_both_files_and_counts(tmp_path):
    write_idx(tmp_path / "m", n=40, labels_n=39)
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz has 40 images" in msg
    assert "train-labels-idx1-ubyte.gz has 39 labels" in msg


def test_folder_source_skips_bad_images_and_reports_them(tmp_path):
    make_folder(tmp_path / "imgs")
    out = tmp_path / "p"
    result = prepare.run(cfg(source="folder", path=str(tmp_path / "imgs"), channels=3,
                             val_fraction=0.34), out_dir=out)
    data = load_prepared(out)
    assert data.class_names == ["cat", "dog", "emu", "fox"]
    assert data.manifest["splits"]["train"]["count"] + data.manifest["splits"]["val"]["count"] == 12
    report = json.loads((out / "report.json").read_text())["skipped"]
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["garbage.jpg"] == "not a decodable image"
    assert "truncated" in reasons["truncated.png"] or "decode" in reasons["truncated.png"]
    assert result.metrics["skipped_images"] == 3
    assert "garbage.jpg" in result.summary  # the stage report lists path and reason


def test_folder_source_fail_mode_names_the_file(tmp_path):
    make_folder(tmp_path / "imgs")
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="folder", path=str(tmp_path / "imgs"), on_bad_image="fail"),
                    out_dir=tmp_path / "p")
    assert "empty.png: empty file (0 bytes)" in str(err.value)
    assert not (tmp_path / "p").exists()


def test_npz_source_and_its_errors(tmp_path):
    f = tmp_path / "d.npz"
    rng = np.random.default_rng(1)
    np.savez(f, images=rng.integers(0, 256, (30, 9, 9, 3), dtype=np.uint8),
             labels=np.arange(30) % 3, class_names=np.array(["a", "b", "c"]))
    prepare.run(cfg(source="npz", path=str(f), channels=3), out_dir=tmp_path / "p")
    assert load_prepared(tmp_path / "p").class_names == ["a", "b", "c"]
    np.savez(f, images=np.zeros((5, 9, 9), np.float32), labels=np.arange(5))
    with pytest.raises(DataError, match="'images' must be uint8, got float32"):
        prepare.run(cfg(source="npz", path=str(f)), out_dir=tmp_path / "q")
    np.savez(f, images=np.zeros((5, 9, 9), np.uint8), labels=np.arange(4))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        prepare.run(cfg(source="npz", path=str(f)), out_dir=tmp_path / "q")


def test_empty_sources_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no usable images"):
        prepare.run(cfg(source="folder", path=str(tmp_path / "empty")), out_dir=tmp_path / "p")
    make_folder(tmp_path / "allbad", per_class=0)
    with pytest.raises(DataError, match="3 file\\(s\\) could not be decoded"):
        prepare.run(cfg(source="folder", path=str(tmp_path / "allbad")), out_dir=tmp_path / "p")
    with pytest.raises(DataError, match="does not exist"):
        prepare.run(cfg(source="npz", path=str(tmp_path / "nope.npz")), out_dir=tmp_path / "p")
    with pytest.raises(DataError, match="no IDX image files"):
        prepare.run(cfg(source="idx", path=str(tmp_path / "empty")), out_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_failed_run_keeps_previous_good_output(tmp_path):
    out = tmp_path / "p"
    prepare.run(cfg(max_images=100), out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    make_folder(tmp_path / "imgs")
    with pytest.raises(DataError):
        prepare.run(cfg(source="folder", path=str(tmp_path / "imgs"), on_bad_image="fail"),
                    out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "p"]


def test_folder_source_on_s3(tmp_path, s3_bucket):
    local = tmp_path / "imgs"
    make_folder(local, bad=True)
    for f in storage.list_files(local):
        rel = f[len(str(local)) + 1:]
        storage.write_bytes_atomic(f"s3://{s3_bucket}/imgs/{rel}", storage.read_bytes(f))
    out_s3, out_local = tmp_path / "from_s3", tmp_path / "from_local"
    res = prepare.run(cfg(source="folder", path=f"s3://{s3_bucket}/imgs"), out_dir=out_s3)
    prepare.run(cfg(source="folder", path=str(local)), out_dir=out_local)
    assert res.metrics["skipped_images"] == 3
    assert (out_s3 / "train-00000.images.npy").read_bytes() == \
        (out_local / "train-00000.images.npy").read_bytes()
    # the fingerprint hashes relative paths and bytes, so it is the same wherever they live
    assert load_prepared(out_s3).manifest["source"]["fingerprint"] == \
        load_prepared(out_local).manifest["source"]["fingerprint"]


# ------------------------------------------------------------------------------ shapes source


def shapes(**kw) -> PrepareConfig:
    return cfg(**{"source": "shapes", "shapes_images": 24, "resolution": 32, "channels": 3, **kw})


def test_shapes_are_drawn_from_the_seed_alone():
    a, b, other = read_source(shapes()), read_source(shapes()), read_source(shapes(seed=1))
    assert np.array_equal(a.images, b.images) and a.fingerprint == b.fingerprint
    assert not np.array_equal(a.images, other.images) and a.fingerprint != other.fingerprint
    assert np.array_equal(a.labels, other.labels)  # class i mod 8 whatever the seed
    more = read_source(shapes(shapes_images=40))
    assert np.array_equal(more.images[:24], a.images)  # image i comes from (seed, i) only
    assert more.fingerprint != a.fingerprint  # the count is part of the recipe


def test_shapes_images_labels_and_class_names():
    data = read_source(shapes())
    assert data.images.shape == (24, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert data.class_names == list(SHAPE_CLASSES) == [
        "circle", "ring", "square", "diamond", "triangle", "cross", "star", "crescent"]
    assert np.bincount(data.labels).tolist() == [3] * 8
    assert len(data.fingerprint) == 64
    assert not np.array_equal(data.images[..., 0], data.images[..., 1])  # colour, not gray
    assert [c["mode"] for c in data.conversions] == ["RGB"]
    assert SHAPES_VERSION in data.conversions[0]["how"]
    # every image holds its shape well apart from the background, for the judge to find
    spread = data.images.astype(int).max(axis=(1, 2)) - data.images.astype(int).min(axis=(1, 2))
    assert spread.max(axis=1).min() > 60


def test_shapes_in_gray_and_other_resolutions_go_through_the_usual_conversion():
    rgb = read_source(shapes()).images
    gray = read_source(shapes(channels=1))
    expected = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])[..., None]
    assert np.array_equal(gray.images, expected)  # ITU-R 601-2 luma, as for any RGB image
    assert "to gray by ITU-R 601-2 luma" in gray.conversions[0]["how"]
    # the shape's colour keeps a luma gap to the background, so gray images still show it
    pixels = gray.images.astype(int).reshape(len(gray.images), -1)
    assert (pixels.max(axis=1) - pixels.min(axis=1)).min() > 50
    small = read_source(shapes(resolution=16))
    assert small.images.shape == (24, 16, 16, 3)
    assert np.array_equal(small.images[0], resize_square(Image.fromarray(rgb[0]), 16, "bicubic"))
    assert small.fingerprint == read_source(shapes()).fingerprint  # the drawing, not the resize


def test_shapes_count_is_validated_against_the_classes():
    field = {f.name: f for f in dataclasses.fields(PrepareConfig)}["shapes_images"]
    assert field.metadata["ge"] == len(SHAPE_CLASSES)  # every class gets an image
    with pytest.raises(ConfigError, match=r"prepare\.shapes_images = 7 is out of range"):
        build_params({"prepare": {"source": "shapes", "shapes_images": 7}})


def test_prepare_stage_on_shapes_ignores_the_path(tmp_path):
    out = tmp_path / "p"
    result = prepare.run(shapes(shapes_images=80, resolution=16, path=str(tmp_path / "nothing")),
                         out_dir=out)
    data = load_prepared(out, verify=True)
    x, _ = data.split("train")
    assert x.shape[1:] == (16, 16, 3) and result.metrics["classes"] == 8
    assert data.manifest["source"] == {"kind": "shapes", "path": None,
                                       "fingerprint": data.manifest["source"]["fingerprint"]}
    assert data.manifest["splits"]["val"]["per_class"] == {c: 1 for c in SHAPE_CLASSES}
    report = json.loads((out / "report.json").read_text())
    assert report["labels"]["class_names"] == "the shape names"


def test_stage_refuses_a_split_the_later_stages_cannot_measure_on(tmp_path):
    """The pipeline's prepare stage fails at once, writing nothing, where a split gets fewer
    than MIN_SPLIT_IMAGES (evaluate's own minimum): not minutes later in the tokenizer's FD
    or in evaluate. prepare.run alone (a library call) still writes what it was asked for."""
    from latentforge.data import MIN_SPLIT_IMAGES
    from latentforge.tasks.evaluate import MIN_VAL_IMAGES
    from latentforge.tracking import Tracker

    assert MIN_SPLIT_IMAGES == MIN_VAL_IMAGES
    out = tmp_path / "p"
    params = build_params({"prepare": {"max_images": 10, "val_fraction": 0.1}})
    with pytest.raises(DataError) as err:
        prepare.run(params.prepare, out_dir=out, min_split_images=MIN_SPLIT_IMAGES)
    assert str(err.value) == ("digits: the val split would hold 2 image(s) (8 train / 2 val "
                              "of 10 with prepare.val_fraction 0.1); the later stages need at "
                              "least 4 in each: raise prepare.val_fraction or raise "
                              "prepare.max_images")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    params = build_params({"prepare": {"max_images": 20, "val_fraction": 0.9}})
    with pytest.raises(DataError, match=r"the train split would hold 1 image\(s\).*lower "
                                        r"prepare.val_fraction or raise prepare.max_images$"):
        prepare.run(params.prepare, out_dir=out, min_split_images=MIN_SPLIT_IMAGES)
    assert not out.exists()
    params = build_params({"prepare": {"max_images": 6, "val_fraction": 0.5}})
    with pytest.raises(DataError, match=r"\(4 train / 2 val of 6 .*: raise prepare.max_images$"):
        prepare.run(params.prepare, out_dir=out, min_split_images=MIN_SPLIT_IMAGES)
    params = build_params({"prepare": {"max_images": 20, "val_fraction": 0.1}})
    prepare.run(params.prepare, out_dir=out, min_split_images=MIN_SPLIT_IMAGES)
    assert load_prepared(out).manifest["splits"]["val"]["count"] == 6
    # The stage's entry point asks for the minimum.
    with pytest.raises(DataError, match="the val split would hold"):
        prepare.run_stage(build_params({"prepare": {"max_images": 10}}), Tracker())


def test_grid_row_labels_keep_whole_class_names():
    """Row labels used to be the names' first two characters: cat, car and cow read 'ca', 'ca'
    and 'co'. They are whole now (accents drawn), and a long one is cut to a bounded width."""
    from latentforge.images import MAX_LABEL_WIDTH, make_grid

    rows = [np.zeros((2, 4, 4, 1), np.uint8)] * 3
    grid = make_grid(rows, cell=16, pad=2, labels=["cat", "car", "cow"])
    label_w = grid.shape[1] - (2 + 2 * 18)
    labels = [grid[2 + r * 18: 2 + r * 18 + 16, :label_w] for r in range(3)]
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    assert all(label.max() > 200 for label in labels)  # drawn, light on the dark background
    long = make_grid(rows, cell=16, pad=2, labels=["x" * 200, "café", "✗"])
    assert long.shape[1] - (2 + 2 * 18) <= MAX_LABEL_WIDTH + 8
