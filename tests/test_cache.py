"""The cache stage on the tiny preset: what it stores, the loader's checks, the decode check,
resume after SIGKILL, and in-process against 2 Ray Data actors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_rounding_close, rounding_tolerance

from latentforge import paths
from latentforge.config import Params, build_params, load_params
from latentforge.data import load_prepared
from latentforge.errors import DataError
from latentforge.tasks import cache, judge, prepare, tokenizer

REPO = Path(__file__).resolve().parents[1]
FSQ = {"quantizer": "fsq", "token_dim": 3, "fsq_levels": [5, 4, 3]}
BINARY = {"quantizer": "binary", "token_dim": 5}


def tiny(tokenizer_overrides: dict | None = None, **sections: dict) -> Params:
    """presets/tiny.yaml with 4-step judge and tokenizer (caching needs weights, not quality),
    64-image cache shards (7 for 400 images) and 16-image encoder batches."""
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    raw["judge"].update(steps=4, save_every=4)
    raw["tokenizer"].update(steps=4, save_every=4, warmup_steps=1, **(tokenizer_overrides or {}))
    raw["cache"].update(shard_size=64, batch_size=16)
    for name, values in sections.items():
        raw[name].update(values)
    return build_params(raw)


def run_cache(root: Path, out: Path, tok: str = "kl", **sections: dict) -> cache.StageResult:
    return cache.run(tiny(**sections), out_dir=out, prepared_dir=root / "prepared",
                     tokenizer_dir=root / f"tok_{tok}")


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, ray_local):  # noqa: F811
    """prepare + judge + a kl, an fsq and a binary tokenizer, then the kl cache (1 actor),
    once."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # checkpoints and the cache's scratch folder go under .latentforge/ here
        params = tiny()
        prepare.run(params.prepare, out_dir=root / "prepared")
        judge.run(params, out_dir=root / "judge", prepared_dir=root / "prepared")
        for name, overrides in (("kl", {}), ("fsq", FSQ), ("binary", BINARY)):
            tokenizer.run(tiny(overrides), out_dir=root / f"tok_{name}",
                          prepared_dir=root / "prepared", judge_dir=root / "judge",
                          plot_file=root / "prefix.csv")
        result = run_cache(root, root / "cache_kl")
    (root / "cache_kl_result.json").write_text(json.dumps(
        {"metrics": result.metrics, "timings": result.timings}))
    return root


def test_a_judge_rerun_on_finished_checkpoints_says_nothing_was_trained(tiny_root,
                                                                        monkeypatch):
    """Its summary said "0 images/s" (`stage judge --force` with the checkpoints there)."""
    monkeypatch.chdir(tiny_root)  # where the fixture's judge checkpoints are
    again = judge.run(tiny(), out_dir=tiny_root / "judge_again",
                      prepared_dir=tiny_root / "prepared")
    assert "from finished checkpoints: nothing trained)" in again.summary, again.summary
    assert "images/s" not in again.summary


