"""Issue 15: every Pillow mode converted faithfully or rejected by name, labels validated,
empty classes reported. Images are real files written by Pillow; the few modes no file
format stores (RGBa, La, HSV, I;16L, I;16N) go through `convert_image` directly."""

from __future__ import annotations

import gzip
import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.config import PrepareConfig
from latentforge.data import load_prepared
from latentforge.errors import DataError
from latentforge.sources import convert_image
from latentforge.tasks import prepare

SIZE = (6, 5)
WHITE = (255, 255, 255)


def cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**{"resolution": 4, "val_fraction": 0.0, **kw})


def luma(rgb: tuple[int, int, int]) -> int:
    """Pillow's own RGB -> L, the reference for every colour image brought to one channel."""
    return int(Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0)))


def filled(mode: str, value, **info) -> Image.Image:
    img = Image.new(mode, SIZE, value)
    img.info.update(info)
    return img


def palette(mode: str, colour: tuple[int, ...], index_alpha: int | None = None) -> Image.Image:
    img = Image.new(mode, SIZE, 0 if mode == "P" else (0, 255 if index_alpha is None else
                                                       index_alpha))
    img.putpalette(list(colour))
    return img


def i16(value: int, mode: str = "I;16") -> Image.Image:
    return Image.new(mode, SIZE, value)  # (Pillow 13's paste(int) on I;16 wraps 32768 to 0)


def f32(value: float) -> Image.Image:
    return Image.fromarray(np.full(SIZE[::-1], value, np.float32))


def i32(value: int) -> Image.Image:
    return Image.fromarray(np.full(SIZE[::-1], value, np.int32))


# name -> (file suffix, image, save options, mode Pillow opens it as, expected RGB, tolerance)
CASES: dict[str, tuple[str, Callable[[], Image.Image], dict, str, tuple[int, int, int], int]] = {
    "one": (".png", lambda: filled("1", 1), {}, "1", WHITE, 0),
    "gray": (".png", lambda: filled("L", 77), {}, "L", (77, 77, 77), 0),
    "pal": (".png", lambda: palette("P", (255, 0, 0)), {}, "P", (255, 0, 0), 0),
    "pal_trns": (".png", lambda: palette("P", (255, 0, 0)), {"transparency": 0}, "P", WHITE, 0),
    "pal_trns_gif": (".gif", lambda: palette("P", (255, 0, 0)), {"transparency": 0}, "P", WHITE,
                     0),
    "pal_alpha128": (".png", lambda: palette("P", (0, 0, 0)), {"transparency": bytes([128])},
                     "P", (127, 127, 127), 0),
    "pa": (".tif", lambda: palette("PA", (0, 255, 0)), {}, "PA", (0, 255, 0), 0),
    "pa_alpha0": (".tif", lambda: palette("PA", (0, 255, 0), index_alpha=0), {}, "PA", WHITE, 0),
    "gray_alpha0": (".png", lambda: filled("LA", (100, 0)), {}, "LA", WHITE, 0),
    "gray_alpha255": (".png", lambda: filled("LA", (100, 255)), {}, "LA", (100, 100, 100), 0),
    "gray_trns": (".png", lambda: filled("L", 200), {"transparency": 200}, "L", WHITE, 0),
    "rgb": (".png", lambda: filled("RGB", (10, 200, 30)), {}, "RGB", (10, 200, 30), 0),
    "rgb_trns": (".png", lambda: filled("RGB", (1, 2, 3)), {"transparency": (1, 2, 3)}, "RGB",
                 WHITE, 0),
    "rgba0": (".png", lambda: filled("RGBA", (255, 0, 0, 0)), {}, "RGBA", WHITE, 0),
    "rgba128": (".png", lambda: filled("RGBA", (0, 0, 255, 128)), {}, "RGBA", (127, 127, 255),
                0),
    "rgba0_webp": (".webp", lambda: filled("RGBA", (0, 0, 0, 0)), {"lossless": True}, "RGBA",
                   WHITE, 0),
    "cmyk": (".tif", lambda: filled("CMYK", (255, 0, 0, 0)), {}, "CMYK", (0, 255, 255), 0),
    "cmyk_half_k": (".tif", lambda: filled("CMYK", (0, 0, 0, 128)), {}, "CMYK", (127, 127, 127),
                    0),
    "cmyk_jpeg": (".jpg", lambda: filled("CMYK", (0, 0, 0, 0)), {"quality": 100}, "CMYK", WHITE,
                  2),
    "ycbcr": (".tif", lambda: filled("YCbCr", (128, 128, 128)), {}, "YCbCr", (128, 128, 128), 0),
    # CIELAB L* = 100 * 128 / 255 = 50.2 is sRGB 119 (a reference independent of Pillow)
    "lab": (".tif", lambda: filled("LAB", (128, 128, 128)), {}, "LAB", (119, 119, 119), 0),
    # 16-bit: Pillow's convert("L") would give 255 for all three
    "i16_max": (".png", lambda: i16(65535), {}, "I;16", WHITE, 0),
    "i16_half": (".png", lambda: i16(32768), {}, "I;16", (128, 128, 128), 0),
    "i16_low": (".png", lambda: i16(255), {}, "I;16", (1, 1, 1), 0),
    "i16_trns": (".png", lambda: i16(40000), {"transparency": 40000}, "I;16", WHITE, 0),
    "i16b": (".tif", lambda: i16(32768, "I;16B"), {}, "I;16B", (128, 128, 128), 0),
    "i32": (".tif", lambda: i32(32768), {}, "I", (128, 128, 128), 0),
    # Pillow's convert("L") truncates 0.5 to 0
    "float_half": (".tif", lambda: f32(0.5), {}, "F", (128, 128, 128), 0),
    "float_one": (".tif", lambda: f32(1.0), {}, "F", WHITE, 0),
}


