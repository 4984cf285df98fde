"""The `cache` stage: encode the prepared splits once with the tokenizer's EMA weights.

The generator trains on the cached tokens instead of running the encoder every step. Randomness
is not frozen into the cache: for `kl` it stores the posterior moments, and every epoch draws a
fresh sample with `draw_latents`; for `fsq`/`vq` it stores the integer codes, which the
generator stage turns into latents with the tokenizer it loads anyway
(`handle.model.codes_to_latents(torch.as_tensor(codes, dtype=torch.long))`).

Output folder (data/cache), swapped in atomically and memory-mappable:
    manifest.json              key, tokenizer and prepared sha256s, kind, token shape (K, D),
                               counts per split, every shard file with its sha256
    train-00000.labels.npy     (n,) int64
    train-00000.mean.npy       (n, K, D) float32   kind "moments" (kl), with .logvar.npy
    train-00000.codes.npy      (n, K) int32        kind "codes" (fsq, vq)
    train-00000.hflip_*.npy    the same for the horizontally flipped images (cache.hflip)
    val-00000.* ...
Nothing in it depends on time, machine or worker count, so DVC hashes are reproducible.

How it runs: the driver plans the shards (cache.shard_size images each) and cuts them into
encoder batches aligned to the shard start (cache.batch_size images each). With one worker and
no cluster (`compute`'s defaults) the driver encodes them itself, through the same
`EncodeBatches` code with the same batches and torch threads: a local Ray instance and an
actor would cost ~4 s and ~2.5 s of start-up on 2 cores for ~1 s of encoding of the default
digits. Otherwise Ray Data feeds
these index ranges, a block of consecutive ones per call, to a pool of `compute.num_workers`
actors (`EncodeBatches`; `compute.cpus_per_worker` CPUs and torch threads each, one GPU each
with `compute.use_gpu`) that hold the model and read the images straight from the
memory-mapped prepared shards (on a filesystem the workers share with the driver); only the
small encodings travel back through the object store. Because
every image is encoded in the same fixed batch whatever the worker count or the resume point,
the output is the same byte for byte. The driver writes each shard as soon as all of its rows
are back: the arrays under temporary names renamed into place, then a sidecar JSON with their
sha256s, which marks the shard committed (in `paths.work_dir("cache", key)`). A rerun after a
crash keeps the committed shards and encodes only the rest; when every shard is there the
folder is assembled (hard links), verified by decoding, swapped into place and the scratch
folder removed.

Throughput is logged twice: end to end, and in steady state, after the first actor has its
model loaded and one warm-up batch done. Start-up (actor process, torch import, model load:
seconds) is a fixed cost; after it the pipeline spends 0.5-4% of actor time outside the
forward pass (bench/cache_throughput.py measures both against a bare encoder loop).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentforge import paths, storage
from latentforge.config import CacheConfig, ComputeConfig, Params
from latentforge.data import (
    RERUN_PREPARE,
    SPLITS,
    Prepared,
    check_shard,
    load_array,
    load_prepared,
    read_manifest,
)
from latentforge.errors import DataError
from latentforge.malloc import tune_malloc
from latentforge.raycluster import (
    map_on_actor_pool,
    on_cluster,
    record_nodes,
    start_ray_data,
    use_ray,
)
from latentforge.runner import StageResult
from latentforge.tracking import Tracker

log = logging.getLogger(__name__)

FORMAT = "latentforge.cache/1"
RERUN_CACHE = "rerun the cache stage (`latentforge stage cache` or `dvc repro cache`)"
MANIFEST = "manifest.json"
PLAN = "plan.json"
# Max |decode(cached) - decode(fresh)| in pixel units of [-1, 1]. Re-encoding in another batch
# differs by float rounding (~1e-6); a misplaced or stale shard differs by ~1. 1e-2 is about
# one grey level of a uint8 image and leaves room for GPU (TF32) encoders.
VERIFY_TOLERANCE = 1e-2


def cache_key(tokenizer_sha256: str, prepared_sha256: str) -> str:
    """The identity of a cache: which tokenizer weights encoded which prepared data."""
    text = json.dumps({"prepared_sha256": prepared_sha256, "tokenizer_sha256": tokenizer_sha256},
                      sort_keys=True)
    return storage.sha256_bytes(text.encode())


# --------------------------------------------------------------------------------------------
# Reading a cache (the generator stage's side)
# --------------------------------------------------------------------------------------------


@dataclass
class Cache:
    """An opened cache folder; arrays stay memory-mapped until a caller copies them."""

    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def kind(self) -> str:
        """"moments" (kl: mean and logvar) or "codes" (fsq, vq: integer codes)."""
        return str(self.manifest["kind"])

    @property
    def token_shape(self) -> tuple[int, int]:
        """(K, D): tokens per image and the dimension of each token."""
        k, d = self.manifest["token_shape"]
        return int(k), int(d)

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.manifest["tokenizer_sha256"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def count(self, name: str) -> int:
        return int(self.manifest["splits"][name]["count"])

    def shards(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        """Each shard of split `name` as {array name: memory-mapped array}, in order."""
        for shard in self.manifest["splits"][name]["shards"]:
            yield {array: load_array(self.root / entry["file"], RERUN_CACHE)
                   for array, entry in shard["files"].items()}

    def split(self, name: str) -> dict[str, np.ndarray]:
        """{"labels", "mean"/"logvar" or "codes", "hflip_*"} of split `name`, rows aligned.

        A single shard stays memory-mapped (np.load mmap_mode="r"); several are concatenated
        into memory, as `Prepared.split` does (tokens are small next to the images).
        """
        shards = list(self.shards(name))
        if len(shards) == 1:
            return shards[0]
        if not shards:
            return {array: np.zeros((0, *spec["shape"]), np.dtype(spec["dtype"]))
                    for array, spec in self.manifest["arrays"].items()}
        return {array: np.concatenate([s[array] for s in shards]) for array in shards[0]}

    def take(self, name: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` of split `name`, read shard by shard without loading the whole split."""
        indices = np.asarray(indices, dtype=np.int64)
        starts = np.cumsum([0] + [s["count"] for s in self.manifest["splits"][name]["shards"]])
        out: dict[str, np.ndarray] = {}
        for i, arrays in enumerate(self.shards(name)):
            mine = (indices >= starts[i]) & (indices < starts[i + 1])
            for array, values in arrays.items():
                if array not in out:
                    out[array] = np.empty((len(indices), *values.shape[1:]), values.dtype)
                out[array][mine] = values[indices[mine] - starts[i]]
        return out