def test_kl_cache_stores_posterior_moments_labels_and_a_manifest(tiny_root):
    result = json.loads((tiny_root / "cache_kl_result.json").read_text())
    c = cache.load_cache(tiny_root / "cache_kl", verify=True)
    handle = tokenizer.load_tokenizer(tiny_root / "tok_kl")
    prepared = load_prepared(tiny_root / "prepared")
    assert c.kind == "moments" and c.token_shape == (8, 4)
    assert c.key == cache.cache_key(handle.sha256, prepared.manifest_sha256)
    assert c.manifest["tokenizer"]["quantizer"] == "kl" and c.manifest["tokenizer"]["layout"] == "1d"
    assert [len(c.manifest["splits"][s]["shards"]) for s in ("train", "val")] == [6, 1]
    for split in ("train", "val"):
        arrays = c.split(split)
        images, labels = prepared.split(split)
        assert set(arrays) == {"labels", "mean", "logvar"}
        assert arrays["mean"].dtype == arrays["logvar"].dtype == np.float32
        assert arrays["mean"].shape == (len(images), 8, 4) and arrays["labels"].dtype == np.int64
        np.testing.assert_array_equal(arrays["labels"], labels)
        fresh = handle.encode(np.asarray(images))
        # Encoded on an actor in batches of the cache's size, fresh here in one batch: equal up
        # to the rounding of other kernels.
        for key in ("mean", "logvar"):
            assert_rounding_close(arrays[key], fresh[key], what=f"cached and fresh {key}")
    assert isinstance(c.shards("train").__next__()["mean"], np.memmap)
    assert result["metrics"] == {"train_images": 360, "val_images": 40, "num_tokens": 8,
                                 "token_dim": 4, "shards": 7, "codes": 0, "hflip": 0,
                                 "verify_max_abs_diff": 0.0}
    t = result["timings"]
    assert t["cache_images_per_s"] > 0 and 0 <= t["outside_encoder_share"] <= 1
    # Start-up (actor process, torch import, model load, warm-up) is split from steady state.
    assert 0 < t["cache_startup_seconds"] < t["cache_seconds"]
    assert t["cache_steady_images_per_s"] > t["cache_images_per_s"]
    assert 0 <= t["steady_outside_encoder_share"] <= t["outside_encoder_share"]
    # Calls hold the forward pass and more: less of the time is outside them than outside it.
    assert 0 <= t["steady_outside_calls_share"] <= t["steady_outside_encoder_share"]
    assert t["resumed_shards"] == 0
    assert not (tiny_root / paths.work_dir("cache", c.key)).exists()  # scratch removed


def test_draw_latents_gives_fresh_samples_with_the_cached_moments(tiny_root):
    arrays = cache.load_cache(tiny_root / "cache_kl").split("val")
    one = {k: np.repeat(arrays[k][:2], 5000, axis=0) for k in ("mean", "logvar")}
    std = np.exp(0.5 * one["logvar"])
    for rng in (np.random.default_rng(0), torch.Generator().manual_seed(0)):
        first, second = (np.asarray(cache.draw_latents(one, rng)) for _ in range(2))
        assert first.dtype == np.float32 and first.shape == one["mean"].shape
        assert not np.array_equal(first, second)  # each epoch draws anew
        eps = (first - one["mean"]) / std
        assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02
    with pytest.raises(ValueError, match="codes_to_latents"):
        cache.draw_latents({"codes": np.zeros((2, 8), np.int32)}, np.random.default_rng(0))


def test_load_cache_refuses_latents_of_another_tokenizer(tiny_root):
    folder = tiny_root / "cache_kl"
    mine = cache.load_cache(folder).tokenizer_sha256
    other = tokenizer.load_tokenizer(tiny_root / "tok_fsq").sha256
    assert cache.load_cache(folder, tokenizer_sha256=mine).tokenizer_sha256 == mine
    with pytest.raises(DataError) as info:
        cache.load_cache(folder, tokenizer_sha256=other)
    message = str(info.value)
    for part in (mine, other, str(folder), "rerun the cache stage"):
        assert part in message
    with pytest.raises(DataError, match="run the cache stage first"):
        cache.load_cache(tiny_root / "nowhere")


