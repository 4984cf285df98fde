"""Smoke runs of the judge and tokenizer stages on the tiny preset, their outputs, the
loading API later stages use, and resume of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_rounding_close

from latentforge.config import build_params, load_params
from latentforge.data import load_prepared
from latentforge.tasks import judge, prepare, tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """prepare + judge on the tiny preset, once for the module."""
    root = tmp_path_factory.mktemp("stages")
    params = load_params(REPO / "presets/tiny.yaml")
    prepare.run(params.prepare, out_dir=root / "prepared")
    judge.run(params, out_dir=root / "judge", prepared_dir=root / "prepared")
    return root


def tiny(**tokenizer_overrides):
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    raw["tokenizer"].update(tokenizer_overrides)
    return build_params(raw)


def test_judge_outputs_and_scoring_api(tiny_root):
    scorer = judge.load_judge(tiny_root / "judge")
    meta = json.loads((tiny_root / "judge/judge.json").read_text())
    assert meta["val_accuracy"] > 0.3  # 40 tiny steps; the default preset reaches > 0.95
    x, y = load_prepared(tiny_root / "prepared").split("val")
    feats, logp = scorer.score(x[:10])
    assert feats.shape == (10, 32) and logp.shape == (10, 10)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, rtol=1e-6)
    feats2, _ = scorer.score(x[:10], batch_size=3)  # eval features do not depend on batching
    assert_rounding_close(feats2, feats, what="judge features at batch 3 and batch 10")


@pytest.mark.parametrize("overrides", [
    {"quantizer": "kl"},
    {"quantizer": "fsq", "token_dim": 3, "fsq_levels": [5, 4, 3], "nested_dropout": True,
     "latent_perturbation": 0.2},
    {"quantizer": "vq", "codebook_size": 32, "layout": "2d", "loss": "l1"},
    {"quantizer": "binary", "token_dim": 6, "entropy_weight": 0.1, "latent_perturbation": 0.2},
])
def test_tokenizer_stage_outputs(tiny_root, tmp_path, monkeypatch, overrides):
    monkeypatch.chdir(tmp_path)  # checkpoints go under .latentforge/ here
    params = tiny(**overrides)
    out = tmp_path / "tok"
    result = tokenizer.run(params, out_dir=out, prepared_dir=tiny_root / "prepared",
                           judge_dir=tiny_root / "judge", plot_file=tmp_path / "prefix.csv")
    m = result.metrics
    for key in ("val_psnr", "val_ssim", "rfd_judge", "pfd_judge", "judge_acc_recon",
                "judge_acc_ratio"):
        assert np.isfinite(m[key]), key
    assert ("codebook_usage" in m) == (overrides["quantizer"] != "kl")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "tokenizer.json", "recon.png",
                                               "prefix_psnr.png", "train_curve.csv"}
    rows = (tmp_path / "prefix.csv").read_text().strip().splitlines()
    k = 16 if overrides.get("layout") == "2d" else 8  # 2d: one token per 2x2 patch of 8x8
    assert rows[0] == "tokens,psnr" and len(rows) == (2 if overrides.get("layout") == "2d" else k + 1)
    handle = tokenizer.load_tokenizer(out)
    x, _ = load_prepared(tiny_root / "prepared").split("val")
    enc = handle.encode(x[:5])
    assert enc["latents"].shape == (5, k, params.tokenizer.token_dim)
    assert ("codes" in enc) == (overrides["quantizer"] != "kl")
    assert ("mean" in enc and "logvar" in enc) == (overrides["quantizer"] == "kl")
    assert handle.reconstruct(x[:5]).shape == x[:5].shape


def test_tokenizer_rerun_resumes_finished_checkpoint(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = {"prepared_dir": tiny_root / "prepared", "judge_dir": tiny_root / "judge",
              "plot_file": tmp_path / "p.csv"}
    first = tokenizer.run(tiny(), out_dir=tmp_path / "a", **kwargs)
    second = tokenizer.run(tiny(), out_dir=tmp_path / "b", **kwargs)
    assert first.metrics == second.metrics
    assert (tmp_path / "a/model.safetensors").read_bytes() == \
        (tmp_path / "b/model.safetensors").read_bytes()
    assert first.timings["resumed_from_step"] == 0
    assert second.timings["resumed_from_step"] == params_steps()

    # the stage's code changed (DVC reruns it): trained anew, not handed back
    from latentforge import paths

    real = paths.code_sha256("tokenizer")
    monkeypatch.setattr(paths, "code_sha256",
                        lambda stage: "0" * 64 if stage == "tokenizer" else real)
    third = tokenizer.run(tiny(), out_dir=tmp_path / "c", **kwargs)
    assert third.timings["resumed_from_step"] == 0


def test_tokenizer_param_cross_checks():
    from latentforge.errors import ConfigError

    with pytest.raises(ConfigError, match="token_dim == len\\(fsq_levels\\)"):
        build_params({"tokenizer": {"quantizer": "fsq", "token_dim": 8}})
    with pytest.raises(ConfigError, match="quantizer binary needs token_dim <= 30: token_dim is 31"):
        build_params({"tokenizer": {"quantizer": "binary", "token_dim": 31}})
    with pytest.raises(ConfigError, match="nested_dropout needs layout 1d"):
        build_params({"tokenizer": {"layout": "2d", "nested_dropout": True}})


@pytest.mark.parametrize(("quantizer", "given", "used"), [
    ("binary", None, 0.1), ("binary", 0.0, 0.0), ("binary", 0.3, 0.3),
    ("vq", None, 0.0), ("vq", 0.05, 0.05), ("fsq", None, 0.0)])
def test_entropy_weight_null_takes_the_quantizers_default(quantizer, given, used):
    """null gives binary the entropy term it collapses without; an explicit value always wins."""
    extra = {"binary": {"token_dim": 6}, "fsq": {"token_dim": 4}}.get(quantizer, {})
    params = build_params({"tokenizer": {"quantizer": quantizer, "entropy_weight": given, **extra}})
    cfg = tokenizer.model_config(params.tokenizer, resolution=16, channels=1)
    assert cfg.entropy_weight == used
    assert getattr(tokenizer.build_model(cfg).quantizer, "entropy_weight", 0.0) == used


def params_steps() -> int:
    return tiny().tokenizer.steps


def test_a_collapsed_codebook_warns_with_what_to_try():
    """The numbers of bench/binary_vs_fsq.py's runs: fsq seed 1 at lr 3e-3 (17.3 dB) against
    the healthy fsq, vq and binary runs."""
    collapsed = {"codebook_perplexity": 9.4, "codebook_usage": 0.093}
    text = tokenizer.codebook_collapse("fsq", collapsed, 1000, 2864)
    assert text is not None
    assert "fsq codebook has collapsed" in text and "9.4 over 2864 tokens" in text
    assert "9.3% of the 1000 codes" in text and "tokenizer.lr 0.001" in text
    for quantizer, perplexity in (("fsq", 182.4), ("vq", 61.4), ("binary", 100.5)):
        healthy = {"codebook_perplexity": perplexity, "codebook_usage": 0.2}
        assert tokenizer.codebook_collapse(quantizer, healthy, 1000, 2864) is None
    # the bar scales with what the val tokens allow: 40 tokens can show at most 40 codes
    assert tokenizer.codebook_collapse("vq", {"codebook_perplexity": 3.0,
                                              "codebook_usage": 0.003}, 1024, 40) is None
    assert tokenizer.codebook_collapse("vq", {"codebook_perplexity": 1.5,
                                              "codebook_usage": 0.002}, 1024, 40) is not None
    assert tokenizer.codebook_collapse("kl", {"val_psnr": 20.0}, 1000, 2864) is None


def test_a_judge_stage_failing_before_its_end_keeps_the_previous_pair(tiny_root, tmp_path,
                                                                    monkeypatch):
    """The judge and the evaluator are written together once both trained: the evaluator's
    training failing after a new judge trained leaves the previous judge and evaluator as they
    were (not a new judge beside an old evaluator), and no temporary folder behind."""
    import shutil

    from latentforge import paths
    from latentforge.data import load_prepared as load

    monkeypatch.chdir(tmp_path)
    first = load_params(REPO / "presets/tiny.yaml")
    out, ev = tmp_path / "models" / "judge", tmp_path / "models" / "evaluator"
    judge.run(first, out_dir=out, prepared_dir=tiny_root / "prepared", evaluator_dir=ev)
    before = {p: p.read_bytes() for p in sorted([*out.iterdir(), *ev.iterdir()])}

    raw = first.to_dict()
    raw["judge"]["seed"] = raw["judge"]["seed"] + 7  # a new judge; the evaluator as before
    blocked = paths.checkpoint_dir("evaluator", load(tiny_root / "prepared").manifest_sha256)
    shutil.rmtree(blocked)
    blocked.write_text("not a folder")  # the evaluator's training cannot start
    with pytest.raises(OSError):
        judge.run(build_params(raw), out_dir=out, prepared_dir=tiny_root / "prepared",
                  evaluator_dir=ev)
    assert {p: p.read_bytes() for p in sorted([*out.iterdir(), *ev.iterdir()])} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["evaluator", "judge"]