def write_case(folder: Path, name: str) -> Path:
    suffix, make, options, mode, _, _ = CASES[name]
    path = folder / name / f"img{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    make().save(path, **options)
    assert Image.open(path).mode == mode, f"{name}: Pillow opens it as {Image.open(path).mode}"
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every case as one class folder, prepared with 1 and with 3 channels."""
    root = tmp_path_factory.mktemp("modes")
    for name in CASES:
        write_case(root / "imgs", name)
    out = {}
    for channels in (1, 3):
        prepared = root / f"p{channels}"
        prepare.run(cfg(source="folder", path=str(root / "imgs"), channels=channels),
                    out_dir=prepared)
        data = load_prepared(prepared)
        x, y = data.split("train")
        images = {data.class_names[label]: x[i] for i, label in enumerate(y.tolist())}
        out[channels] = images, json.loads((prepared / "report.json").read_text())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_round_trips_a_known_value(converted, name):
    expected_rgb, tol = CASES[name][4], CASES[name][5]
    gray, rgb = converted[1][0][name], converted[3][0][name]
    assert gray.shape == (4, 4, 1) and rgb.shape == (4, 4, 3)
    assert np.abs(gray.astype(int) - luma(expected_rgb)).max() <= tol, gray[..., 0]
    assert np.abs(rgb.astype(int) - np.array(expected_rgb)).max() <= tol, rgb[0, 0]


def test_report_lists_each_mode_and_how(converted):
    report = converted[1][1]
    assert report["alpha_background"] == "white (255)"
    hows: dict[str, list[str]] = {}
    for c in report["conversions"]:
        hows.setdefault(c["mode"], []).append(c["how"])
    assert sum(c["images"] for c in report["conversions"]) == len(CASES)
    assert set(hows) == {mode for _, _, _, mode, _, _ in CASES.values()}
    assert any("value / 65535" in h for h in hows["I;16"])
    assert any("transparency" in h and "alpha composited on white (255)" in h
               for h in hows["I;16"])
    assert all("alpha composited on white (255)" in h for h in hows["RGBA"])
    assert any("transparency colour or palette entries made alpha" in h for h in hows["P"])
    assert all("value * 255" in h for h in hows["F"])
    assert all("luma" in h for h in hows["CMYK"])
    assert "gray repeated to RGB" in converted[3][1]["conversions"][0]["how"]  # mode "1"


@pytest.mark.parametrize("mode, value, expected", [
    ("RGBa", (100, 50, 0, 128), (227, 177, 127)),  # premultiplied: c + 255 * (1 - a)
    ("La", (100, 128), (227, 227, 227)),
    ("HSV", (85, 255, 255), (0, 255, 0)),
    ("I;16L", 32768, (128, 128, 128)),
    ("I;16N", 65535, WHITE),
    ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
])
def test_modes_no_file_format_holds(mode, value, expected):
    img = Image.new(mode, SIZE, value)
    assert np.asarray(img).reshape(-1)[0] == np.asarray(value).reshape(-1)[0]
    rgb, how = convert_image(img, 3)
    assert rgb.mode == "RGB" and np.abs(np.asarray(rgb).astype(int) - expected).max() <= 1, how
    gray, _ = convert_image(img, 1)
    assert gray.mode == "L" and abs(int(np.asarray(gray)[0, 0]) - luma(expected)) <= 1


@pytest.mark.parametrize("make, message", [
    (lambda: f32(255.0), "image mode F holds values 255..255, expected 0..1"),
    (lambda: f32(float("nan")), "image mode F holds 30 NaN or infinite value(s)"),
    (lambda: i32(70000), "image mode I holds values 70000..70000, expected 0..65535"),
    (lambda: i32(-1), "image mode I holds values -1..-1, expected 0..65535"),
])
def test_unfaithful_values_are_rejected_by_mode(tmp_path, make, message):
    root = tmp_path / "imgs"
    (root / "ok").mkdir(parents=True)
    filled("L", 9).save(root / "ok" / "a.png")
    (root / "bad").mkdir()
    make().save(root / "bad" / "x.tif")
    out = tmp_path / "p"
    prepare.run(cfg(source="folder", path=str(root)), out_dir=out)
    report = json.loads((out / "report.json").read_text())
    assert [s["path"] for s in report["skipped"]] == [str(root / "bad" / "x.tif")]
    assert message in report["skipped"][0]["reason"]
    assert report["empty_classes"][0]["class"] == "bad"  # its only image was rejected
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="folder", path=str(root), on_bad_image="fail"), out_dir=out)
    assert f"{root / 'bad' / 'x.tif'}: {message}" in str(err.value)


def test_npz_alpha_is_composited_not_dropped(tmp_path):
    f = tmp_path / "d.npz"
    images = np.zeros((4, 5, 5, 4), np.uint8)
    images[..., 0] = 255  # red, fully transparent except the last image
    images[3, ..., 3] = 255
    np.savez(f, images=images, labels=np.array([0, 0, 1, 1]))
    out = tmp_path / "p"
    prepare.run(cfg(source="npz", path=str(f), channels=3), out_dir=out)
    x, y = load_prepared(out).split("train")
    assert [tuple(img[0, 0]) for img in x] == [WHITE, WHITE, WHITE, (255, 0, 0)]


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, names, message", [
    ([0, -1, 2], None, "label -1 at index 1 is negative; expected whole numbers >= 0"),
    ([0, 1.5, 2], None, "label 1.5 at index 1 is not a whole number"),
    ([0, 1, np.nan], None, "label nan at index 2 is not a whole number"),
    ([0, np.inf, 1], None, "label inf at index 1 is not a whole number"),
    ([0, 1, 3], ["a", "b", "c"], "label 3 at index 2 is out of range; expected class indices "
     "0..2 (3 class names)"),
    ([True, False, True], None, "labels must be integers, got bool"),
])
def test_npz_bad_labels_name_file_and_value(tmp_path, labels, names, message):
    f = tmp_path / "d.npz"
    extra = {"class_names": np.array(names)} if names else {}
    np.savez(f, images=np.zeros((3, 5, 5), np.uint8), labels=np.array(labels), **extra)
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="npz", path=str(f)), out_dir=tmp_path / "p")
    assert str(err.value).startswith(f"{f}: ") and message in str(err.value)


def test_npz_whole_float_labels_are_cast_and_reported(tmp_path):
    f = tmp_path / "d.npz"
    np.savez(f, images=np.zeros((6, 5, 5), np.uint8), labels=np.array([0.0, 1.0, 2.0] * 2),
             class_names=np.array(["a", "b", "c"]))
    out = tmp_path / "p"
    prepare.run(cfg(source="npz", path=str(f)), out_dir=out)
    assert sorted(load_prepared(out).split("train")[1].tolist()) == [0, 0, 1, 1, 2, 2]
    labels = json.loads((out / "report.json").read_text())["labels"]
    assert labels["floats"] == "whole-valued floats cast to integers"
    assert labels["class_names"] == "npz 'class_names'"


def test_npz_label_values_without_names_are_renumbered_and_reported(tmp_path):
    f = tmp_path / "d.npz"
    np.savez(f, images=np.zeros((4, 5, 5), np.uint8), labels=np.array([3, 7, 3, 7]))
    out = tmp_path / "p"
    prepare.run(cfg(source="npz", path=str(f)), out_dir=out)
    assert load_prepared(out).class_names == ["3", "7"]
    assert json.loads((out / "report.json").read_text())["labels"]["renumbered"] == {"3": 0, "7": 1}


def test_npz_class_name_without_images_warns_or_fails(tmp_path):
    f = tmp_path / "d.npz"
    np.savez(f, images=np.zeros((4, 5, 5), np.uint8), labels=np.array([0, 2, 0, 2]),
             class_names=np.array(["a", "b", "c"]))
    out = tmp_path / "p"
    result = prepare.run(cfg(source="npz", path=str(f)), out_dir=out)
    assert load_prepared(out).class_names == ["a", "c"]
    report = json.loads((out / "report.json").read_text())
    assert report["empty_classes"] == [{"class": "b", "path": str(f), "reason":
                                        "'class_names' names it (index 1) but no label is 1"}]
    assert "class 'b' has no images" in report["warnings"][0] and "class 'b'" in result.summary
    with pytest.raises(DataError, match="class 'b' has no images"):
        prepare.run(cfg(source="npz", path=str(f), on_bad_image="fail"), out_dir=out)
    np.savez(f, images=np.zeros((2, 5, 5), np.uint8), labels=np.array([0, 1]),
             class_names=np.array(["a", "a"]))
    with pytest.raises(DataError, match="'class_names' repeats 'a'"):
        prepare.run(cfg(source="npz", path=str(f)), out_dir=out)


def idx_file(values: np.ndarray, type_code: int) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0D: ">f4"}[type_code]
    return (struct.pack(">I", (type_code << 8) | values.ndim)
            + struct.pack(f">{values.ndim}I", *values.shape) + values.astype(dtype).tobytes())


@pytest.mark.parametrize("type_code, labels, message", [
    (0x09, [0, 1, -3, 1], "label -3 at index 2 is negative"),
    (0x0D, [0, 1.5, 1, 1], "label 1.5 at index 1 is not a whole number"),
    (0x0D, [0, 1, 1, np.nan], "label nan at index 3 is not a whole number"),
])
def test_idx_bad_labels_name_file_and_value(tmp_path, type_code, labels, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_file(np.zeros((4, 5, 5)), 0x08)))
    lbl = tmp_path / "m" / "train-labels-idx1-ubyte.gz"
    lbl.write_bytes(gzip.compress(idx_file(np.array(labels), type_code)))
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    assert str(err.value).startswith(f"{lbl}: ") and message in str(err.value)
    lbl.write_bytes(gzip.compress(idx_file(np.array([0.0, 1.0, 1.0, 0.0]), 0x0D)))
    prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    assert json.loads((tmp_path / "p" / "report.json").read_text())["labels"]["from"] == \
        "IDX label files (float32)"


# --------------------------------------------------------------------------------------------
# Empty classes, ignored files, split warnings
# --------------------------------------------------------------------------------------------


def class_folder(root: Path, name: str, n: int = 2) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        filled("L", 40 * i).save(root / name / f"{i}.png")


def test_empty_class_folders_warn_under_skip(tmp_path, caplog):
    root = tmp_path / "imgs"
    class_folder(root, "cat")
    class_folder(root, "dog")
    (root / "emu").mkdir()  # nothing at all
    (root / "fox").mkdir()
    (root / "fox" / "notes.txt").write_text("no images")
    (root / "gnu").mkdir()
    (root / "gnu" / "x.png").write_bytes(b"not a png")
    (root / ".cache").mkdir()
    filled("L", 1).save(root / ".cache" / "thumb.png")
    (root / "cat" / "._0.png").write_bytes(b"AppleDouble junk")
    filled("L", 1).save(root / "loose.png")
    out = tmp_path / "p"
    with caplog.at_level(logging.WARNING):
        result = prepare.run(cfg(source="folder", path=str(root)), out_dir=out)
    assert load_prepared(out).class_names == ["cat", "dog"]
    report = json.loads((out / "report.json").read_text())
    assert report["empty_classes"] == [
        {"class": "emu", "path": f"{root}/emu", "reason": "empty folder"},
        {"class": "fox", "path": f"{root}/fox", "reason": "no image files, 1 other file(s)"},
        {"class": "gnu", "path": f"{root}/gnu", "reason": "all 1 image file(s) were skipped"}]
    for name in ("emu", "fox", "gnu"):
        assert any(f"class '{name}' has no images" in w for w in report["warnings"])
        assert f"class '{name}' has no images" in result.summary
        assert f"class '{name}' has no images" in caplog.text
    assert result.metrics["warnings"] == 3
    ignored = {Path(i["path"]).relative_to(root).as_posix(): i["reason"] for i in report["ignored"]}
    assert ignored == {".cache/thumb.png": "hidden (a name starts with '.')",
                       "cat/._0.png": "hidden (a name starts with '.')",
                       "fox/notes.txt": ignored["fox/notes.txt"],
                       "loose.png": "not inside a class sub-folder"}
    assert "suffix '.txt'" in ignored["fox/notes.txt"] and report["ignored_count"] == 4
    assert [s["path"] for s in report["skipped"]] == [str(root / "gnu" / "x.png")]


@pytest.mark.parametrize("make_empty, reason", [
    (lambda d: d.mkdir(), "empty folder"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("x")), "no image files, 1 other file(s)"),
])
def test_empty_class_folder_fails_under_fail(tmp_path, make_empty, reason):
    root = tmp_path / "imgs"
    class_folder(root, "cat")
    make_empty(root / "dog")
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="folder", path=str(root), on_bad_image="fail"),
                    out_dir=tmp_path / "p")
    assert str(err.value) == (f"{root}/dog: class 'dog' has no images: {reason} "
                              "(prepare.on_bad_image is 'fail')")
    assert not (tmp_path / "p").exists()


def test_class_missing_from_a_split_is_a_warning(tmp_path):
    root = tmp_path / "imgs"
    class_folder(root, "many", n=10)
    class_folder(root, "single", n=1)
    out = tmp_path / "p"
    result = prepare.run(cfg(source="folder", path=str(root), val_fraction=0.2), out_dir=out)
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert warnings == ["class 'single' has no val images (1 in train)"]
    assert "class 'single' has no val images" in result.summary
    # val_fraction 0 asks for no val images: nothing to warn about
    prepare.run(cfg(source="folder", path=str(root)), out_dir=out)
    assert json.loads((out / "report.json").read_text())["warnings"] == []


# --------------------------------------------------------------------------------------------
# Damaged files: one line naming the file, never a crash of the stage
# --------------------------------------------------------------------------------------------


def _frames(fmt: str) -> bytes:
    """Three 16x16 frames of noise (so the file is long enough to cut inside frame 2 or 3)."""
    import io

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("fmt, keep", [("GIF", 0.7), ("TIFF", 0.5), ("TIFF", 0.7)])
def test_damaged_multi_frame_file_is_a_bad_image(tmp_path, fmt, keep):
    """Frame 0 decodes; counting the frames of the cut file fails inside Pillow (IndexError,
    TypeError, SyntaxError, by format and cut, in Pillow 11): skipped and listed under skip,
    one line under fail."""
    name = f"a.{fmt.lower()}"
    root = tmp_path / "imgs"
    class_folder(root, "a")
    data = _frames(fmt)
    bad = root / "a" / name
    bad.write_bytes(data[:int(len(data) * keep)])
    out = tmp_path / "p"
    prepare.run(cfg(source="folder", path=str(root)), out_dir=out)
    skipped = json.loads((out / "report.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == [str(bad)]
    assert skipped[0]["reason"].startswith("cannot decode")
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="folder", path=str(root), on_bad_image="fail"), out_dir=out)
    assert str(err.value).startswith(f"{bad}: cannot decode")


def test_whole_multi_frame_file_is_read_and_noted(tmp_path):
    root = tmp_path / "imgs"
    class_folder(root, "a")
    (root / "a" / "m.gif").write_bytes(_frames("GIF"))
    out = tmp_path / "p"
    prepare.run(cfg(source="folder", path=str(root)), out_dir=out)
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == []
    assert any("first frame of a multi-frame file" in c["how"] for c in report["conversions"])


def _damage_member(path: Path, member: str) -> None:
    """Flip 20 bytes of a compressed archive member's data (its header left whole)."""
    b = bytearray(path.read_bytes())
    start = b.find(member.encode()) + len(member) + 5
    for k in range(start, start + 20):
        b[k] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("make, message", [
    (lambda f: f.write_bytes(_npy_bytes()), "a single .npy array, not an .npz archive"),
    (lambda f: np.savez(f, images=np.array([np.zeros((5, 5), np.uint8), None], object),
                        labels=np.array([0, 1])), "'images' is an object array"),
    (lambda f: np.savez(f, images=np.zeros((2, 5, 5), np.uint8), labels=np.array([0, 1]),
                        class_names=np.array(["a", 3], object)),
     "'class_names' is an object array"),
    (lambda f: (np.savez_compressed(f, images=np.arange(2 * 25 * 8, dtype=np.uint8)
                                    .reshape(8, 5, 5, 2)[:2], labels=np.array([0, 1])),
                _damage_member(f, "images.npy")), "'images' is damaged in the archive"),
    (lambda f: f.write_bytes(b"PK\x03\x04" + bytes(40)), "not a readable .npz file"),
])
def test_unreadable_npz_names_file_and_key(tmp_path, make, message):
    f = tmp_path / "d.npz"
    make(f)
    out = tmp_path / "p"
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="npz", path=str(f)), out_dir=out)
    assert str(err.value).startswith(f"{f}: ") and message in str(err.value)
    assert not out.exists()


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 5, 5), np.uint8))
    return buf.getvalue()