def test_corrupted_shard_is_caught_by_sha256_verification(tiny_root, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(tiny_root / "cache_kl", folder)
    shard = folder / "train-00002.mean.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # one bit of one float: the header still parses
    shard.write_bytes(bytes(data))
    cache.load_cache(folder)  # without verify the damage goes unnoticed
    with pytest.raises(DataError, match=r"train-00002.mean.npy: sha256 \w+\.\.\. is not the "
                                        r"\w+\.\.\. its manifest recorded: the file changed "
                                        r"after its stage wrote it; rerun the cache stage"):
        cache.load_cache(folder, verify=True)


def test_the_stages_refuse_data_changed_in_place(tiny_root, tmp_path, monkeypatch):
    """A shard changed after prepare wrote it (a damaged disk, an edit) was trained on, and
    MLflow recorded the manifest's digest as the data: every stage now checks what it reads."""
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_root / "prepared", prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps({**manifest, "splits": {}}))
    with pytest.raises(DataError, match=r"prepared/manifest\.json: has no 'train' .*rerun the "
                                        r"prepare stage"):
        load_prepared(prepared).split("train")
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    images = sorted(prepared.glob("train-*.images.npy"))[0]
    data = bytearray(images.read_bytes())
    data[-100:] = bytes(100)  # the header still parses, the file keeps its size
    images.write_bytes(bytes(data))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"{images.name}: sha256 .* its manifest recorded: the "
                                        r"file changed after its stage wrote it; rerun the "
                                        r"prepare stage"):
        judge.run(tiny(), out_dir=tmp_path / "judge", prepared_dir=prepared)
    assert not (tmp_path / "judge").exists()


