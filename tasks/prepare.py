"""The `prepare` stage: read a source, resize, split, and write sharded uint8 arrays.

Output (one folder, committed atomically): shards, manifest.json, preview.png, report.json.
Nothing in the output depends on time or machine, so DVC hashes are reproducible.

report.json lists every decision the stage took: per image mode how many images were
converted and how (latentforge/sources.py holds the table), the alpha background, the files
skipped and ignored with reasons, how labels were read, classes left out for having no
images, and a warning for each class with no train images (or no val images when
val_fraction > 0). The warnings are logged and repeated in the stage summary.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from latentforge import paths, storage
from latentforge.config import Params, PrepareConfig
from latentforge.data import MANIFEST, MIN_CLASSES, MIN_SPLIT_IMAGES, SPLITS, shard_names
from latentforge.errors import DataError
from latentforge.images import make_grid, save_png
from latentforge.runner import StageResult
from latentforge.sources import ALPHA_BACKGROUND, EMBEDDED, SourceData, read_source, split_role
from latentforge.tracking import Tracker

log = logging.getLogger(__name__)


def select_and_split(labels: np.ndarray, cfg: PrepareConfig, given: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
    """Deterministic, class-stratified train/val indices (sorted) from `seed` and `val_fraction`.

    `max_images` first keeps a seeded random subset; each class then gives
    round(n_class * val_fraction) images to val (at least one when it has two or more).
    With `prepare.split: given`, `given` (each image's split role, from `given_roles`) decides
    instead; images of neither role are in no split.
    """
    rng = np.random.default_rng(cfg.seed)
    keep = np.arange(len(labels))
    if cfg.max_images is not None and cfg.max_images < len(keep):
        keep = np.sort(rng.permutation(len(keep))[: cfg.max_images])
    if cfg.split == "given":
        if given is None:
            raise ValueError("prepare.split is 'given': pass each image's role (given_roles)")
        return {s: keep[given[keep] == s] for s in SPLITS}
    train, val = [], []
    for cls in np.unique(labels[keep]):
        members = keep[labels[keep] == cls]
        members = members[rng.permutation(len(members))]
        n_val = int(round(len(members) * cfg.val_fraction))
        if cfg.val_fraction > 0 and n_val == 0 and len(members) >= 2:
            n_val = 1
        val.append(members[:n_val])
        train.append(members[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_shards(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 shard_size: int) -> list[dict]:
    shards = []
    for i, start in enumerate(range(0, len(images), shard_size)):
        img_name, lbl_name = shard_names(split, i)
        img_sha = storage.write_bytes_atomic(folder / img_name,
                                             _npy_bytes(images[start:start + shard_size]))
        lbl_sha = storage.write_bytes_atomic(folder / lbl_name,
                                             _npy_bytes(labels[start:start + shard_size]))
        shards.append({"images": img_name, "labels": lbl_name, "count": int(min(
            shard_size, len(images) - start)), "images_sha256": img_sha, "labels_sha256": lbl_sha})
    return shards


def preview(images: np.ndarray, labels: np.ndarray, class_names: list[str], per_class: int = 10
            ) -> np.ndarray:
    """One row per class (up to 20 classes) of its first `per_class` train images."""
    rows, names = [], []
    for cls, name in list(enumerate(class_names))[:20]:
        rows.append(images[labels == cls][:per_class])
        names.append(name)
    return make_grid(rows, labels=names)


def build_manifest(cfg: PrepareConfig, data: SourceData, split_idx: dict[str, np.ndarray],
                   shards: dict[str, list[dict]]) -> dict:
    splits = {}
    for split in SPLITS:
        lbl = data.labels[split_idx[split]]
        splits[split] = {
            "count": int(len(lbl)),
            "per_class": {name: int((lbl == i).sum()) for i, name in enumerate(data.class_names)},
            "shards": shards[split],
        }
    return {
        "format": "latentforge.prepared/1",
        "source": {"kind": cfg.source, "path": None if cfg.source in EMBEDDED else cfg.path,
                   "fingerprint": data.fingerprint},
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "resize_filter": cfg.resize_filter,
        "dtype": "uint8",
        "class_names": data.class_names,
        "splits": splits,
        "skipped": len(data.skipped),
    }


def split_warnings(labels: np.ndarray, class_names: list[str], split_idx: dict[str, np.ndarray],
                   cfg: PrepareConfig) -> list[str]:
    """A warning per class in neither split, or with no val images when val_fraction > 0
    (one with val images and no train images is refused: check_classes_in_train)."""
    k = len(class_names)
    total = np.bincount(labels, minlength=k)
    n = {s: np.bincount(labels[split_idx[s]], minlength=k) for s in SPLITS}
    warnings = []
    for i, name in enumerate(class_names):
        train, val = int(n["train"][i]), int(n["val"][i])
        if train + val == 0 and cfg.split == "given":
            warnings.append(f"class '{name}': none of its {int(total[i])} image(s) is in the "
                            "source's train or val part" + (
                                f" (of those max_images={cfg.max_images} kept)"
                                if cfg.max_images is not None else ""))
        elif train + val == 0:
            warnings.append(f"class '{name}': max_images={cfg.max_images} kept none of its "
                            f"{int(total[i])} image(s), so it is in neither split")
        elif val == 0 and cfg.val_fraction > 0:
            warnings.append(f"class '{name}' has no val images ({train} in train)")
    return warnings


def given_roles(data: SourceData, cfg: PrepareConfig) -> tuple[np.ndarray, list[str]]:
    """Each image's split under `prepare.split: given`: train, val (the source's val part, or
    its test part where it has no val part) or "" (in neither), and a note per part left out.
    A DataError where the source has no split of its own, or no train or val part."""
    where = cfg.path
    if data.origins is None:
        raise DataError(f"{where}: prepare.split is 'given', but this source has no split of its "
                        "own (a folder whose top level is train/ and val/ or test/ folders, each "
                        "holding the class folders; IDX train and t10k files): use prepare.split "
                        "random")
    parts = sorted(set(data.origins.tolist()))
    roles = {part: split_role(part) for part in parts}
    val_role = "val" if "val" in roles.values() else "test"
    for needed, what in (("train", "train"), (val_role, "val or test")):
        if needed not in roles.values():
            raise DataError(f"{where}: prepare.split is 'given', but none of the source's parts "
                            f"({', '.join(parts)}) is a {what} part: use prepare.split random")
    given = {p: "train" if r == "train" else "val" if r == val_role else "" for p, r in
             roles.items()}
    counts = Counter(data.origins.tolist())
    notes = [f"{p}: its {counts[p]} image(s) are in neither split (prepare.split given uses "
             f"{', '.join(q for q in parts if given[q] == 'val')} for val)" if roles[p] else
             f"{p}: its {counts[p]} image(s) are in neither split (not a train, val or test "
             "part)" for p in parts if not given[p]]
    return np.array([given[o] for o in data.origins.tolist()], dtype=str), notes


MAX_IGNORED_LISTED = 1000  # a folder of sidecar files must not make report.json huge


def build_report(cfg: PrepareConfig, data: SourceData, warnings: list[str]) -> dict:
    return {
        "channels": cfg.channels,
        "on_bad_image": cfg.on_bad_image,
        "conversions": data.conversions,
        "alpha_background": f"white ({ALPHA_BACKGROUND})",
        "labels": data.label_handling,
        "empty_classes": data.empty_classes,
        "warnings": warnings,
        "skipped": data.skipped,
        "ignored": data.ignored[:MAX_IGNORED_LISTED],
        "ignored_count": len(data.ignored),
    }


def summary_lines(data: SourceData, warnings: list[str]) -> list[str]:
    """The Markdown stage summary after its first line: conversions, labels, warnings, files."""
    lines = ["", f"Converted (alpha composited on white, {ALPHA_BACKGROUND}):", "",
             "| mode | images | how |", "|---|---|---|"]
    lines += [f"| {c['mode']} | {c['images']} | {c['how']} |" for c in data.conversions]
    labels = data.label_handling
    if labels:
        renumbered = f"; renumbered {labels['renumbered']}" if labels.get("renumbered") else ""
        lines += ["", f"Labels from {labels['from']}, class names from "
                  f"{labels['class_names']}{renumbered}."]
    if warnings:
        lines += ["", f"{len(warnings)} warning(s):", ""] + [f"- {w}" for w in warnings]
    if data.ignored:
        lines += ["", f"Ignored {len(data.ignored)} file(s) that are not class images "
                  "(listed in report.json)."]
    if data.skipped:
        lines += ["", f"Skipped {len(data.skipped)} image(s):", "", "| file | reason |", "|---|---|"]
        lines += [f"| {s['path']} | {s['reason']} |" for s in data.skipped]
    return lines


def check_split_sizes(split_idx: dict[str, np.ndarray], cfg: PrepareConfig, minimum: int,
                      available: int) -> None:
    """A DataError naming prepare.val_fraction (or the source's size) where a split would
    hold fewer than `minimum` images: the stages after prepare would fail on it minutes
    later (the tokenizer's FD needs 2 val images, evaluate's precision/recall 4).
    `available`: the images the source gave, of which prepare.max_images may keep fewer."""
    counts = {s: len(split_idx[s]) for s in SPLITS}
    short = [s for s in SPLITS if counts[s] < minimum]
    if short:
        where = cfg.source if cfg.source in EMBEDDED else cfg.path
        how, advice = (("the source's own split (prepare.split given)",
                        "give those parts more images, or use prepare.split random")
                       if cfg.split == "given" else
                       (f"prepare.val_fraction {cfg.val_fraction}",
                        _split_advice(short, sum(counts.values()) >= 2 * minimum,
                                      cfg.max_images is not None and cfg.max_images < available)))
        raise DataError(
            f"{where}: the {' and '.join(short)} split would hold "
            f"{' and '.join(str(counts[s]) for s in short)} image(s) ({counts['train']} train "
            f"/ {counts['val']} val of {sum(counts.values())} with {how}); the later stages "
            f"need at least {minimum} in each: {advice}")


def _split_advice(short: list[str], enough: bool, held_back: bool) -> str:
    """What to change: the split fraction where the images would do for both splits, more
    images where not (and prepare.max_images first where it holds some back)."""
    more = "raise prepare.max_images" if held_back else "give more images"
    if not enough:
        return more
    fraction = "raise" if short == ["val"] else "lower"
    return f"{fraction} prepare.val_fraction" + (f" or {more}" if held_back else "")


def check_class_count(class_names: list[str], cfg: PrepareConfig, minimum: int) -> None:
    """A DataError before anything is written where the data has fewer than `minimum` classes
    (the pipeline's stage asks for MIN_CLASSES: the judge is a classifier and the generators
    are class-conditional; a one-class folder used to fail the judge with a traceback)."""
    if len(class_names) < minimum:
        where = cfg.source if cfg.source in EMBEDDED else cfg.path
        named = f" ({class_names[0]!r})" if len(class_names) == 1 else ""
        raise DataError(f"{where}: {len(class_names)} class{named} of images; the judge and the "
                        f"class-conditional generators need at least {minimum}" +
                        (" (one sub-folder of images per class)" if cfg.source == "folder" else
                         ""))


def check_classes_in_train(labels: np.ndarray, class_names: list[str],
                           split_idx: dict[str, np.ndarray], cfg: PrepareConfig) -> None:
    """A DataError before anything is written where val has a class that train lacks (a split
    folder's class that train/ lacks, often the same class spelt otherwise: `val/Cat` beside
    `train/cat`): no stage could learn it, and every later one would grade it. A class in
    neither split (max_images kept none of it) is a warning: split_warnings."""
    in_train = np.bincount(labels[split_idx["train"]], minlength=len(class_names))
    in_val = np.bincount(labels[split_idx["val"]], minlength=len(class_names))
    missing = [i for i in range(len(class_names)) if in_train[i] == 0 and in_val[i] > 0]
    if not missing:
        return
    trained = [c for i, c in enumerate(class_names) if in_train[i] > 0]
    lines = []
    for i in missing:
        name = class_names[i]
        alike = [c for c in trained if c.casefold() == name.casefold()] or \
            difflib.get_close_matches(name, trained, n=1)
        lines.append(f"'{name}' ({int(in_val[i])} in val"
                     + (f"; train has '{alike[0]}'" if alike else "") + ")")
    how = ("name each class folder the same in every split folder, or remove the ones train/ "
           "lacks" if cfg.split == "given" else
           "give those classes more images" + (
               ", raise prepare.max_images" if cfg.max_images is not None and
               cfg.max_images < len(labels) else "") + " or lower prepare.val_fraction")
    where = cfg.source if cfg.source in EMBEDDED else cfg.path
    raise DataError(f"{where}: class(es) in val with no train images, which no stage could "
                    f"learn: {', '.join(lines)}; {how}")


def run(cfg: PrepareConfig, out_dir: str | Path = paths.PREPARED,
        tracker: Tracker | None = None, min_split_images: int = 0, min_classes: int = 1
        ) -> StageResult:
    """Read, split and write the prepared data. `min_split_images`, `min_classes`: fail (before
    writing) where a split gets fewer images or the data fewer classes (the pipeline's stage
    asks for MIN_SPLIT_IMAGES and MIN_CLASSES)."""
    tracker = tracker or Tracker()
    log.info("prepare: reading %s source%s", cfg.source,
             "" if cfg.source in EMBEDDED else f" from {cfg.path}")
    data = read_source(cfg)
    given, unused = given_roles(data, cfg) if cfg.split == "given" else (None, [])
    split_idx = select_and_split(data.labels, cfg, given)
    check_class_count(data.class_names, cfg, min_classes)
    check_split_sizes(split_idx, cfg, min_split_images, len(data.labels))
    check_classes_in_train(data.labels, data.class_names, split_idx, cfg)
    new_warnings = unused + split_warnings(data.labels, data.class_names, split_idx, cfg)
    for w in new_warnings:
        log.warning("prepare: %s", w)
    warnings = data.warnings + new_warnings
    out_dir = Path(out_dir)
    with storage.atomic_dir(out_dir) as tmp:
        shards = {s: write_shards(tmp, s, data.images[split_idx[s]], data.labels[split_idx[s]],
                                  cfg.shard_size) for s in SPLITS}
        manifest = build_manifest(cfg, data, split_idx, shards)
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        manifest_sha = storage.write_bytes_atomic(tmp / MANIFEST, manifest_bytes)
        train = split_idx["train"]
        save_png(preview(data.images[train], data.labels[train], data.class_names),
                 tmp / "preview.png")
        report = build_report(cfg, data, warnings)
        storage.write_bytes_atomic(tmp / "report.json",
                                   json.dumps(report, indent=2, sort_keys=True).encode())

    counts = {s: manifest["splits"][s]["count"] for s in SPLITS}
    log.info("prepare: %d train / %d val images, %d classes, %dx%dx%d, %d skipped, "
             "%d ignored, %d warning(s) -> %s", counts["train"], counts["val"],
             len(data.class_names), cfg.resolution, cfg.resolution, cfg.channels,
             len(data.skipped), len(data.ignored), len(warnings), out_dir)
    for c in data.conversions:
        log.info("prepare: %d %s image(s): %s", c["images"], c["mode"], c["how"])
    source_uri = EMBEDDED.get(cfg.source, cfg.path)
    tracker.log_input("source", source_uri if "://" in source_uri else str(Path(source_uri)),
                      data.fingerprint, context="source")
    tracker.log_output("prepared", out_dir / MANIFEST, manifest_sha,
                       profile={"train": counts["train"], "val": counts["val"]})
    tracker.log_artifact(out_dir / "preview.png")
    tracker.log_artifact(out_dir / "report.json")

    metrics = {"train_images": counts["train"], "val_images": counts["val"],
               "classes": len(data.class_names), "skipped_images": len(data.skipped),
               "warnings": len(warnings)}
    lines = [f"**{counts['train']}** train / **{counts['val']}** val images, "
             f"{len(data.class_names)} classes, {cfg.resolution}x{cfg.resolution}x{cfg.channels} "
             f"({cfg.resize_filter}); manifest sha256 `{manifest_sha[:16]}`"]
    lines += summary_lines(data, warnings)
    return StageResult(metrics=metrics, summary="\n".join(lines),
                       digests={"prepared": manifest_sha})


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params.prepare, tracker=tracker, min_split_images=MIN_SPLIT_IMAGES,
               min_classes=MIN_CLASSES)