def load_cache(path: str | Path = paths.CACHE, tokenizer_sha256: str | None = None,
               prepared_sha256: str | None = None, verify: bool = False) -> Cache:
    """Open a cache folder, refusing one that another tokenizer (or other data) produced.

    `tokenizer_sha256` is the sha256 of the weights the caller will decode with
    (`load_tokenizer(...).sha256`); latents of other weights would decode into garbage.
    With `verify`, every shard file's sha256 is checked against the manifest.
    """
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{manifest_path}: no latent cache here; run the cache stage first "
                        f"(`latentforge stage cache` or `dvc repro cache`)")
    raw = manifest_path.read_bytes()
    manifest = read_manifest(manifest_path, raw, RERUN_CACHE)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}; "
                        f"rerun the cache stage")
    rerun = "rerun the cache stage (`latentforge stage cache` or `dvc repro cache`) to " \
            "re-encode the prepared data with the current tokenizer"
    for what, wanted in (("tokenizer", tokenizer_sha256), ("prepared", prepared_sha256)):
        cached = manifest[f"{what}_sha256"]
        if wanted is not None and wanted != cached:
            raise DataError(
                f"{root}: latent cache does not match the {what} in use: it was encoded from "
                f"{what} sha256 {cached}, but the {what} in use has sha256 {wanted} "
                f"(cache key {manifest['key'][:16]}); {rerun}")
    if verify:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                for entry in shard["files"].values():
                    check_shard(root / entry["file"], entry["sha256"], RERUN_CACHE)
    return Cache(root, manifest, storage.sha256_bytes(raw))