def test_damaged_gzip_idx_names_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    images = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    gz = bytearray(gzip.compress(idx_file(np.zeros((4, 5, 5)), 0x08)))
    gz[10] ^= 0xFF  # the deflate stream's first bytes: a zlib.error, not an OSError
    gz[11] ^= 0xFF
    images.write_bytes(bytes(gz))
    (tmp_path / "m" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_file(np.array([0, 1, 0, 1]), 0x08)))
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="idx", path=str(tmp_path / "m")), out_dir=tmp_path / "p")
    assert str(err.value).startswith(f"{images}: not a readable gzip file")


# --------------------------------------------------------------------------------------------
# Folder layouts people bring: the same classes however the path is spelled or laid out
# --------------------------------------------------------------------------------------------


def two_classes(root: Path) -> None:
    """cat (black) and bat (white): names of one length that differ in their first letter."""
    for name, value in (("cat", 0), ("bat", 255)):
        (root / name).mkdir(parents=True)
        for i in range(2):
            filled("L", value).save(root / name / f"{i}.png")


def read(path: str, **kw):
    from latentforge.sources import read_source

    return read_source(cfg(source="folder", path=path, **kw))


@pytest.mark.parametrize("spelling", ["./imgs", "imgs/", "./imgs/./", "sub/../imgs"])
def test_a_path_spelled_with_dot_segments_reads_the_same_classes(tmp_path, monkeypatch,
                                                                 spelling):
    """The class was the path minus the root's length in characters: `./imgs` made 'at' of
    'cat' and 'bat' and merged them."""
    two_classes(tmp_path / "imgs")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    plain, spelled = read(str(tmp_path / "imgs")), read(spelling)
    assert spelled.class_names == plain.class_names == ["bat", "cat"]
    np.testing.assert_array_equal(spelled.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(spelled.images, plain.images)
    assert spelled.fingerprint == plain.fingerprint and spelled.warnings == []


def test_split_folders_are_pooled_and_a_class_named_train_is_a_class(tmp_path):
    root = tmp_path / "tv"
    two_classes(root / "train")
    two_classes(root / "val")
    data = read(str(root))
    assert data.class_names == ["bat", "cat"] and np.bincount(data.labels).tolist() == [4, 4]
    assert any("split folders (train/, val/)" in w for w in data.warnings)
    assert "pooled" in data.label_handling["split_folders"]
    # Kaggle's layout: labelled train/, an unlabelled flat test/, and a docs/ folder.
    kaggle = tmp_path / "kaggle"
    two_classes(kaggle / "train")
    (kaggle / "test").mkdir()
    filled("L", 5).save(kaggle / "test" / "0.png")
    (kaggle / "docs").mkdir()
    (kaggle / "docs" / "README.md").write_text("about")
    data = read(str(kaggle))
    assert data.class_names == ["bat", "cat"] and len(data.labels) == 4
    assert {Path(i["path"]).relative_to(kaggle).as_posix(): i["reason"] for i in data.ignored} == {
        "test/0.png": "not inside a class sub-folder of a split folder",
        "docs/README.md": "not inside a class sub-folder of a split folder"}
    # A class that happens to be called train (its images right inside): two classes.
    other = tmp_path / "vehicles"
    class_folder(other, "train")
    class_folder(other, "car")
    plain = read(str(other))
    assert plain.class_names == ["car", "train"] and plain.warnings == []


def split_folder(root: Path, counts: dict[str, int], value: int) -> None:
    """Class folders of `counts[class]` images each, every pixel `value` (which split they were
    in shows in the prepared pixels)."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            filled("L", value).save(root / name / f"{i}.png")


def test_given_split_keeps_the_sources_own_train_and_val(tmp_path):
    """prepare.split given: train/ is train and val/ is val (test/ beside a val/ is in neither),
    whatever val_fraction says; random pools all three."""
    root = tmp_path / "tv"
    split_folder(root / "train", {"cat": 3, "bat": 3}, 10)
    split_folder(root / "val", {"cat": 2, "bat": 2}, 200)
    split_folder(root / "test", {"cat": 1}, 100)
    out = tmp_path / "given"
    result = prepare.run(cfg(source="folder", path=str(root), split="given", val_fraction=0.5),
                         out_dir=out)
    data = load_prepared(out)
    (x_train, y_train), (x_val, y_val) = data.split("train"), data.split("val")
    assert (len(x_train), len(x_val)) == (6, 4) and data.class_names == ["bat", "cat"]
    assert np.all(x_train == 10) and np.all(x_val == 200)
    assert sorted(y_train.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(y_val.tolist()) == [0, 0, 1, 1]
    report = json.loads((out / "report.json").read_text())
    assert "kept as the source's own split" in report["labels"]["split_folders"]
    assert "test: its 1 image(s) are in neither split (prepare.split given uses val for val)" \
        in report["warnings"] and "pooled" not in " ".join(report["warnings"])
    assert "in neither split" in result.summary
    pooled = prepare.run(cfg(source="folder", path=str(root), val_fraction=0.5),
                         out_dir=tmp_path / "random")
    assert pooled.metrics["train_images"] + pooled.metrics["val_images"] == 11
    # No val/: test/ is the val part (MNIST's t10k alike).
    only = tmp_path / "tt"
    split_folder(only / "train", {"cat": 2, "dog": 1}, 10)
    split_folder(only / "testing", {"cat": 3, "dog": 1}, 100)
    prepare.run(cfg(source="folder", path=str(only), split="given"), out_dir=tmp_path / "tt_out")
    data = load_prepared(tmp_path / "tt_out")
    assert np.all(data.split("train")[0] == 10) and np.all(data.split("val")[0] == 100)
    assert len(data.split("val")[0]) == 4


def test_given_split_of_idx_files_is_train_and_t10k(tmp_path):
    from test_prepare import write_idx

    write_idx(tmp_path / "mnist", n=40, size=4)
    write_idx(tmp_path / "mnist", n=20, size=4, prefix="t10k")
    out = tmp_path / "p"
    prepare.run(cfg(source="idx", path=str(tmp_path / "mnist"), split="given"), out_dir=out)
    data = load_prepared(out)
    assert [data.manifest["splits"][s]["count"] for s in ("train", "val")] == [40, 20]
    report = json.loads((out / "report.json").read_text())
    assert "kept as the source's own split" in report["labels"]["files"]


def test_given_split_where_there_is_none_is_refused_by_name(tmp_path):
    from latentforge.config import build_params
    from latentforge.errors import ConfigError

    flat = tmp_path / "flat"
    two_classes(flat)
    out = tmp_path / "p"
    with pytest.raises(DataError, match=r"flat: prepare.split is 'given', but this source has no "
                                        r"split of its own .* use prepare.split random"):
        prepare.run(cfg(source="folder", path=str(flat), split="given"), out_dir=out)
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"prepare: split = 'given' keeps a source's own "
                                          r"train/val split, but source = 'digits' has none"):
        build_params({"prepare": {"split": "given"}})
    # Too few in the source's val part: the message says whose split it is and what to do.
    small = tmp_path / "small"
    split_folder(small / "train", {"cat": 6}, 10)
    split_folder(small / "val", {"cat": 2}, 200)
    with pytest.raises(DataError, match=r"the val split would hold 2 image\(s\) \(6 train / 2 "
                                        r"val of 8 with the source's own split \(prepare.split "
                                        r"given\)\).*or use prepare.split random"):
        prepare.run(cfg(source="folder", path=str(small), split="given"), out_dir=out,
                    min_split_images=4)
    assert not out.exists()


def test_classes_no_stage_could_learn_are_refused_before_anything_is_written(tmp_path):
    """One class, or a class val has and train lacks (here `val/Cat` beside `train/cat`), used
    to pass prepare and fail the judge with a traceback, or train on a class with no images."""
    from latentforge.config import build_params
    from latentforge.tracking import Tracker

    out = tmp_path / "p"
    one = tmp_path / "one"
    split_folder(one, {"only": 6}, 10)
    with pytest.raises(DataError, match=r"one: 1 class \('only'\) of images; the judge and the "
                                        r"class-conditional generators need at least 2"):
        prepare.run(cfg(source="folder", path=str(one)), out_dir=out, min_classes=2)
    with pytest.raises(DataError, match=r"one: 1 class \('only'\) of images"):  # the stage's
        prepare.run_stage(build_params({"prepare": {"source": "folder", "path": str(one)}}),
                          Tracker())
    twins = tmp_path / "twins"
    split_folder(twins / "train", {"cat": 3, "dog": 3}, 10)
    split_folder(twins / "val", {"Cat": 2, "dog": 2}, 200)
    with pytest.raises(DataError) as err:
        prepare.run(cfg(source="folder", path=str(twins), split="given"), out_dir=out)
    assert str(err.value) == (f"{twins}: class(es) in val with no train images, which no stage "
                              "could learn: 'Cat' (2 in val; train has 'cat'); name each class "
                              "folder the same in every split folder, or remove the ones train/ "
                              "lacks")
    assert not out.exists()
    # max_images above what the source holds: raising it cannot help, and the advice says so.
    few = tmp_path / "few"
    split_folder(few, {"a": 4, "b": 4}, 10)
    with pytest.raises(DataError, match=r"the val split would hold 2 image\(s\) .*: raise "
                                        r"prepare.val_fraction$"):
        prepare.run(cfg(source="folder", path=str(few), val_fraction=0.1, max_images=400),
                    out_dir=out, min_split_images=4)


def test_class_names_are_one_spelling_and_dev_is_a_val_folder(tmp_path, caplog):
    """macOS stores folder names decomposed (NFD): val/café from there is train's café; dev/ is
    a val folder; split folders of other names are classes, with a warning that says so."""
    import unicodedata

    root = tmp_path / "nfd"
    split_folder(root / "train", {unicodedata.normalize("NFC", "café"): 3, "dog": 3}, 10)
    split_folder(root / "dev", {unicodedata.normalize("NFD", "café"): 2, "dog": 2}, 200)
    out = tmp_path / "p"
    prepare.run(cfg(source="folder", path=str(root), split="given"), out_dir=out)
    data = load_prepared(out)
    assert data.class_names == [unicodedata.normalize("NFC", "café"), "dog"]
    assert [data.manifest["splits"][s]["count"] for s in ("train", "val")] == [6, 4]
    other = tmp_path / "other"
    split_folder(other / "fold1", {"a": 2, "b": 2}, 10)
    split_folder(other / "fold2", {"a": 2, "b": 2}, 200)
    with caplog.at_level(logging.WARNING):
        prepare.run(cfg(source="folder", path=str(other)), out_dir=out)
    assert load_prepared(out).class_names == ["fold1", "fold2"]
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert ("the class folders fold1, fold2 hold the same sub-folders (a, b): if they are a "
            "split, name them train/, val/ (or dev/) and test/") in " ".join(warnings)


def test_images_below_a_class_folder_count_in_it_and_are_named(tmp_path):
    root = tmp_path / "imgs"
    two_classes(root)
    (root / "cat" / "more").mkdir()
    filled("L", 0).save(root / "cat" / "more" / "deep.png")
    data = read(str(root))
    assert np.bincount(data.labels).tolist() == [2, 3]
    assert data.warnings == ["1 image file(s) sit in folders below their class folder and "
                             "count in that class (e.g. cat/more/deep.png)"]


def test_symlinked_class_folders_are_read_and_a_link_cycle_ends(tmp_path):
    real = tmp_path / "real"
    two_classes(real)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("cat", "bat"):
        (linked / name).symlink_to(real / name, target_is_directory=True)
    (real / "cat" / "loop").symlink_to(linked, target_is_directory=True)  # a cycle
    (linked / "gone.png").symlink_to(tmp_path / "nowhere.png")  # broken: no file
    data = read(str(linked))
    assert data.class_names == ["bat", "cat"] and np.bincount(data.labels).tolist() == [2, 2]
    # A link beside the folder it names (kitty -> cat): the real folder keeps its images,
    # whatever order the filesystem lists them in.
    (real / "kitty").symlink_to(real / "cat", target_is_directory=True)
    (real / "cat" / "loop").unlink()
    data = read(str(real))
    assert data.class_names == ["bat", "cat"] and np.bincount(data.labels).tolist() == [2, 2]


def test_an_exif_rotated_photo_is_turned_upright(tmp_path):
    """Phones store photos sideways with an EXIF orientation saying how to turn them."""
    from PIL import ImageOps

    from latentforge.sources import convert_image, resize_square

    root = tmp_path / "imgs"
    class_folder(root, "a")
    left_dark = np.zeros((8, 16, 3), np.uint8)
    left_dark[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = root / "a" / "photo.jpg"
    Image.fromarray(left_dark).save(path, exif=exif, quality=95)
    data = read(str(root), resolution=8)
    stored = Image.open(path)
    expected = resize_square(convert_image(ImageOps.exif_transpose(stored), 1)[0], 8, "lanczos")
    as_stored = resize_square(convert_image(stored, 1)[0], 8, "lanczos")
    assert not np.array_equal(expected, as_stored)
    np.testing.assert_array_equal(data.images[data.labels == 0][-1], expected)
    assert any("turned upright by its EXIF orientation" in c["how"] for c in data.conversions)


def test_a_class_folder_named_in_another_encoding_is_one_line(tmp_path):
    import os

    root = tmp_path / "imgs"
    two_classes(root)
    try:
        os.mkdir(os.fsencode(root) + b"/caf\xe9")  # Latin-1, as a zip made on Windows leaves it
    except OSError as exc:  # APFS, ZFS utf8only: such a name cannot exist there
        pytest.skip(f"this filesystem refuses names that are not UTF-8 ({exc})")
    filled("L", 9).save(os.fsdecode(os.fsencode(root) + b"/caf\xe9/0.png"))
    with pytest.raises(DataError) as err:
        read(str(root))
    assert str(err.value) == (f"{root}: class folder b'caf\\xe9' has a name that is not UTF-8 "
                              "text (class names must be, e.g. a Latin-1 name from a zip made "
                              "on Windows); rename the folder")
    # A file so named in a class folder is fine: its bytes enter the fingerprint.
    os.rename(os.fsencode(root) + b"/caf\xe9/0.png", os.fsencode(root) + b"/cat/\xe9t\xe9.png")
    os.rmdir(os.fsencode(root) + b"/caf\xe9")
    assert np.bincount(read(str(root)).labels).tolist() == [2, 3]
    # Skipped (undecodable), it is named in the report, the log and MLflow's summary as text.
    with open(os.fsencode(root) + b"/cat/\xe9t\xe9.png", "wb") as f:
        f.write(b"not an image")
    result = prepare.run(cfg(source="folder", path=str(root)), out_dir=tmp_path / "p")
    result.summary.encode("utf-8")
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert [s["path"] for s in report["skipped"]] == [f"{root}/cat/\\xe9t\\xe9.png"]


def test_idx_files_kept_both_unpacked_and_gzipped_are_read_once(tmp_path):
    """torchvision's MNIST/raw holds every file twice; reading both doubled the data and put
    copies of train images into val."""
    folder = tmp_path / "raw"
    folder.mkdir()
    images = np.arange(6 * 5 * 5).reshape(6, 5, 5) % 256
    for name, values in (("train-images-idx3-ubyte", images),
                         ("train-labels-idx1-ubyte", np.array([0, 1, 0, 1, 0, 1]))):
        raw = idx_file(values, 0x08)
        (folder / name).write_bytes(raw)
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
    from latentforge.sources import read_source

    data = read_source(cfg(source="idx", path=str(folder)))
    assert len(data.images) == 6
    assert data.warnings == [f"{folder}/train-images-idx3-ubyte.gz is "
                             f"{folder}/train-images-idx3-ubyte compressed: read once, unpacked"]


def test_nearly_black_data_is_called_out(tmp_path):
    """12-bit data in 16-bit PNGs: scaled by 65535, the brightest pixel lands near 16 of 255."""
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        i16(4095).save(root / name / "0.png")
    data = read(str(root))
    assert int(data.images.max()) < 32
    assert any("nearly black" in w and "12-bit data" in w for w in data.warnings)


def test_a_folder_without_class_folders_says_what_it_ignored(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        filled("L", 1).save(root / f"{i}.png")
    with pytest.raises(DataError) as err:
        read(str(root))
    assert str(err.value) == (f"{root}: the folder source holds no usable images; ignored: "
                              "3 file(s) not inside a class sub-folder")
    with pytest.raises(DataError, match=r"0\.png: a file; the folder source reads a folder"):
        read(str(root / "0.png"))


def test_npz_class_names_saved_as_bytes_are_text(tmp_path):
    from latentforge.sources import read_source

    f = tmp_path / "d.npz"
    np.savez(f, images=np.zeros((4, 5, 5), np.uint8), labels=np.array([0, 1, 0, 1]),
             class_names=np.array([b"cat", b"dog"]))
    assert read_source(cfg(source="npz", path=str(f))).class_names == ["cat", "dog"]