def test_a_cut_or_garbled_cache_or_prepared_file_is_a_data_error_naming_it(tiny_root, tmp_path):
    """A disk that filled, a copy cut short: numpy's "mmap length is greater than file size"
    names neither the file nor the stage that writes it; the error here does both."""
    folder = tmp_path / "cache"
    shutil.copytree(tiny_root / "cache_kl", folder)
    shard = folder / "train-00000.mean.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    c = cache.load_cache(folder)
    with pytest.raises(DataError, match=r"train-00000\.mean\.npy: truncated .*rerun the cache "
                                        r"stage"):
        c.split("train")
    (folder / "manifest.json").write_text('{"format": ')
    with pytest.raises(DataError, match=r"cache/manifest\.json: garbled"):
        cache.load_cache(folder)

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_root / "prepared", prepared)
    images = sorted(prepared.glob("train-*.images.npy"))[0]
    images.write_bytes(images.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{images.name}: truncated .*rerun the prepare stage"):
        load_prepared(prepared).split("train")
    images.unlink()
    with pytest.raises(DataError, match=rf"{images.name}: missing; rerun the prepare stage"):
        load_prepared(prepared).split("train")


def test_decode_check_catches_latents_that_do_not_match_the_images(tiny_root, tmp_path):
    handle = tokenizer.load_tokenizer(tiny_root / "tok_kl")
    prepared = load_prepared(tiny_root / "prepared")
    assert cache.verify_decoding(cache.load_cache(tiny_root / "cache_kl"), handle, prepared,
                                 samples=64) <= 1e-4
    folder = tmp_path / "cache"
    shutil.copytree(tiny_root / "cache_kl", folder)
    mean = np.load(folder / "train-00001.mean.npy")
    # Far-off latents: a 4-step decoder barely tells one image's latents from another's.
    noise = np.random.default_rng(0).standard_normal(mean.shape).astype(np.float32)
    np.save(folder / "train-00001.mean.npy", mean + 10 * noise)
    with pytest.raises(DataError, match="differs from decoding fresh encodings"):
        cache.verify_decoding(cache.load_cache(folder), handle, prepared, samples=64)


def test_decode_check_tolerates_isolated_boundary_flips_but_not_wrong_rows(
        tiny_root, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    run_cache(tiny_root, tmp_path / "cache", tok="fsq")
    handle = tokenizer.load_tokenizer(tiny_root / "tok_fsq")
    prepared = load_prepared(tiny_root / "prepared")
    quantizer = handle.model.quantizer

    def move(tokens: slice) -> Path:
        """A copy of the cache whose `tokens` of every row hold a neighbouring FSQ code (one
        level up or down in the first dimension), as another CPU's rounding would give."""
        folder = tmp_path / f"moved-{tokens.start}-{tokens.stop}"
        shutil.copytree(tmp_path / "cache", folder)
        for file in folder.glob("*.codes.npy"):
            codes = torch.from_numpy(np.load(file).astype(np.int64))
            digits = quantizer.codes_to_digits(codes)
            first = digits[:, tokens, 0]
            digits[:, tokens, 0] = torch.where(first < quantizer.levels[0] - 1, first + 1,
                                               first - 1)
            np.save(file, quantizer.digits_to_codes(digits).numpy().astype(np.int32))
        return folder

    with caplog.at_level(logging.INFO, logger="latentforge.tasks.cache"):
        worst = cache.verify_decoding(cache.load_cache(move(slice(0, 1))), handle, prepared,
                                      samples=64)
    assert worst <= 1e-5  # the moved token is not held against the cache...
    assert "64 isolated token(s) rounded to a neighbouring code" in caplog.text  # ...but told
    # Codes that differ in most tokens (other images, another model) are not rounding: they
    # are compared whole, and fail the check.
    folder = tmp_path / "misplaced"
    shutil.copytree(tmp_path / "cache", folder)
    rng = np.random.default_rng(0)
    for file in folder.glob("*.codes.npy"):
        codes = np.load(file)
        np.save(file, rng.integers(0, quantizer.vocab_size, codes.shape).astype(np.int32))
    with pytest.raises(DataError, match="differs from decoding fresh encodings"):
        cache.verify_decoding(cache.load_cache(folder), handle, prepared, samples=64)


def encode_with_ambiguity(handle, images: np.ndarray) -> tuple[dict, np.ndarray]:
    """`handle.encode(images)` and, per token, whether any FSQ value before rounding lies within
    kernel rounding of a level boundary (x.5), where another kernel may round the other way."""
    quantizer = handle.model.quantizer
    bounded: list[torch.Tensor] = []
    hook = quantizer.register_forward_hook(
        lambda module, args, out: bounded.append(module._bound(args[0]).detach()))
    try:
        fresh = handle.encode(images)
    finally:
        hook.remove()
    values = torch.cat(bounded).numpy()
    margin = np.abs(values - np.floor(values) - 0.5)  # distance to the nearest boundary
    return fresh, (margin <= rounding_tolerance(values)).any(-1)


def test_fsq_cache_stores_codes_and_flipped_views(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cache(tiny_root, tmp_path / "cache", tok="fsq", cache={"hflip": True})
    c = cache.load_cache(tmp_path / "cache", verify=True)
    assert c.kind == "codes" and c.token_shape == (8, 3) and c.manifest["hflip"]
    assert result.metrics["codes"] == 1 and result.metrics["verify_max_abs_diff"] == 0.0
    arrays = c.split("train")
    assert set(arrays) == {"labels", "codes", "hflip_codes"}
    assert arrays["codes"].dtype == np.int32 and arrays["codes"].shape == (360, 8)
    handle = tokenizer.load_tokenizer(tiny_root / "tok_fsq")
    images, _ = load_prepared(tiny_root / "prepared").split("train")
    for key, view in (("codes", images), ("hflip_codes", images[:, :, ::-1])):
        fresh, ambiguous = encode_with_ambiguity(handle, np.ascontiguousarray(view))
        # Other batch shapes may round a value that sits on a level boundary the other way; a
        # code may differ only there.
        differs = arrays[key] != fresh["codes"]
        assert not (differs & ~ambiguous).any(), f"{key}: codes differ away from a boundary"
        latents = handle.model.codes_to_latents(torch.as_tensor(arrays[key], dtype=torch.long))
        same = ~differs
        np.testing.assert_allclose(latents.numpy()[same], fresh["latents"][same], atol=1e-6)
    # The generator trains on both views: the flips are rows of their own, same labels.
    from latentforge.tasks.generator import latent_statistics, training_arrays

    for kind in ("maskgit", "flow"):
        data = training_arrays(c, handle, kind)
        assert set(data) == {"labels", "codes" if kind == "maskgit" else "latents"}
        np.testing.assert_array_equal(data["labels"], np.tile(arrays["labels"], 2))
    codes = training_arrays(c, handle, "maskgit")["codes"]
    np.testing.assert_array_equal(codes, np.concatenate([arrays["codes"], arrays["hflip_codes"]]))
    flipped = handle.model.codes_to_latents(torch.as_tensor(arrays["hflip_codes"],
                                                            dtype=torch.long)).numpy()
    np.testing.assert_allclose(data["latents"][360:], flipped, atol=1e-6)
    assert latent_statistics(data)[0].shape == (3,)


def test_binary_cache_stores_bit_pattern_codes(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cache(tiny_root, tmp_path / "cache", tok="binary")
    c = cache.load_cache(tmp_path / "cache", verify=True)
    assert c.kind == "codes" and c.token_shape == (8, 5)
    assert c.manifest["tokenizer"]["quantizer"] == "binary"
    assert c.manifest["tokenizer"]["vocab_size"] == 32
    assert result.metrics["codes"] == 1 and result.metrics["verify_max_abs_diff"] == 0.0
    arrays = c.split("train")
    assert arrays["codes"].dtype == np.int32 and arrays["codes"].shape == (360, 8)
    assert arrays["codes"].min() >= 0 and arrays["codes"].max() < 32
    handle = tokenizer.load_tokenizer(tiny_root / "tok_binary")
    images, _ = load_prepared(tiny_root / "prepared").split("train")
    quantizer = handle.model.quantizer
    inputs: list[torch.Tensor] = []
    hook = quantizer.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    try:
        fresh = handle.encode(np.asarray(images))
    finally:
        hook.remove()
    # A sign within kernel rounding of 0 may come out the other way in another batch shape.
    z = torch.cat(inputs).float().numpy()
    ambiguous = (np.abs(z) <= rounding_tolerance(z)).any(-1)
    differs = arrays["codes"] != fresh["codes"]
    assert not (differs & ~ambiguous).any(), "codes differ away from a sign change"
    latents = handle.model.codes_to_latents(torch.as_tensor(arrays["codes"], dtype=torch.long))
    np.testing.assert_array_equal(latents.numpy()[~differs], fresh["latents"][~differs])


def test_shard_buffers_gather_rows_arriving_in_any_order():
    plan = cache.plan_shards({"train": 10, "val": 3}, shard_size=4)
    assert [(s.name, s.start, s.stop) for s in plan] == [
        ("train-00000", 0, 4), ("train-00001", 4, 8), ("train-00002", 8, 10), ("val-00000", 0, 3)]
    batches = cache.encoder_batches(plan, batch_size=3)
    assert [(b["start"], b["stop"]) for b in batches[:4]] == [(0, 3), (3, 4), (4, 7), (7, 8)]
    specs = cache.array_specs("codes", (2, 1), hflip=False)
    buffers = cache.ShardBuffers(plan, specs, shard_size=4)
    split = np.array([0] * 10 + [1] * 3, np.int8)
    index = np.r_[np.arange(10), np.arange(3)]
    order = np.random.default_rng(0).permutation(13)
    done = []
    for part in np.array_split(order, 5):
        rows = {"split": split[part], "index": index[part],
                "codes": np.stack([index[part], split[part]], 1).astype(np.int32)}
        done += buffers.add(rows)
    assert sorted(s.name for s, _ in done) == [s.name for s in plan]
    for shard, arrays in done:
        np.testing.assert_array_equal(arrays["codes"][:, 0], np.arange(shard.start, shard.stop))
        assert (arrays["codes"][:, 1] == (shard.split == "val")).all()


def assert_same_cache(a: Path, b: Path) -> None:
    """The same files, labels, codes and manifest (less the float arrays' sha256s), and
    float arrays equal to rounding: another process may pick other kernels (tests/numerics)."""
    files_a, files_b = read_folder(a), read_folder(b)
    assert files_a.keys() == files_b.keys()
    floats = [n for n in files_a if n.endswith((".mean.npy", ".logvar.npy"))]
    for name in files_a:
        if name in floats:
            assert_rounding_close(np.load(a / name), np.load(b / name))
        elif name != cache.MANIFEST:
            assert files_a[name] == files_b[name], name

    def without_float_digests(manifest: dict) -> str:
        text = json.dumps(manifest, sort_keys=True)
        for name in floats:
            for folder in (a, b):
                text = text.replace(hashlib.sha256((folder / name).read_bytes()).hexdigest(), "")
        return text

    assert without_float_digests(json.loads(files_a[cache.MANIFEST])) == \
        without_float_digests(json.loads(files_b[cache.MANIFEST]))


def test_ray_actors_write_the_same_cache_as_the_in_process_encoder(tiny_root, tmp_path,
                                                                   monkeypatch, caplog):
    # The module's cache_kl was encoded in this process (one worker, no cluster: no Ray).
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="latentforge.tasks.cache"):
        run_cache(tiny_root, tmp_path / "cache", compute={"num_workers": 2})
    assert "with 2 Ray Data actor(s)" in caplog.text
    assert_same_cache(tmp_path / "cache", tiny_root / "cache_kl")


def test_one_worker_encodes_in_process_without_ray_data(tiny_root, tmp_path, monkeypatch,
                                                        caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cache, "map_on_actor_pool", None)  # calling it would raise
    monkeypatch.setattr(cache, "start_ray_data", None)
    with caplog.at_level(logging.INFO, logger="latentforge.tasks.cache"):
        run_cache(tiny_root, tmp_path / "cache")
    assert "in this process (one worker, no cluster)" in caplog.text
    # Same process, same batches and threads as the module's run: the same bytes.
    assert read_folder(tmp_path / "cache") == read_folder(tiny_root / "cache_kl")


KILL_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from latentforge.config import build_params
    from latentforge.tasks import cache

    commit = cache._commit_shard

    def slow_commit(*args, **kwargs):
        record = commit(*args, **kwargs)
        time.sleep(0.5)  # slow enough to be killed between two shards
        return record

    cache._commit_shard = slow_commit
    params = build_params(json.loads(sys.argv[1]))
    cache.run(params, out_dir=sys.argv[2], prepared_dir=sys.argv[3], tokenizer_dir=sys.argv[4])
''')


def test_rerun_after_sigkill_keeps_committed_shards_and_matches_an_uninterrupted_run(
        tiny_root, tmp_path, monkeypatch, caplog, ray_local):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    handle = tokenizer.load_tokenizer(tiny_root / "tok_kl")
    key = cache.cache_key(handle.sha256, load_prepared(tiny_root / "prepared").manifest_sha256)
    work = tmp_path / paths.work_dir("cache", key)
    # The victim joins the test's Ray instance as a second driver (no second `ray.init`).
    raw = tiny(compute={"ray_address": ray_local.get_runtime_context().gcs_address}).to_dict()
    script = tmp_path / "cache_victim.py"
    script.write_text(KILL_SCRIPT)
    with open(tmp_path / "victim.log", "wb") as out:
        victim = subprocess.Popen(
            [sys.executable, str(script), json.dumps(raw), str(tmp_path / "cache"),
             str(tiny_root / "prepared"), str(tiny_root / "tok_kl")],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            # The session's instance listens on loopback only (raycluster.loopback_only): a
            # second driver finds its node there only with Ray's single-machine switch.
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        try:
            deadline = time.monotonic() + 90
            while not list(work.glob("train-*.json")):
                assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard committed within 90 s"
                time.sleep(0.02)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
        finally:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "cache").exists()
    committed = {p.stem for p in work.glob("*-*.json")}
    kept = {f: (work / f).stat() for shard in committed
            for f in (f"{shard}.mean.npy", f"{shard}.logvar.npy", f"{shard}.labels.npy")}
    assert 1 <= len(committed) < 7

    with caplog.at_level(logging.INFO, logger="latentforge.tasks.cache"):
        result = run_cache(tiny_root, tmp_path / "cache")
    assert f"{len(committed)} of 7 shards already committed" in caplog.text
    assert result.timings["resumed_shards"] == len(committed)
    for name, before in kept.items():  # the very files the victim wrote, not re-encoded ones
        after = (tmp_path / "cache" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    # The victim's shards came from a Ray actor, the rest from this process.
    assert_same_cache(tmp_path / "cache", tiny_root / "cache_kl")
    assert not work.exists()


def test_a_cache_run_does_not_warn_that_ray_data_bars_are_off(tiny_root, tmp_path, monkeypatch):
    """The stage turns Ray Data's live bars off (it logs per shard); that is not a warning."""
    import ray.util.debug

    monkeypatch.chdir(tmp_path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    progress_log = logging.getLogger("ray.data._internal.progress")
    progress_log.addHandler(handler)
    ray.util.debug._logged.discard("ray_data_progress_manager_disabled")  # Ray warns once
    try:
        run_cache(tiny_root, tmp_path / "cache", compute={"num_workers": 2})  # on Ray Data
    finally:
        progress_log.removeHandler(handler)
    assert not [r.getMessage() for r in records if "disabled" in r.getMessage()]


def test_in_process_encoding_leaves_the_stages_tokenizer_as_it_was(tiny_root, tmp_path):
    """The encoder works on its own copy of the model: moving the caller's to its device (a
    GPU) or into eval mode in place broke the caller's decode check after it."""
    from latentforge.tasks.tokenizer import load_tokenizer

    handle = load_tokenizer(tiny_root / "tok_kl")
    handle.model.train()
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    prepared = load_prepared(tiny_root / "prepared")
    n = prepared.manifest["splits"]["train"]["count"]
    kwargs = {"tokenizer": handle, "image_shape": (8, 8, 1), "threads": 1, "use_gpu": False,
              "hflip": False, "batch_size": 4,
              "prepared": {"dir": str(prepared.root),
                           "shards": {s: prepared.manifest["splits"][s]["shards"]
                                      for s in ("train", "val")}}}
    rows = list(cache.encode_in_process([{"split": 0, "start": 0, "stop": min(4, n)}],
                                        kwargs))
    assert len(rows[0]["mean"]) == min(4, n)
    assert handle.model.training
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())


@pytest.mark.gpu
def test_cache_on_one_gpu_in_process(tiny_root, tmp_path, monkeypatch):
    """A single-GPU run (presets/gpu.yaml: one worker, no cluster) encodes in process on the
    GPU, then checks decoding on the CPU handle."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.chdir(tmp_path)
    result = run_cache(tiny_root, tmp_path / "cache", compute={"use_gpu": True})
    assert result.metrics["train_images"] > 0


def test_damaged_scratch_records_are_encoded_again_not_fatal(tmp_path, caplog):
    """A sidecar or plan cut by a crash (the scratch folder outlives a SIGKILL) means "not
    committed": that shard is encoded again, or the folder starts afresh; never a traceback."""
    plan = cache.plan_shards({"train": 4, "val": 2}, 2)
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{plan[0].name}.json").write_text('{"count": 2, "fi')
    with caplog.at_level("WARNING"):
        assert cache._committed_shards(work, plan, {"labels"}) == {}
    assert f"{plan[0].name}.json is damaged" in caplog.text
    (work / cache.PLAN).write_text("{not json")
    cache._open_work_dir(work, {"format": cache.FORMAT})
    assert json.loads((work / cache.PLAN).read_text()) == {"format": cache.FORMAT}
    assert not (work / f"{plan[0].name}.json").exists()