def draw_latents(arrays: Mapping[str, Any], rng: Any, hflip: bool = False) -> Any:
    """A fresh posterior sample mean + exp(0.5 * logvar) * eps from cached kl moments.

    `arrays` holds "mean" and "logvar" (N, K, D) rows of a split (numpy or torch); `rng` is a
    torch.Generator (returns a float32 tensor on the moments' device) or a
    numpy.random.Generator (returns a float32 array). `hflip` samples the flipped view.
    Codes caches have nothing to sample: the generator stage maps codes to latents with the
    tokenizer (`handle.model.codes_to_latents`).
    """
    prefix = "hflip_" if hflip else ""
    if f"{prefix}mean" not in arrays:
        raise ValueError(f"draw_latents needs '{prefix}mean' and '{prefix}logvar' (a kl cache); "
                         f"got {sorted(arrays)}. Codes caches map to latents with "
                         f"tokenizer.model.codes_to_latents")
    mean, logvar = arrays[f"{prefix}mean"], arrays[f"{prefix}logvar"]
    if isinstance(rng, np.random.Generator):
        mean = np.asarray(mean, dtype=np.float32)
        std = np.exp(0.5 * np.asarray(logvar, dtype=np.float32))
        return mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    import torch

    mean_t = torch.as_tensor(np.asarray(mean) if not torch.is_tensor(mean) else mean,
                             dtype=torch.float32)
    logvar_t = torch.as_tensor(np.asarray(logvar) if not torch.is_tensor(logvar) else logvar,
                               dtype=torch.float32, device=mean_t.device)
    # Draw on the generator's device, then move: a CPU generator cannot fill a CUDA tensor.
    eps = torch.randn(mean_t.shape, generator=rng, device=rng.device).to(mean_t.device)
    return mean_t + torch.exp(0.5 * logvar_t) * eps


# --------------------------------------------------------------------------------------------
# The plan: shards and the encoder batches inside them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one split, written as one set of files."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"

    @property
    def count(self) -> int:
        return self.stop - self.start


def plan_shards(counts: Mapping[str, int], shard_size: int) -> list[Shard]:
    return [Shard(split, i, start, min(start + shard_size, counts[split]))
            for split in SPLITS
            for i, start in enumerate(range(0, counts[split], shard_size))]


def encoder_batches(shards: list[Shard], batch_size: int) -> list[dict[str, int]]:
    """Index ranges of at most `batch_size` rows, aligned to each shard's start.

    Alignment fixes which images share a forward pass for any worker count and any resume
    point, which is what makes the output reproducible byte for byte.
    """
    return [{"split": SPLITS.index(s.split), "start": start,
             "stop": min(start + batch_size, s.stop)}
            for s in shards for start in range(s.start, s.stop, batch_size)]


def array_specs(kind: str, token_shape: tuple[int, int], hflip: bool) -> dict[str, dict]:
    """Name -> dtype and per-row shape of every array a shard holds."""
    k, d = token_shape
    views = ["", "hflip_"] if hflip else [""]
    specs: dict[str, dict] = {"labels": {"dtype": "int64", "shape": []}}
    for view in views:
        if kind == "moments":
            specs[f"{view}mean"] = {"dtype": "float32", "shape": [k, d]}
            specs[f"{view}logvar"] = {"dtype": "float32", "shape": [k, d]}
        else:
            specs[f"{view}codes"] = {"dtype": "int32", "shape": [k]}
    return specs


# --------------------------------------------------------------------------------------------
# The actors
# --------------------------------------------------------------------------------------------


