"""The generator stage on the tiny preset: outputs, metrics, balanced sampling independent of
batching, the cache-key guard, the `latentforge sample` command, and 1D and 2D tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_rounding_close
from PIL import Image

from latentforge.cli import main
from latentforge.config import ComputeConfig, build_params, load_params
from latentforge.errors import ConfigError, DataError
from latentforge.tasks import cache, generator, judge, prepare, tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny(**sections) -> object:
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    for name, values in sections.items():
        raw[name].update(values)
    return build_params(raw)


def build_chain(root: Path, params) -> dict[str, Path]:
    d = {k: root / k for k in ("prepared", "judge", "tok", "cache", "gen")}
    prepare.run(params.prepare, out_dir=d["prepared"])
    judge.run(params, out_dir=d["judge"], prepared_dir=d["prepared"])
    tokenizer.run(params, out_dir=d["tok"], prepared_dir=d["prepared"], judge_dir=d["judge"],
                  plot_file=root / "prefix.csv")
    cache.run(params, out_dir=d["cache"], prepared_dir=d["prepared"], tokenizer_dir=d["tok"])
    return d


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_local):  # Ray started the way every test expects
    root = tmp_path_factory.mktemp("gen")
    import os

    cwd = os.getcwd()
    os.chdir(root)  # checkpoints and Ray scratch under the tmp folder
    try:
        params = tiny()
        d = build_chain(root, params)
        result = generator.run(params, out_dir=d["gen"], cache_dir=d["cache"],
                               tokenizer_dir=d["tok"], evaluator_dir=d["judge"].parent / "evaluator",
                               prepared_dir=d["prepared"])
    finally:
        os.chdir(cwd)
    return d, result


def test_generator_outputs_and_metrics(chain):
    d, result = chain
    assert {p.name for p in d["gen"].iterdir()} == {"model.safetensors", "generator.json",
                                                    "samples.png", "train_curve.csv"}
    for key in ("gfd_eval", "precision", "recall", "eval_accuracy", "is_eval",
                "kid_eval", "kid_eval_std", "real_count", "gfd_eval_at_real_count", "real_fd_eval",
                "gfd_ratio_to_real", "nfe"):
        assert np.isfinite(result.metrics[key]), key
    assert result.metrics["nfe"] == 4  # euler, 4 steps in the tiny preset
    assert result.timings["sampling_images_per_s"] > 0
    meta = json.loads((d["gen"] / "generator.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer.load_tokenizer(d["tok"]).sha256
    assert len(meta["latent_shift"]) == meta["latent_shape"][1]
    grid = Image.open(d["gen"] / "samples.png")
    assert grid.size[1] > grid.size[0] / 2  # one row per class: 10 rows


def test_samples_do_not_depend_on_batching(chain):
    d, _ = chain
    gen = generator.load_generator(d["gen"], d["tok"])
    labels = np.array([0, 1, 2, 3, 4, 5])
    kw = {"seed": 5, "steps": 3, "cfg_scale": 1.5, "sampler": "heun"}
    whole, nfe = gen.sample_latents(labels, batch_size=6, **kw)
    parts, _ = gen.sample_latents(labels, batch_size=4, **kw)
    assert_rounding_close(parts, whole, what="latents sampled in batches of 4 and of 6")
    assert nfe == 5  # heun: 2 * steps - 1
    tail, _ = gen.sample_latents(labels[3:], start_index=3, **kw)
    assert_rounding_close(tail, whole[3:], what="a tail sampled alone and with its head")


def test_generator_refuses_a_cache_of_another_tokenizer(chain, tmp_path, monkeypatch):
    d, _ = chain
    monkeypatch.chdir(tmp_path)
    other = tiny(tokenizer={"seed": 7, "steps": 10})
    tokenizer.run(other, out_dir=tmp_path / "tok2", prepared_dir=d["prepared"],
                  judge_dir=d["judge"], plot_file=tmp_path / "p.csv")
    with pytest.raises(DataError) as err:
        generator.run(other, out_dir=tmp_path / "gen2", cache_dir=d["cache"],
                      tokenizer_dir=tmp_path / "tok2", evaluator_dir=d["judge"].parent / "evaluator",
                      prepared_dir=d["prepared"])
    assert str(d["cache"]) in str(err.value)
    assert not (tmp_path / "gen2").exists()


def test_sample_command_writes_a_grid(chain, tmp_path, monkeypatch, capsys):
    d, _ = chain
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grid.png"
    assert main(["sample", "--class", "3", "--n", "12", "--steps", "3", "--cfg", "2.0",
                 "--model", str(d["gen"]), "--tokenizer", str(d["tok"]), "--out", str(out)]) == 0
    assert "12 samples of class '3'" in capsys.readouterr().out
    assert Image.open(out).size[0] > 100
    assert main(["sample", "--class", "cat", "--model", str(d["gen"]), "--tokenizer",
                 str(d["tok"]), "--out", str(out)]) == 2
    assert "not a class of this generator" in capsys.readouterr().err
    assert main(["sample", "--class", "3", "--model", str(d["gen"]), "--tokenizer",
                 str(d["tok"]), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: a folder; give a file name" in capsys.readouterr().err
    assert main(["sample", "--class", "3", "--model", str(d["gen"]), "--tokenizer",
                 str(d["tok"]), "--out", str(tmp_path / "grid.jpg")]) == 2
    assert "sample writes a PNG (lossless" in capsys.readouterr().err
    assert not (tmp_path / "grid.jpg").exists()


def test_sample_with_a_meta_key_missing_names_the_file_and_the_key(chain, tmp_path, monkeypatch,
                                                                     capsys):
    """A generator.json edited by hand (or of another version) that lacks a key the sampler
    reads is one line naming the file and the key, not a KeyError traceback."""
    d, _ = chain
    monkeypatch.chdir(tmp_path)
    gen = tmp_path / "edited"
    shutil.copytree(d["gen"], gen)
    meta = json.loads((gen / "generator.json").read_text())
    del meta["class_names"]
    (gen / "generator.json").write_text(json.dumps(meta))
    out = tmp_path / "grid.png"
    assert main(["sample", "--class", "3", "--model", str(gen), "--tokenizer", str(d["tok"]),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{gen / 'generator.json'}: has no 'class_names'" in err
    assert "run the generator stage" in err and "Traceback" not in err
    assert not out.exists()


def test_generator_on_a_2d_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny(tokenizer={"layout": "2d", "quantizer": "fsq", "token_dim": 3,
                             "fsq_levels": [5, 4, 3]})
    d = build_chain(tmp_path, params)
    result = generator.run(params, out_dir=d["gen"], cache_dir=d["cache"], tokenizer_dir=d["tok"],
                           evaluator_dir=d["judge"].parent / "evaluator", prepared_dir=d["prepared"])
    meta = json.loads((d["gen"] / "generator.json").read_text())
    assert meta["latent_shape"] == [16, 3]  # 8x8 with 2x2 patches, fsq codes -> latents
    assert np.isfinite(result.metrics["gfd_eval"])


def test_token_generators_train_fine_tune_and_evaluate(tmp_path, monkeypatch, capsys):
    """maskgit and ar over fsq codes through generator, rl (GRPO over tokens) and evaluate, in
    process (test_pipeline's slow test runs the same through `latentforge run`)."""
    from latentforge.tasks import evaluate, rl

    monkeypatch.chdir(tmp_path)
    params = tiny(prepare={"max_images": 200}, tokenizer={"quantizer": "fsq"},
                  generator={"kind": "maskgit"})
    d = build_chain(tmp_path, params)
    for kind in ("maskgit", "ar"):
        params = tiny(prepare={"max_images": 200}, tokenizer={"quantizer": "fsq"},
                      generator={"kind": kind})
        gen, tuned = tmp_path / kind, tmp_path / f"{kind}_rl"
        generator.run(params, out_dir=gen, cache_dir=d["cache"], tokenizer_dir=d["tok"],
                      evaluator_dir=tmp_path / "evaluator", prepared_dir=d["prepared"])
        meta = json.loads((gen / "generator.json").read_text())
        assert meta["kind"] == kind and meta["model"]["vocab_size"] == 8 * 5 * 5 * 5
        tuning = rl.run(params, out_dir=tuned, generator_dir=gen, tokenizer_dir=d["tok"],
                        judge_dir=d["judge"], prepared_dir=d["prepared"],
                        plot_file=tmp_path / f"{kind}_reward.csv",
                        evaluator_dir=tmp_path / "evaluator")
        assert tuning.metrics["updates"] == 3 and tuning.metrics["final_kl"] >= -1e-6
        rl_meta = json.loads((tuned / "generator.json").read_text())
        assert rl_meta["kind"] == kind and rl_meta["rl"]["params"]["token_kl_beta"] > 0
        ev = evaluate.run(params, report_dir=tmp_path / f"{kind}_report",
                          prepared_dir=d["prepared"], judge_dir=d["judge"], tokenizer_dir=d["tok"],
                          generator_dir=gen, rl_dir=tuned, plots_dir=tmp_path / f"{kind}_plots",
                          evaluator_dir=tmp_path / "evaluator")
        assert 0 <= ev.metrics["base.eval_accuracy"] <= 1
        assert 0 <= ev.metrics["rl.eval_accuracy"] <= 1
        out = tmp_path / f"{kind}.png"
        assert main(["sample", "--class", "3", "--n", "4", "--model", str(tuned), "--tokenizer",
                     str(d["tok"]), "--decoder", "none", "--out", str(out)]) == 0
        assert f"4 samples of class '3' to {out}" in capsys.readouterr().out
        # the flow ODE's options would be ignored (they were, silently): refused in one line
        assert main(["sample", "--class", "3", "--n", "4", "--model", str(tuned), "--tokenizer",
                     str(d["tok"]), "--decoder", "none", "--steps", "25", "--sampler", "heun",
                     "--out", str(tmp_path / "x.png")]) == 2
        assert (f"error: --steps and --sampler: the flow ODE's; this {kind} generator samples "
                "codes as its generator stage set it") in capsys.readouterr().err
        assert not (tmp_path / "x.png").exists()


def test_a_registered_generator_samples_anywhere_with_its_own_tokenizer(chain, tmp_path,
                                                                        monkeypatch, capsys):
    import mlflow.pyfunc

    from latentforge import tracking
    from latentforge.config import TrackingConfig

    d, _ = chain
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run(TrackingConfig(), "generator", {}, root=store) as tracker:
        uri = tracker.log_model("generator", d["gen"], "test-generator",
                                artifacts={"tokenizer_dir": d["tok"]})
    # Elsewhere: no data/tokenizer folder here, only the MLflow store.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(store))
    out = elsewhere / "grid.png"
    assert main(["sample", "--class", "3", "--n", "8", "--steps", "3", "--model",
                 "models:/test-generator/1", "--out", str(out)]) == 0
    assert "8 samples of class '3'" in capsys.readouterr().out and out.exists()
    # The run's own URI too (`--help` offers it; it was taken for a folder name).
    assert main(["sample", "--class", "3", "--n", "8", "--steps", "3", "--model",
                 f"runs:/{tracker.run_id}/generator", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert "8 samples of class '3'" in capsys.readouterr().out
    # pyfunc samples as the stage did (tiny: 4 euler steps at CFG 1.5) unless params say so.
    pyfunc = mlflow.pyfunc.load_model(uri)
    handle = generator.load_generator(d["gen"], d["tok"])
    assert handle.meta["sample_defaults"] == {"steps": 4, "sampler": "euler", "cfg_scale": 1.5}
    params = {p.name: p.default for p in pyfunc.metadata.get_params_schema().params}
    assert params == {"seed": 0, "steps": 4, "cfg_scale": 1.5, "sampler": "euler"}
    labels = np.array([1, 2])
    np.testing.assert_array_equal(pyfunc.predict(labels), handle.sample_images(
        labels, seed=0, steps=4, cfg_scale=1.5, sampler="euler"))
    chosen = {"seed": 5, "steps": 2, "cfg_scale": 3.0, "sampler": "heun"}
    np.testing.assert_array_equal(pyfunc.predict(labels, params=chosen),
                                  handle.sample_images(labels, **chosen))
    for bad, match in (({"steps": 0}, "steps"), ({"cfg_scale": float("nan")}, "cfg_scale"),
                       ({"sampler": "rk4"}, "sampler"), ({"seed": -1}, "seed")):
        with pytest.raises(Exception, match=match):
            pyfunc.predict(labels, params=bad)
    # labels it has no class for: one line with the classes, not torch's IndexError
    for bad_labels in (np.array([10]), np.array([-1]), np.array([], np.int64)):
        with pytest.raises(ValueError, match=r"expected one or more class labels in \[0, 9\]"):
            pyfunc.predict(bad_labels)


def test_sampling_on_two_ray_data_actors_matches_sampling_in_process(chain, ray_local):
    d, _ = chain
    gen = generator.load_generator(d["gen"], d["tok"])
    labels = np.repeat(np.arange(10), 30)  # 300 samples: two batches of 256, one per actor
    kw = {"seed": 3, "steps": 3, "cfg_scale": 1.5, "sampler": "heun"}
    latents, images, nfe = generator.sample(gen, labels, compute=ComputeConfig(), **kw)
    on_ray = generator.sample(gen, labels, compute=ComputeConfig(num_workers=2), **kw)
    # Same noise and the same batches; only the thread count differs (float rounding).
    assert_rounding_close(on_ray[0], latents, what="latents sampled on Ray actors and in process")
    assert on_ray[1].shape == images.shape and len(images) == 300
    assert np.abs(on_ray[1].astype(int) - images).max() <= 1
    assert on_ray[2] == nfe == 5
    assert not np.array_equal(on_ray[0][:30], on_ray[0][30:60])  # per-sample noise


def test_sampling_on_a_gpu_that_is_not_there_says_so(chain):
    d, _ = chain
    gen = generator.load_generator(d["gen"], d["tok"])
    with pytest.raises(ConfigError, match="use_gpu is true but torch sees no CUDA device"):
        generator.sample(gen, np.zeros(2, np.int64), seed=0, steps=1, cfg_scale=1.0,
                         sampler="euler", compute=ComputeConfig(use_gpu=True))