class SplitReader:
    """Rows of one prepared split, read across its memory-mapped shards."""

    def __init__(self, root: str | Path, shards: list[dict]) -> None:
        self.files = [Path(root) / s["images"] for s in shards]
        self.starts = np.cumsum([0] + [int(s["count"]) for s in shards])
        self._maps: dict[int, np.ndarray] = {}

    def read(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, R, R, C), copied out of the mapping."""
        parts = []
        for i in range(len(self.files)):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                if i not in self._maps:
                    self._maps[i] = load_array(self.files[i], RERUN_PREPARE)
                parts.append(self._maps[i][lo - self.starts[i]:hi - self.starts[i]])
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])


class EncodeBatches:
    """A Ray Data actor: holds the tokenizer and encodes index ranges of the prepared splits.

    Each call gets rows {"split", "start", "stop"} and, when the actors may run on other
    machines, "images" (the range's uint8 pixels as bytes); without them the actor reads the
    range from the prepared shards' memory maps, which only a node that sees the driver's disk
    can. It returns one row per image: "split", "index" (row in the split), the encodings
    ("mean"/"logvar" or "codes", and "hflip_*"), each row's share of the call's time in the
    forward pass ("encoder_seconds") and in the whole call, reading and conversion included
    ("call_seconds"), "ready_at": the wall clock (time.time()) when this actor had its model
    loaded and warmed up, which splits the pipeline's time into start-up and steady state, and
    "node": the Ray node the actor runs on.
    """

    def __init__(self, tokenizer: Any, prepared: dict[str, Any] | None,
                 image_shape: tuple[int, ...], threads: int, use_gpu: bool, hflip: bool,
                 batch_size: int) -> None:
        import torch

        from latentforge.raycluster import node_id

        tune_malloc()  # an actor is a fresh process; see latentforge/malloc.py
        # One thread per reserved CPU: more would oversubscribe the node and halve throughput.
        torch.set_num_threads(threads)
        # The tokenizer arrives through the object store (pickled with its weights), never as
        # a path: a cluster node does not see the driver's disk.
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = tokenizer.model.to(self.device).eval()
        self.readers = (None if prepared is None else
                        [SplitReader(prepared["dir"], prepared["shards"][s]) for s in SPLITS])
        self.image_shape = tuple(image_shape)
        self.hflip = hflip
        # In-process (no Ray started) there is no node to name; ray is not even imported.
        ray = sys.modules.get("ray")
        self.node = node_id() if ray is not None and ray.is_initialized() else ""
        # One full batch before the first call (allocator, kernel selection, cuDNN autotune):
        # start-up work that should not slow the first real batch.
        cfg = self.model.cfg
        self._encode(torch.zeros(batch_size, cfg.channels, cfg.image_size, cfg.image_size,
                                 device=self.device))
        self.ready_at = time.time()

    def _encode(self, x: Any) -> tuple[dict[str, np.ndarray], float]:
        """x: (B, C, H, W) in [-1, 1] -> ({"mean", "logvar"} or {"codes"}, forward seconds)."""
        import torch

        started = time.perf_counter()
        with torch.no_grad():
            enc = self.model.encode(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        if enc.codes is not None:
            return {"codes": enc.codes.to(torch.int32).cpu().numpy()}, seconds
        return {"mean": enc.mean.float().cpu().numpy(),
                "logvar": enc.logvar.float().cpu().numpy()}, seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from latentforge.tasks.judge import images_to_tensor

        called = time.perf_counter()
        out: dict[str, list[np.ndarray]] = {}
        shipped = batch.get("images")
        for i, (split, start, stop) in enumerate(zip(batch["split"], batch["start"],
                                                     batch["stop"], strict=True)):
            if shipped is not None:
                images = np.frombuffer(shipped[i], np.uint8).reshape(-1, *self.image_shape)
            else:
                assert self.readers is not None
                images = self.readers[int(split)].read(int(start), int(stop))
            x = images_to_tensor(images).to(self.device)  # (B, C, H, W)
            arrays, seconds = self._encode(x)
            if self.hflip:
                flipped, more = self._encode(x.flip(-1))
                arrays.update({f"hflip_{k}": v for k, v in flipped.items()})
                seconds += more
            n = int(stop - start)
            arrays["split"] = np.full(n, split, np.int8)
            arrays["index"] = np.arange(start, stop, dtype=np.int64)
            arrays["encoder_seconds"] = np.full(n, seconds / n)
            for key, value in arrays.items():
                out.setdefault(key, []).append(value)
        result = {k: np.concatenate(v) for k, v in out.items()}
        result["call_seconds"] = np.full(len(result["index"]),
                                         (time.perf_counter() - called) / len(result["index"]))
        result["ready_at"] = np.full(len(result["index"]), self.ready_at)
        result["node"] = np.full(len(result["index"]), self.node)
        return result


# --------------------------------------------------------------------------------------------
# The scratch folder: committed shards, resume
# --------------------------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _commit_shard(work: Path, shard: Shard, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write a shard's arrays, then its sidecar; the sidecar's rename is the commit."""
    files = {}
    for name in sorted(arrays):
        file = f"{shard.name}.{name}.npy"
        files[name] = {"file": file,
                       "sha256": storage.write_bytes_atomic(work / file, _npy_bytes(arrays[name]))}
    record = {"count": shard.count, "files": files}
    storage.write_bytes_atomic(work / f"{shard.name}.json",
                               json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def _committed_shards(work: Path, plan: list[Shard], names: set[str]) -> dict[str, dict]:
    """Sidecars of shards a previous attempt finished whose files still match their sha256."""
    done = {}
    for shard in plan:
        sidecar = work / f"{shard.name}.json"
        if not sidecar.exists():
            continue
        try:
            record = json.loads(sidecar.read_text())
        except ValueError:  # cut by a crash: the shard is encoded again
            log.warning("cache: %s is damaged; encoding shard %s again", sidecar, shard.name)
            continue
        intact = (isinstance(record, dict) and record.get("count") == shard.count
                  and set(record.get("files") or {}) == names
                  and all((work / e["file"]).exists()
                          and storage.sha256_file(work / e["file"]) == e["sha256"]
                          for e in record["files"].values()))
        if intact:
            done[shard.name] = record
        else:
            log.warning("cache: %s in %s is incomplete or damaged; encoding it again",
                        shard.name, work)
    return done


def _read_plan(plan_file: Path) -> Any:
    try:
        return json.loads(plan_file.read_text())
    except ValueError:
        return None  # damaged: not this plan


def _open_work_dir(work: Path, plan_record: dict[str, Any]) -> None:
    """Create the scratch folder, or empty it if it holds shards of another plan."""
    plan_file = work / PLAN
    if plan_file.exists() and _read_plan(plan_file) != plan_record:
        log.info("cache: %s holds shards of other settings (or a damaged plan); starting "
                 "afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not plan_file.exists():
        storage.write_bytes_atomic(plan_file, json.dumps(plan_record, indent=2,
                                                         sort_keys=True).encode())


@dataclass
class EncodeStats:
    images: int = 0
    seconds: float = 0.0  # wall time of the Ray Data pipeline, actor start-up included
    encoder_seconds: float = 0.0  # in the forward pass, summed over actors
    call_seconds: float = 0.0  # inside the actors' calls (forward, reading, conversion)
    # Until the first actor had its model loaded and warmed up: actor process, imports, model
    # load, one warm-up batch; a fixed cost, whatever the data size. The rest is steady state,
    # which also carries the later actors' start-up when there are several (conservative).
    startup_seconds: float = 0.0
    nodes: set[str] = field(default_factory=set)  # Ray node ids the actors ran on

    @property
    def steady_seconds(self) -> float:
        return self.seconds - self.startup_seconds


class ShardBuffers:
    """Encoded rows, arriving in any order, gathered per shard until the shard is complete."""

    def __init__(self, todo: list[Shard], specs: Mapping[str, dict], shard_size: int) -> None:
        self.shards = {(s.split, s.index): s for s in todo}
        self.specs = {name: spec for name, spec in specs.items() if name != "labels"}
        self.shard_size = shard_size
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.seen: dict[str, np.ndarray] = {}

    def add(self, batch: Mapping[str, np.ndarray]) -> list[tuple[Shard, dict[str, np.ndarray]]]:
        """Place a batch of rows; return the shards it completed, with their arrays."""
        done = []
        for split_id in np.unique(batch["split"]):
            rows = np.flatnonzero(batch["split"] == split_id)
            split = SPLITS[int(split_id)]
            for shard_index in np.unique(batch["index"][rows] // self.shard_size):
                shard = self.shards[(split, int(shard_index))]
                mine = rows[batch["index"][rows] // self.shard_size == shard_index]
                if shard.name not in self.arrays:
                    self.arrays[shard.name] = {
                        name: np.empty((shard.count, *spec["shape"]), np.dtype(spec["dtype"]))
                        for name, spec in self.specs.items()}
                    self.seen[shard.name] = np.zeros(shard.count, bool)
                at = batch["index"][mine] - shard.start
                for name, buffer in self.arrays[shard.name].items():
                    buffer[at] = batch[name][mine]
                self.seen[shard.name][at] = True  # a mask, so a retried block cannot overfill
                if self.seen[shard.name].all():
                    del self.seen[shard.name]
                    done.append((shard, self.arrays.pop(shard.name)))
        return done


def encode_in_process(batches: list[dict[str, Any]], actor_kwargs: dict[str, Any]
                      ) -> Iterator[dict[str, np.ndarray]]:
    """The actor pool's output, computed by one EncodeBatches in this process, batch by
    batch in order; the process's torch thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    # The encoder moves its tokenizer's model to its device and into eval mode. An actor's
    # arrives as its own copy; here it would be the stage's handle, which its decode check
    # then used on the CPU against a model left on the GPU (every single-GPU run failed).
    handle = copy.copy(actor_kwargs["tokenizer"])
    handle.model = copy.deepcopy(handle.model)
    try:
        encoder = EncodeBatches(**{**actor_kwargs, "tokenizer": handle})
        for item in batches:
            yield encoder({k: np.asarray([v]) for k, v in item.items()})
    finally:
        torch.set_num_threads(threads)


def cache_shards(todo: list[Shard], work: Path, labels: Mapping[str, np.ndarray],
                 specs: Mapping[str, dict], cfg: CacheConfig, compute: ComputeConfig,
                 actor_kwargs: dict[str, Any], records: dict[str, dict],
                 readers: list[SplitReader] | None = None) -> EncodeStats:
    """Encode the shards in `todo` and commit each one as soon as it is complete: on Ray when
    `compute` asks for several workers or a cluster, else in this process.

    With `readers` the driver reads each batch's images and ships them to the actors (blocks
    in the object store); without, the actors read the prepared shards themselves.
    """
    stats = EncodeStats()
    if not todo:
        return stats
    total = len(records) + len(todo)
    buffers = ShardBuffers(todo, specs, cfg.shard_size)
    on_ray = use_ray(compute)
    if on_ray:
        start_ray_data(compute)  # before the clock: throughput excludes Ray's own start
    # Wall clock, not perf_counter: it is compared with the actors' `ready_at` (same clock on
    # one machine; NTP-close on a cluster).
    started = time.time()
    first_ready = float("inf")
    batches: list[dict[str, Any]] = encoder_batches(todo, cfg.batch_size)
    if readers is not None:
        for item in batches:
            item["images"] = readers[item["split"]].read(item["start"], item["stop"]).tobytes()
    results = (map_on_actor_pool(batches, EncodeBatches, actor_kwargs, compute) if on_ray
               else encode_in_process(batches, actor_kwargs))
    for batch in results:
        stats.nodes.update(str(n) for n in np.unique(batch["node"]) if n)
        stats.encoder_seconds += float(batch["encoder_seconds"].sum())
        stats.call_seconds += float(batch["call_seconds"].sum())
        first_ready = min(first_ready, float(batch["ready_at"].min()))
        for shard, arrays in buffers.add(batch):
            arrays["labels"] = np.asarray(labels[shard.split][shard.start:shard.stop], np.int64)
            records[shard.name] = _commit_shard(work, shard, arrays)
            stats.images += shard.count
            log.info("cache: committed %s (%d images), %d of %d shards done", shard.name,
                     shard.count, len(records), total)
    stats.seconds = time.time() - started
    stats.startup_seconds = min(max(first_ready - started, 0.0), stats.seconds)
    missing = [s.name for s in todo if s.name not in records]
    if missing:
        raise RuntimeError(f"Ray Data returned only part of the rows of shards {missing}")
    return stats


# --------------------------------------------------------------------------------------------
# Verification, manifest, the stage
# --------------------------------------------------------------------------------------------


def verify_decoding(cache: Cache, handle: Any, prepared: Prepared, samples: int) -> float:
    """Max |decode(cached) - decode(fresh encoding)| in [-1, 1] pixels; DataError above tolerance.

    Checks `samples` images spread evenly over the train split (val if train is empty), so a
    shard written at the wrong place shows up too. kl: the cached mean against the fresh mean;
    fsq/vq: the cached codes mapped to latents against the fresh latents (a token rounded to a
    neighbouring code on a level boundary is not a mismatch; see below).
    """
    import torch

    from latentforge.tasks.judge import images_to_tensor

    split = "train" if cache.count("train") else "val"
    n = cache.count(split)
    if samples == 0 or n == 0:
        return 0.0
    rows = np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(np.int64))
    reader = SplitReader(prepared.root, prepared.manifest["splits"][split]["shards"])
    x = images_to_tensor(np.concatenate([reader.read(int(i), int(i) + 1) for i in rows]))
    cached = cache.take(split, rows)
    model = handle.model
    views = [("", x), ("hflip_", x.flip(-1))] if cache.manifest["hflip"] else [("", x)]
    worst, flips = 0.0, 0
    with torch.no_grad():
        for view, images in views:
            fresh = model.encode(images)
            if cache.kind == "moments":
                z_cached, z_fresh = torch.from_numpy(cached[f"{view}mean"]), fresh.mean
            else:
                codes = torch.from_numpy(cached[f"{view}codes"].astype(np.int64))
                z_cached = model.codes_to_latents(codes)
                # A value on a level boundary may round the other way when another batch shape
                # or CPU picks other kernels: a few isolated tokens, never most of a row (which
                # is what a misplaced shard looks like). Compare the rest of such rows.
                differs = codes != fresh.codes.long()
                isolated = differs & (differs.sum(1, keepdim=True) <= max(1, codes.shape[1] // 8))
                flips += int(isolated.sum())
                z_fresh = torch.where(isolated.unsqueeze(-1), z_cached, fresh.latents)
            diff = model.decode(z_cached).clamp(-1, 1) - model.decode(z_fresh).clamp(-1, 1)
            worst = max(worst, float(diff.abs().max()))
    if not worst <= VERIFY_TOLERANCE:
        raise DataError(f"{cache.root}: decoding cached latents differs from decoding fresh "
                        f"encodings by up to {worst:.4g} (tolerance {VERIFY_TOLERANCE}) on "
                        f"{len(rows)} {split} images; the cache does not match its tokenizer "
                        f"or data. Remove {cache.root} and rerun the cache stage")
    if flips:
        log.info("decode check: %d isolated token(s) rounded to a neighbouring code (values on a "
                 "level boundary; other kernels round them the other way)", flips)
    return worst


def build_manifest(key: str, handle: Any, prepared: Prepared, cfg: CacheConfig, kind: str,
                   specs: dict[str, dict], plan: list[Shard],
                   records: Mapping[str, dict]) -> dict[str, Any]:
    model = handle.model
    splits = {}
    for split in SPLITS:
        shards = [records[s.name] for s in plan if s.split == split]
        splits[split] = {"count": sum(r["count"] for r in shards), "shards": shards}
    return {
        "format": FORMAT,
        "key": key,
        "tokenizer_sha256": handle.sha256,
        "prepared_sha256": prepared.manifest_sha256,
        "kind": kind,
        "token_shape": [model.num_tokens, model.token_dim],
        "tokenizer": {"quantizer": model.cfg.quantizer, "layout": model.cfg.layout,
                      "vocab_size": model.vocab_size, "image_size": model.cfg.image_size,
                      "channels": model.cfg.channels},
        "class_names": prepared.class_names,
        "hflip": cfg.hflip,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "arrays": specs,
        "splits": splits,
    }


def _labels(prepared: Prepared, split: str) -> np.ndarray:
    """(N,) int64 labels of a split, without touching the images."""
    shards = prepared.manifest["splits"][split]["shards"]
    parts = [load_array(prepared.root / s["labels"], RERUN_PREPARE) for s in shards]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no copy, and the committed file keeps its identity); copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(params: Params, out_dir: str | Path = paths.CACHE,
        prepared_dir: str | Path = paths.PREPARED, tokenizer_dir: str | Path = paths.TOKENIZER,
        tracker: Tracker | None = None) -> StageResult:
    from latentforge.tasks.tokenizer import load_tokenizer

    cfg, compute = params.cache, params.compute
    tracker = tracker or Tracker()
    prepared = load_prepared(prepared_dir, verify=True)
    handle = load_tokenizer(tokenizer_dir)
    key = cache_key(handle.sha256, prepared.manifest_sha256)
    tracker.log_input("prepared", str(Path(prepared_dir).resolve()), prepared.manifest_sha256,
                      context="cache")
    tracker.log_input("tokenizer", str(Path(tokenizer_dir).resolve()), handle.sha256,
                      context="cache")
    model = handle.model
    kind = "codes" if model.is_discrete else "moments"
    specs = array_specs(kind, (model.num_tokens, model.token_dim), cfg.hflip)
    plan = plan_shards({s: int(prepared.manifest["splits"][s]["count"]) for s in SPLITS},
                       cfg.shard_size)

    # Everything that changes the bytes of a shard; shards of other settings are not reused.
    work = paths.work_dir("cache", key)
    _open_work_dir(work, {"format": FORMAT, "key": key, "shard_size": cfg.shard_size,
                          "batch_size": cfg.batch_size, "hflip": cfg.hflip,
                          "device": "cuda" if compute.use_gpu else "cpu",
                          "code": paths.code_sha256("cache")})
    records = _committed_shards(work, plan, set(specs))
    todo = [s for s in plan if s.name not in records]
    if records:
        log.info("cache: resuming from %s: %d of %d shards already committed, encoding %d",
                 work, len(records), len(plan), len(todo))
    log.info("cache: encoding %d images in %d shard(s) %s, batch %d",
             sum(s.count for s in todo), len(todo),
             f"with {compute.num_workers} Ray Data actor(s)" if use_ray(compute) else
             "in this process (one worker, no cluster)", cfg.batch_size)
    shards = {s: prepared.manifest["splits"][s]["shards"] for s in SPLITS}
    # On a cluster the actors see none of this machine's files: the images travel with the
    # blocks. On the local instance they map the prepared shards themselves (no copies).
    ship = on_cluster(compute)
    actor_kwargs = {
        "tokenizer": handle, "image_shape": (model.cfg.image_size, model.cfg.image_size,
                                             model.cfg.channels),
        "prepared": None if ship else {"dir": str(prepared.root.resolve()), "shards": shards},
        "threads": compute.cpus_per_worker, "use_gpu": compute.use_gpu, "hflip": cfg.hflip,
        "batch_size": cfg.batch_size}
    labels = {s: _labels(prepared, s) for s in SPLITS}
    readers = [SplitReader(prepared.root, shards[s]) for s in SPLITS] if ship else None
    stats = cache_shards(todo, work, labels, specs, cfg, compute, actor_kwargs, records, readers)
    nodes = record_nodes(tracker, "cache", stats.nodes)

    manifest = build_manifest(key, handle, prepared, cfg, kind, specs, plan, records)
    out_dir = Path(out_dir)
    with storage.atomic_dir(out_dir) as tmp:
        for record in records.values():
            for entry in record["files"].values():
                _link_or_copy(work / entry["file"], tmp / entry["file"])
        manifest_sha = storage.write_bytes_atomic(
            tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        # Before the swap: a cache that fails the check never replaces a good one.
        max_diff = verify_decoding(load_cache(tmp, handle.sha256, prepared.manifest_sha256),
                                   handle, prepared, cfg.verify_samples)
    shutil.rmtree(work, ignore_errors=True)
    # By content (the manifest lists every shard's sha256), as the generator looks it up: the
    # same key (tokenizer + data) encoded anew, with other code or settings, is another cache.
    tracker.log_output("cache", out_dir / MANIFEST, manifest_sha, profile={"key": key})

    timings = {"cache_seconds": stats.seconds, "cache_startup_seconds": stats.startup_seconds,
               "encoder_seconds": stats.encoder_seconds,
               "actor_call_seconds": stats.call_seconds,
               "resumed_shards": float(len(plan) - len(todo))}
    if stats.images:
        timings["cache_images_per_s"] = stats.images / stats.seconds
        timings["cache_steady_images_per_s"] = stats.images / max(stats.steady_seconds, 1e-9)
        # Actor time is wall time x actors. Outside the forward pass: reading and conversion
        # inside the calls, and outside the calls Ray Data's start-up (actor processes, torch
        # import, model load), scheduling and transfers. The steady share leaves out start-up.
        actor_seconds = stats.seconds * compute.num_workers
        steady_actor_seconds = max(stats.steady_seconds, 1e-9) * compute.num_workers
        timings["outside_encoder_share"] = max(0.0, 1.0 - stats.encoder_seconds / actor_seconds)
        timings["outside_calls_share"] = max(0.0, 1.0 - stats.call_seconds / actor_seconds)
        timings["steady_outside_encoder_share"] = max(
            0.0, 1.0 - stats.encoder_seconds / steady_actor_seconds)
        timings["steady_outside_calls_share"] = max(
            0.0, 1.0 - stats.call_seconds / steady_actor_seconds)
        log.info("cache: %d images in %.1f s = %.0f images/s with %d actor(s): %.1f s start-up "
                 "(actor process, imports, model load, warm-up), then %.0f images/s steady; "
                 "outside the encoder forward: %.0f%% of actor time, %.0f%% after start-up",
                 stats.images, stats.seconds, timings["cache_images_per_s"],
                 compute.num_workers, stats.startup_seconds,
                 timings["cache_steady_images_per_s"], 100 * timings["outside_encoder_share"],
                 100 * timings["steady_outside_encoder_share"])
    counts = {s: manifest["splits"][s]["count"] for s in SPLITS}
    k, d = manifest["token_shape"]
    log.info("cache: %d train / %d val images as %s of %d x %d tokens -> %s (decode check: max "
             "abs diff %.2g)", counts["train"], counts["val"], kind, k, d, out_dir, max_diff)
    metrics = {"train_images": counts["train"], "val_images": counts["val"], "num_tokens": k,
               "token_dim": d, "shards": len(plan), "codes": int(kind == "codes"),
               "hflip": int(cfg.hflip),
               # Rounded: the exact float depends on the CPU's kernels, DVC metrics must not.
               "verify_max_abs_diff": round(max_diff, 4)}
    summary = (f"**{counts['train']}** train / **{counts['val']}** val images cached as {kind} "
               f"({k} x {d} tokens, {model.cfg.quantizer} {model.cfg.layout} tokenizer "
               f"`{handle.sha256[:16]}`) in {len(plan)} shard(s); cache key `{key[:16]}`; "
               f"decoding cached vs fresh latents: max abs diff {max_diff:.2g}"
               + (f"; encoded on Ray node(s) {', '.join(n[:12] for n in nodes)}" if nodes else ""))
    return StageResult(metrics=metrics, summary=summary, digests={"cache": manifest_sha},
                       timings=timings)


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
